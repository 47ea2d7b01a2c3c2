"""Whole nodes with the Docker runtime (real daemon, real libp2p on loopback, the embedded EVM):
a container per rental, torn down at every end."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
import trio

from node.chain import AsyncChain, Chain
from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.node import Node, NodeConfig, ProviderSettings
from node.runtime import LABEL_AGREEMENT, LABEL_PROVIDER, DockerSettings
from protocol.eth import private_key_address
from tests.docker_image import busybox_image, docker_client, no_daemon_reason

pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())
# 1 s heartbeats as in the demo, but patient: creating a container on a loaded 2-core machine with
# vfs storage takes seconds, during which the renter hears nothing.
PARAMS = dataclasses.replace(DEMO_PARAMS, renter_heartbeat_timeout_intervals=5,
                             provider_stop_after_missed_receipts=10)


def containers(**labels: str) -> list[dict]:
    """The low-level listing (Id, State): the SDK's high-level one inspects each container after
    listing it and fails when one is removed in between."""
    return docker_client().api.containers(
        all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})


async def wait_until(pred, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):  # a hang guard, not a performance bound
        while not await pred():
            await trio.sleep(0.2)


class Market:
    def __init__(self, tmp_path) -> None:
        self.chain = Chain.embedded()
        keys = self.chain.dev_keys()
        self.chain.deploy_local_market(keys[0])
        self.chain.fund(private_key_address(keys[1]), token_units=10**9, minter_key=keys[0])
        self.achain = AsyncChain(self.chain)
        self.tmp_path, self.keys = tmp_path, keys
        self.renter = Node(NodeConfig(tmp_path / "r", keys[1], params=PARAMS, name="renter",
                                      chain_poll_s=0.3), self.achain)

    def provider(self) -> Node:
        settings = ProviderSettings(
            price_per_gpu_hour=Decimal("0.45"), min_duration_s=5, max_duration_s=3600,
            heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2, open_hold_ms=10_000,
            nvml=fake_gpus(PROVIDERS[0]),
            docker=DockerSettings(images=(busybox_image(),), gpus="none", cpus=1.0, memory_mib=256))
        return Node(NodeConfig(self.tmp_path / "p", self.keys[2], params=PARAMS, name="provider",
                               provider=settings, chain_poll_s=0.3), self.achain)

    async def rent(self, provider: Node, duration_s: int = 60):
        with trio.fail_after(20):
            while True:
                entry = self.renter.book.held(provider.key.public)
                if entry is not None and entry.offer.gpus:
                    break
                await trio.sleep(0.2)
        assert entry.offer.images == (busybox_image(),)  # published: renters filter on it
        assert self.renter.search(f"image={busybox_image()}")
        rental = await self.renter.rent([entry], gpu_count=1, duration_s=duration_s,
                                        max_price_per_gpu_second=125)
        aid = rental.agreement_id
        await wait_until(lambda: _running(provider, aid), 60, "the container runs")
        return rental


async def _running(provider: Node, aid: bytes) -> bool:
    found = containers(**{LABEL_AGREEMENT: aid.hex(), LABEL_PROVIDER: provider.peer_id.to_base58()})
    return bool(found) and found[0]["State"] == "running"


async def _gone(provider: Node, aid: bytes) -> bool:
    return not containers(**{LABEL_AGREEMENT: aid.hex(), LABEL_PROVIDER: provider.peer_id.to_base58()})


async def test_rental_container__torn_down_at_stop_death_end_and_node_stop(tmp_path):
    market = Market(tmp_path)
    await trio.sleep(market.chain.lead_s())
    provider = market.provider()
    renter = market.renter
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(provider.run)
            await nursery.start(renter.run)
            await renter.host.connect(provider.addrs()[0])

            # 1. the renter stops early: the escrow's Closed ends service, the container goes
            first = await market.rent(provider)
            await wait_until(lambda: _async(first.session.access is not None), 20, "access")
            assert "gpumarket shell" in first.session.access
            await renter.stop_rental(first.agreement_id)
            await wait_until(lambda: _gone(provider, first.agreement_id), 30, "teardown on stop")
            assert "StopService" in provider.rentals[first.agreement_id].events

            # 2. the container dies: service ends, the provider claims, nothing is left
            second = await market.rent(provider)
            aid2 = second.agreement_id
            await wait_until(lambda: _async(second.session.log.receipts >= 2), 20, "receipts")
            docker_client().api.kill(containers(**{LABEL_AGREEMENT: aid2.hex()})[0]["Id"])
            await wait_until(lambda: _gone(provider, aid2), 30, "teardown after death")
            p2 = provider.rentals[aid2].session
            assert p2.finished and "service_lost" in [r.event for r in p2.log.reports]
            assert [c.method for c in p2.log.escrow_calls] == ["claim"]
            heartbeats = p2.log.heartbeats
            await trio.sleep(2.5)  # two more intervals: no heartbeat after the loss
            assert p2.log.heartbeats == heartbeats

            # 3. the natural end (5 s)
            third = await market.rent(provider, duration_s=5)
            await wait_until(lambda: _gone(provider, third.agreement_id), 30, "teardown at the end")

            # 4. the node stops: its rental's container goes with it
            fourth = await market.rent(provider)
            nursery.cancel_scope.cancel()
        assert await _gone(provider, fourth.agreement_id)
    finally:
        for c in containers(**{LABEL_PROVIDER: provider.peer_id.to_base58()}):
            docker_client().api.remove_container(c["Id"], force=True)


async def _async(value: bool) -> bool:
    return value
