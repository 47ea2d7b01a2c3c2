"""`gpumarket run` (/gpumarket/exec/1, node/access.py) over a rental whose only connection is a
relayed circuit (issue 15): whole nodes in one process on 127.0.0.1, a relay v2 host, the
provider holding a reservation on it and offering only its circuit address, no hole punching
and no discovery (either would make a direct connection), the real Docker daemon and EVM. The
relay host also carries the offer topic's gossip, as a public market node would: gossip never
runs over the relayed connection (specs/node.md, "Reachability", item 6), so the renter hears of
the offer through its direct connection to the relay."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio

from node.access import STDERR, STDOUT, exec_session
from node.control import SOCKET_NAME, ControlServer
from node.demo import PROVIDERS, fake_gpus
from node.discovery import DiscoveryConfig
from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.node import Node, NodeConfig, ProviderSettings
from node.offers import OFFER_TOPIC
from node.reachability import Reachable, ReachabilityConfig
from node.runtime import DockerSettings
from tests.docker_image import busybox_image, docker_client, no_daemon_reason
from tests.node.test_exec import Output
from tests.node.test_rental_containers import PARAMS, Market, wait_until

pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())

RELAYED_ONLY = dict(reachability=ReachabilityConfig(hole_punch=False, relay_service="off"),
                    discovery=DiscoveryConfig(enabled=False))


async def _true(value: bool) -> bool:
    return value


def relayed_provider(market: Market) -> Node:
    settings = ProviderSettings(
        price_per_gpu_hour=Decimal("0.45"), min_duration_s=5, max_duration_s=3600,
        heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2, open_hold_ms=10_000,
        nvml=fake_gpus(PROVIDERS[0]),
        docker=DockerSettings(images=(busybox_image(),), gpus="none", cpus=1.0, memory_mib=256))
    return Node(NodeConfig(market.tmp_path / "p", market.keys[2], params=PARAMS, name="provider",
                           provider=settings, chain_poll_s=0.3, **RELAYED_ONLY), market.achain)


async def test_run_works_over_a_relayed_rental(tmp_path):
    market = Market(tmp_path)
    await trio.sleep(market.chain.lead_s())
    market.renter = renter = Node(NodeConfig(tmp_path / "r", market.keys[1], params=PARAMS,
                                             name="renter", chain_poll_s=0.3, **RELAYED_ONLY),
                                  market.achain)
    provider = relayed_provider(market)
    relay = GossipHost(NodeIdentity.from_seed(b"\x07" * 32),
                       HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",),
                                  reachability=ReachabilityConfig(relay_service="on")))
    control = ControlServer(renter, renter.data_dir)
    sock = str(renter.data_dir / SOCKET_NAME)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            await relay.subscribe(OFFER_TOPIC)  # a public node of the market relays its gossip
            for n in (provider, renter):
                await nursery.start(n.run)
            await nursery.start(control.run)
            relay_addr = str(relay.addrs()[0])
            await provider.host.connect(relay_addr)
            reach = provider.host.reachability
            assert await reach.reserve(relay.peer_id)
            # private (nothing public on loopback): the offer names only the circuit address
            await wait_until(lambda: _true(reach.status is Reachable.PRIVATE), 30, "private")
            circuit = f"{relay_addr}/p2p-circuit/p2p/{provider.peer_id}"
            await wait_until(lambda: _true(provider.announce_addrs() == (circuit,)), 30, "circuit offer")
            await renter.host.connect(circuit)
            assert renter.host.reachability.relayed_only(provider.peer_id)

            rental = await market.rent(provider)
            aid = rental.agreement_id.hex()
            await wait_until(lambda: _true(provider.rentals[rental.agreement_id].access is not None),
                             30, "access")

            async def run(argv, chunks=None):
                out = Output()
                code = await exec_session(sock, control.token, aid[:12], argv, tty=False, input_chunks=chunks,
                                          out=out)
                return code, out

            code, out = await run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (code, bytes(out.data[STDOUT]), bytes(out.data[STDERR])) == (3, b"out\n", b"err\n")

            async def hello():
                yield b"hello " * 20_000  # 120 kB each way through the relay

            code, out = await run(["cat"], chunks=hello())
            assert code == 0 and bytes(out.data[STDOUT]) == b"hello " * 20_000
            # all of it went through the relay: still no direct connection, and the relay
            # carried a circuit
            assert renter.host.reachability.relayed_only(provider.peer_id)
            assert relay.counters["relay.circuits"] >= 1
            # neither end's pubsub uses the circuit
            assert provider.peer_id not in renter.host.pubsub.peers
            assert renter.peer_id not in provider.host.pubsub.peers
            nursery.cancel_scope.cancel()
    finally:
        for c in docker_client().containers.list(
                all=True, filters={"label": f"gpumarket.provider={provider.peer_id.to_base58()}"}):
            c.remove(force=True)
