"""A renter reaching a provider only through a relay checks, before anything is agreed (so
before any escrow), that the relay's published limits (seconds and bytes per circuit, relay v2
``Limit`` in the CONNECT answer) cover the rental; otherwise it is told so with the numbers
(node/negotiate.py ``_check_relay_limits``, node/reachability.py ``relay_shortfall``). A direct
connection lifts the check. Real libp2p hosts on 127.0.0.1: a relay with small limits, a
provider holding a reservation on it, a renter dialling the provider's circuit address."""

from __future__ import annotations

import random

import pytest
import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.negotiate import Candidate, negotiate_first
from node.reachability import ReachabilityConfig, rental_needs
from protocol.negotiation import State
from tests.node.test_negotiate import PARAMS, Party, provider_desk

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def host_for(party: Party, reach: ReachabilityConfig) -> GossipHost:
    party.host = GossipHost(NodeIdentity.from_seed(party.seed),
                            HostConfig(listen_addrs=LOOPBACK, reachability=reach))
    return party.host


@pytest.mark.parametrize("limits,duration_s,refused", [
    ((600, 1 << 20), 3600, "600 s per circuit"),  # an hour's rental, a 10-minute circuit
    ((1200, 100_000), 600, "100000 bytes per circuit"),  # time enough, bytes not
    ((1200, 1 << 20), 600, None),  # both cover it: the rental is agreed over the relay
], ids=["seconds", "bytes", "enough"])
async def test_relay_limits_are_checked_before_anything_is_agreed(limits, duration_s, refused) -> None:
    rng = random.Random(7)
    relay_party, provider, renter = Party(rng), Party(rng), Party(rng)
    relay = host_for(relay_party, ReachabilityConfig(relay_service="on", circuit_max_seconds=limits[0],
                                                     circuit_max_bytes=limits[1]))
    # no hole punching: on loopback it would succeed and lift the check
    host_for(provider, ReachabilityConfig(hole_punch=False, relay_service="off"))
    host_for(renter, ReachabilityConfig(hole_punch=False, relay_service="off"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for p in (relay_party, provider, renter):
                await nursery.start(p.host.run)
            desk, offer, d, capacity, agreed = provider_desk(provider, rng)
            relay_addr = str(relay.addrs()[0])
            await provider.host.connect(relay_addr)
            assert await provider.host.reachability.reserve(relay.peer_id)
            await renter.host.connect(f"{relay_addr}/p2p-circuit/p2p/{provider.host.peer_id}")
            reach = renter.host.reachability
            assert reach.relayed_only(provider.host.peer_id)
            limit = reach.circuit_limits[provider.host.peer_id]  # as the relay published them
            assert (limit.duration_s, limit.data_bytes) == limits and limit.relay == relay.peer_id

            group = await negotiate_first(
                renter.host, renter.key, renter.binding, [Candidate(offer, d)], gpu_count=1,
                duration_s=duration_s, max_price_per_gpu_second=100, access_key="k",
                params=PARAMS, rng=rng)
            (machine,) = group.negotiations.values()
            if refused is None:
                assert machine.failure is None, machine.failure
                assert group.winner is not None and group.winner.state is State.AGREED
                assert reach.relayed_only(provider.host.peer_id)  # agreed through the relay
                nursery.cancel_scope.cancel()
                return
            assert group.winner is None
            detail = machine.failure.detail
            assert "unreachable from here for this rental" in detail, detail
            assert refused in detail and str(relay.peer_id) in detail, detail
            need_s, need_bytes = rental_needs(duration_s, offer.terms.heartbeat_interval_s)
            assert (f"needs {need_s} s" if "seconds" in refused or " s " in refused
                    else f"{need_bytes} bytes") in detail, detail
            assert agreed == [] and len(capacity.free(0)) == 2  # the provider agreed nothing

            # a direct connection (as after a hole punch) lifts the check
            # (host.connect would return at once: a connection, the relayed one, exists)
            await renter.host.host.get_network().dial_addr(provider.host.addrs()[0],
                                                           provider.host.peer_id)
            assert not reach.relayed_only(provider.host.peer_id)
            group = await negotiate_first(
                renter.host, renter.key, renter.binding, [Candidate(offer, d)], gpu_count=1,
                duration_s=duration_s, max_price_per_gpu_second=100, access_key="k",
                params=PARAMS, rng=rng)
            assert group.winner is not None and group.winner.state is State.AGREED
            nursery.cancel_scope.cancel()
