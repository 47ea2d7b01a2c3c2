"""The rental's container across a SIGKILL of the provider's process and its restart (each
node its own OS process on anvil, the real Docker daemon): the container outlives the killed
node, the restarted node resumes the rental with the same container and removes its other
containers; a clean stop removes the rental's container."""

from __future__ import annotations

import time

import pytest

from node.identity import load_or_create_identity
from node.runtime import LABEL_AGREEMENT, LABEL_PROVIDER
from tests.docker_image import busybox_image, docker_client, no_daemon_reason
from tests.node.test_processes import PATIENT, Market, _free_port, market  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())


def ours(provider_peer: str, aid: str | None = None) -> list:
    labels = [f"{LABEL_PROVIDER}={provider_peer}"] + ([f"{LABEL_AGREEMENT}={aid}"] if aid else [])
    return docker_client().api.containers(all=True, filters={"label": labels})  # dicts: Id, State


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout  # a hang guard, not a performance bound
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_container__survives_sigkill_is_resumed_on_restart_strays_removed_clean_stop_removes(market: Market):
    image = busybox_image()
    # as market.rental(), with the provider on the Docker runtime
    peer = load_or_create_identity(market.tmp / "provider" / "identity.seed").peer_id.to_base58()
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    provider = market.start("provider", "provider", "--listen", listen, "--docker-image", image,
                            params=PATIENT)
    renter = market.start("renter", "renter", "--bootstrap", f"{listen}/p2p/{peer}", "--rent", "",
                          "--duration", "120", "--max-price", "1000", params=PATIENT)
    try:
        provider.wait("ready", 60)
        aid = renter.wait("rented", 60)["agreement_id"]
        first = wait_for(lambda: [c for c in ours(peer, aid) if c["State"] == "running"], 60,
                         "the rental's container runs")[0]
        market.wait_receipts("renter", bytes.fromhex(aid), 2)
        # a container of this provider for an agreement it no longer serves (ended while down)
        docker_client().containers.run(image, ["sleep", "600"], detach=True, labels={
            LABEL_PROVIDER: peer, LABEL_AGREEMENT: "ab" * 32}, network_mode="none")

        provider.kill()  # SIGKILL: no teardown runs
        assert [c["Id"] for c in ours(peer, aid) if c["State"] == "running"] == [first["Id"]]

        seq_before = market.receipts("renter", bytes.fromhex(aid))[-1][0]
        provider = market.start("provider", "provider", "--listen", listen, "--docker-image", image,
                                params=PATIENT)
        ready = provider.wait("ready", 60)
        assert ready["resumed"] == {"resumed": [aid]}
        wait_for(lambda: not ours(peer, "ab" * 32), 30, "the stray container removed")
        assert [c["Id"] for c in ours(peer, aid)] == [first["Id"]]  # the renter kept its container
        market.wait_receipts("renter", bytes.fromhex(aid), 2, timeout=30, after_seq=seq_before)

        provider.terminate(timeout=40)  # the node stopping tears its rentals down
        assert not ours(peer, aid)
    finally:
        for c in ours(peer):
            docker_client().api.remove_container(c["Id"], force=True)
