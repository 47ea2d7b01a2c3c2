"""Whole nodes with the Docker runtime (real daemon, real libp2p on loopback, the embedded EVM):
the renter chooses the container's image among the offer's, and a preemption notice sends the
container's processes SIGTERM at once, the container being removed at the notice's stop."""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal

import pytest
import trio

from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.node import Node, NodeConfig, ProviderSettings, RentError
from node.runtime import LABEL_AGREEMENT, LABEL_PROVIDER, DockerSettings
from node.spot import SpotSettings
from protocol.messages import PreemptionReason
from tests.docker_image import busybox_image, docker_client, no_daemon_reason, second_image
from tests.node.node_helpers import funded_market

pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())
# Patient, as in test_rental_containers.py: creating a container on vfs takes seconds.
PARAMS = dataclasses.replace(DEMO_PARAMS, renter_heartbeat_timeout_intervals=5,
                             provider_stop_after_missed_receipts=10)
NOTICE_S = 6


def containers(**labels: str) -> list[dict]:
    return docker_client().api.containers(
        all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})


def container_of(provider: Node, aid: bytes) -> dict | None:
    found = containers(**{LABEL_AGREEMENT: aid.hex(), LABEL_PROVIDER: provider.peer_id.to_base58()})
    return found[0] if found else None


async def wait_until(pred, timeout: float) -> None:
    with trio.fail_after(timeout):  # a hang guard, not a performance bound
        while not pred():
            await trio.sleep(0.1)


def exec_out(container_id: str, *argv: str) -> str:
    api = docker_client().api
    ex = api.exec_create(container_id, list(argv))
    return api.exec_start(ex["Id"]).decode(errors="replace")


async def _with_nodes(tmp_path, settings: ProviderSettings, scenario) -> None:
    chain, achain, keys = await funded_market(renter=1, token_units=10**9)
    renter = Node(NodeConfig(tmp_path / "r", keys[1], params=PARAMS, name="renter", chain_poll_s=0.3), achain)
    provider = Node(NodeConfig(tmp_path / "p", keys[2], params=PARAMS, name="provider", provider=settings,
                               chain_poll_s=0.3), achain)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(provider.run)
            await nursery.start(renter.run)
            await renter.host.connect(provider.addrs()[0])
            await wait_until(lambda: (e := renter.book.held(provider.key.public)) is not None
                             and len(e.offer.gpus) == 2, 20)
            await scenario(renter, provider)
            nursery.cancel_scope.cancel()
    finally:
        for c in containers(**{LABEL_PROVIDER: provider.peer_id.to_base58()}):
            docker_client().api.remove_container(c["Id"], force=True)


def provider_settings(images: tuple[str, ...], spot: SpotSettings | None = None) -> ProviderSettings:
    return ProviderSettings(
        price_per_gpu_hour=Decimal("0.45"), min_duration_s=5, max_duration_s=3600,
        heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2, open_hold_ms=10_000,
        nvml=fake_gpus(PROVIDERS[0]), spot=spot,
        docker=DockerSettings(images=images, gpus="none", cpus=1.0, memory_mib=256))


async def test_image__not_offered_refused_with_its_code__the_second_runs_in_the_container(tmp_path):
    images = (busybox_image(), second_image())

    async def scenario(renter: Node, provider: Node) -> None:
        entry = renter.book.held(provider.key.public)
        assert entry.offer.images == images
        with pytest.raises(RentError) as refused:
            await renter.rent([entry], gpu_count=1, duration_s=60, max_price_per_gpu_second=125,
                              image="gpumarket-test-busybox:2")
        assert "image_not_offered" in str(refused.value)
        assert "gpumarket-test-busybox:2" in str(refused.value)
        assert not provider.rentals and not containers(**{LABEL_PROVIDER: provider.peer_id.to_base58()})

        rental = await renter.rent([entry], gpu_count=1, duration_s=60, max_price_per_gpu_second=125,
                                   image=images[1])
        aid = rental.agreement_id
        assert rental.details.image == images[1]
        await wait_until(lambda: (c := container_of(provider, aid)) is not None and c["State"] == "running", 60)
        assert provider.rentals[aid].details.image == images[1]
        inspect = docker_client().api.inspect_container(container_of(provider, aid)["Id"])
        assert inspect["Config"]["Image"] == images[1]
        assert inspect["Image"] == docker_client().images.get(images[1]).id
        assert exec_out(inspect["Id"], "cat", "/image-name").strip() == "second"
        await renter.stop_rental(aid)
        await wait_until(lambda: container_of(provider, aid) is None, 30)

    await _with_nodes(tmp_path, provider_settings(images), scenario)


async def test_preemption__the_containers_processes_get_sigterm_at_once_removed_at_the_stop(tmp_path):
    spot = SpotSettings(interruptible_gpus=1, notice_s=NOTICE_S, price_per_gpu_hour=Decimal("0.36"))

    async def scenario(renter: Node, provider: Node) -> None:
        entry = renter.book.held(provider.key.public)
        rental = await renter.rent([entry], gpu_count=1, duration_s=600, max_price_per_gpu_second=100,
                                   notice_s=NOTICE_S)
        aid = rental.agreement_id
        await wait_until(lambda: (c := container_of(provider, aid)) is not None and c["State"] == "running", 60)
        await wait_until(lambda: rental.session.log.receipts >= 1, 20)
        cid = container_of(provider, aid)["Id"]
        # The renter's job, run as `gpumarket run` runs it (an exec in the container): on TERM
        # it writes its checkpoint and exits.
        job = ("trap 'echo checkpointed > /ckpt; exit 0' TERM; "
               "echo started > /started; while true; do sleep 1; done")
        api = docker_client().api
        api.exec_start(api.exec_create(cid, ["sh", "-c", job])["Id"], detach=True)
        await wait_until(lambda: exec_out(cid, "cat", "/started").strip() == "started", 20)
        assert "checkpointed" not in exec_out(cid, "cat", "/ckpt")

        (preempted,) = await provider.preempt_interruptible(PreemptionReason.OTHER, "test")
        sent = time.monotonic()
        assert preempted == aid
        notice = provider.rentals[aid].session.machine.notice
        await wait_until(lambda: exec_out(cid, "cat", "/ckpt").strip() == "checkpointed", NOTICE_S)
        took_s = time.monotonic() - sent
        await wait_until(lambda: "SIGTERM" in provider.rentals[aid].events, NOTICE_S)
        # The job has checkpointed well before the stop, and the container still runs (the
        # renter can still copy the checkpoint out): only the job was told.
        assert provider.clock.now_ms() < notice.stop_ms
        assert container_of(provider, aid)["State"] == "running"
        assert exec_out(cid, "cat", "/ckpt").strip() == "checkpointed"
        await wait_until(lambda: container_of(provider, aid) is None, NOTICE_S + 30)
        assert provider.clock.now_ms() >= notice.stop_ms  # removed at the stop, not before
        assert "StopService" in provider.rentals[aid].events
        print(f"SIGTERM -> checkpoint file seen after {took_s:.2f} s (notice {NOTICE_S} s)")

    await _with_nodes(tmp_path, provider_settings((busybox_image(),), spot), scenario)
