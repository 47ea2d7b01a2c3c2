"""Relayed connections are *limited* (specs/node.md, "Reachability", item 6;
node/libp2p_nat_patches.py ``limit_relayed_connections``): only the rental's own protocols and
what a hole punch needs run over a ``/p2p-circuit`` connection; pubsub, offer sync and discovery
do not, so gossip between two peers joined only through a relay cannot use up the relay's bytes
per circuit under a rental. Real libp2p hosts on 127.0.0.1: a public node that serves relay v2
and gossips at a high rate, a provider holding a reservation on it, a renter that reaches the
provider only through its circuit address (hole punching off: on loopback it would succeed)."""

from __future__ import annotations

import random

import pytest
import trio
from libp2p.host.ping import ID as PING_ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

from node import access, birthday_punch, negotiate, rentals
from node.host import GossipConfig, GossipHost, HostConfig
from node.identity import NodeIdentity
from node.libp2p_nat_patches import LimitedConnectionError, is_limited_conn
from node.negotiate import Candidate, negotiate_first
from node.offers import SYNC_PROTOCOL, OfferService
from node.reachability import RELAYED_CONN_PROTOCOLS, ReachabilityConfig, rental_needs
from node.discovery import PROTOCOL_ID as KAD_PROTOCOL
from protocol.negotiation import State
from tests.node.test_negotiate import PARAMS, Party, provider_desk

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TOPIC = "gpumarket-test-flood"
# high enough that the flood below is not dropped by the per-peer message budgets
FLOOD_GOSSIP = GossipConfig(max_messages_per_peer_per_second=1000, message_burst=2000,
                            max_messages_per_ip_per_second=3000, message_ip_burst=6000)
FLOOD_RATE = 150  # offers/s (the network-wide estimate: 170/s)
FLOOD_SECONDS = 4.0
OFFER_BYTES = 750


def test_the_allowed_protocols_are_the_rentals_own() -> None:
    rental = {negotiate.NEGOTIATE_PROTOCOL, rentals.RENTAL_PROTOCOL, access.EXEC_PROTOCOL,
              access.FORWARD_PROTOCOL, access.COPY_PROTOCOL}
    assert rental <= RELAYED_CONN_PROTOCOLS
    assert "/libp2p/dcutr" in RELAYED_CONN_PROTOCOLS
    assert birthday_punch.PROTOCOL_ID in RELAYED_CONN_PROTOCOLS  # its plan goes over the relay
    for other in ("/meshsub/1.1.0", "/meshsub/1.2.0", SYNC_PROTOCOL, KAD_PROTOCOL,
                  "/libp2p/autonat/1.0.0", "/libp2p/circuit/relay/0.2.0/hop"):
        assert other not in RELAYED_CONN_PROTOCOLS


def host_for(party: Party, reach: ReachabilityConfig) -> GossipHost:
    party.host = GossipHost(NodeIdentity.from_seed(party.seed),
                            HostConfig(listen_addrs=LOOPBACK, reachability=reach, gossip=FLOOD_GOSSIP))
    return party.host


def relayed_conn(host: GossipHost, peer):
    (conn,) = host.host.get_network().connections[peer]
    assert is_limited_conn(conn)
    return conn


async def test_gossip_stays_off_a_relayed_rental_and_a_hostile_meshsub_is_reset() -> None:
    rng = random.Random(11)
    relay_party, provider, renter = Party(rng), Party(rng), Party(rng)
    duration_s = 600
    host_for(provider, ReachabilityConfig(hole_punch=False, relay_service="off"))
    host_for(renter, ReachabilityConfig(hole_punch=False, relay_service="off"))
    desk, offer, d, capacity, agreed = provider_desk(provider, rng)
    _, need_bytes = rental_needs(duration_s, offer.terms.heartbeat_interval_s)
    # the relay's bytes per circuit: what this rental needs and not a byte more
    relay = host_for(relay_party, ReachabilityConfig(relay_service="on",
                                                     circuit_max_bytes=need_bytes))
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for p in (relay_party, provider, renter):
                await nursery.start(p.host.run)
            for p in (relay_party, provider, renter):
                await p.host.subscribe(TOPIC)
            relay_addr = str(relay.addrs()[0])
            await provider.host.connect(relay_addr)
            await renter.host.connect(relay_addr)
            assert await provider.host.reachability.reserve(relay.peer_id)
            await renter.host.connect(f"{relay_addr}/p2p-circuit/p2p/{provider.host.peer_id}")
            reach = renter.host.reachability
            assert reach.relayed_only(provider.host.peer_id)
            assert reach.circuit_limits[provider.host.peer_id].data_bytes == need_bytes

            # the renter still gets gossip through its direct connection to the public node
            with trio.fail_after(10):
                while renter.host.peer_id not in relay.pubsub.peers or \
                        relay.peer_id not in renter.host.pubsub.peers:
                    await trio.sleep(0.05)
            await trio.sleep(2)  # pubsub's connect handling for the circuit has run by now
            # ... and pubsub never took the relayed connection, either way
            assert provider.host.peer_id not in renter.host.pubsub.peers
            assert renter.host.peer_id not in provider.host.pubsub.peers
            refused_out = (renter.host.counters["nat.limited_conn.refused_outbound"]
                           + provider.host.counters["nat.limited_conn.refused_outbound"])
            assert refused_out >= 2, refused_out  # each side's pubsub tried once
            # offer sync and discovery are refused locally too; sync never picks the peer
            assert renter.host.peer_id not in OfferService(provider.host, None).sync_candidates()
            assert provider.host.peer_id not in OfferService(renter.host, None).sync_candidates()
            assert relay.peer_id in OfferService(renter.host, None).sync_candidates()
            with pytest.raises(LimitedConnectionError):
                await renter.host.host.new_stream(provider.host.peer_id, [SYNC_PROTOCOL])
            with pytest.raises(LimitedConnectionError):
                await renter.host.host.new_stream(provider.host.peer_id, [KAD_PROTOCOL])

            # the flood: a busy market's offers gossiped by the public node
            got = {"renter": 0, "provider": 0}

            async def count(party: Party, name: str) -> None:
                sub = await party.host.subscribe(TOPIC)
                async for _ in sub:  # noqa: F841
                    got[name] += 1

            nursery.start_soon(count, renter, "renter")
            nursery.start_soon(count, provider, "provider")
            before = relay.counters["relay.circuit_bytes"]
            sent = 0

            async def flood() -> None:
                nonlocal sent
                n = int(FLOOD_RATE * FLOOD_SECONDS)
                for i in range(n):
                    await relay.publish(TOPIC, i.to_bytes(4, "big") + rng.randbytes(OFFER_BYTES - 4))
                    sent += 1
                    await trio.sleep(1 / FLOOD_RATE)

            async with trio.open_nursery() as inner:
                inner.start_soon(flood)
                # meanwhile the rental's own traffic runs over the relay: negotiation ...
                group = await negotiate_first(
                    renter.host, renter.key, renter.binding, [Candidate(offer, d)], gpu_count=1,
                    duration_s=duration_s, max_price_per_gpu_second=100, access_key="k",
                    params=PARAMS, rng=rng)
                assert group.winner is not None and group.winner.state is State.AGREED
                # ... and a heartbeat-sized round trip every 0.5 s (ping: allowed)
                while sent < FLOOD_RATE * FLOOD_SECONDS:
                    stream = await renter.host.host.new_stream(provider.host.peer_id, [PING_ID])
                    assert is_limited_conn(stream.swarm_conn)
                    await stream.write(b"\x01" * 32)
                    assert len(await stream.read(32)) == 32
                    await stream.close()
                    await trio.sleep(0.5)
            await trio.sleep(1)
            circuit_bytes = relay.counters["relay.circuit_bytes"] - before
            print(f"flood: {sent} messages of {OFFER_BYTES} B; delivered renter "
                  f"{got['renter']} provider {got['provider']}; bytes through the circuit "
                  f"meanwhile {circuit_bytes} (rental estimate {need_bytes})")
            assert got["renter"] >= 0.9 * sent and got["provider"] >= 0.9 * sent, got
            assert relay.counters["relay.circuit_bytes_exceeded"] == 0
            assert circuit_bytes < 0.1 * need_bytes, circuit_bytes
            assert reach.relayed_only(provider.host.peer_id)  # the circuit is still up

            # a hostile renter opens meshsub over the circuit, bypassing its own host's limit:
            # the provider resets it and never adds it to pubsub
            conn = relayed_conn(renter.host, provider.host.peer_id)
            refused_in = provider.host.counters["nat.limited_conn.refused_inbound"]
            raw = await conn.new_stream()
            proto = await MultiselectClient().select_one_of(
                ["/meshsub/1.2.0"], MultiselectCommunicator(raw), 5)
            assert proto == "/meshsub/1.2.0"
            with trio.fail_after(5):
                with pytest.raises(Exception):
                    while True:
                        await raw.write(b"\x00")  # an empty RPC frame, over and over
                        if not await raw.read(1):
                            raise EOFError
            assert provider.host.counters["nat.limited_conn.refused_inbound"] == refused_in + 1
            assert renter.host.peer_id not in provider.host.pubsub.peers
            # an allowed protocol on the same circuit still works
            stream = await renter.host.host.new_stream(provider.host.peer_id, [PING_ID])
            await stream.write(b"\x02" * 32)
            assert len(await stream.read(32)) == 32

            # a direct connection (as after a hole punch): now pubsub takes it
            await renter.host.host.get_network().dial_addr(provider.host.addrs()[0],
                                                           provider.host.peer_id)
            with trio.fail_after(10):
                while provider.host.peer_id not in renter.host.pubsub.peers:
                    await trio.sleep(0.05)
            assert not is_limited_conn(renter.host.pubsub.peers[provider.host.peer_id].swarm_conn)
            nursery.cancel_scope.cancel()
