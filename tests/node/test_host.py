"""Real py-libp2p hosts on 127.0.0.1: Noise-only, gossip delivery, validation and scoring."""

import os

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.host import GossipHost, HostConfig, Verdict, content_message_id
from node.identity import NodeIdentity
from node.testing import LOOPBACK, connect_pairs, running_hosts, wait_for_mesh

TOPIC = "/gpumarket/test/offers"


async def receive(sub, timeout=5.0):
    with trio.fail_after(timeout):
        return await sub.get()


async def nothing_arrives(sub, within):
    with trio.move_on_after(within):
        msg = await sub.get()
        return msg
    return None


async def test_host__peer_id_is_the_identity():
    ident = NodeIdentity.from_seed(os.urandom(32))
    async with trio.open_nursery() as nursery:
        node = await nursery.start(GossipHost(ident, HostConfig(listen_addrs=LOOPBACK)).run)
        assert node.peer_id == ident.peer_id
        (addr,) = node.addrs()
        assert addr.value_for_protocol("ip4") == "127.0.0.1"
        assert int(addr.value_for_protocol("tcp")) > 0
        assert addr.value_for_protocol("p2p") == ident.peer_id.to_base58()
        nursery.cancel_scope.cancel()


async def test_gossip__two_hosts_deliver_one_message():
    async with running_hosts(2) as (a, b):
        subs = [await h.subscribe(TOPIC) for h in (a, b)]
        await connect_pairs([a, b], [(1, 0)])
        await wait_for_mesh([a, b], [(0, 1)], TOPIC)
        await a.publish(TOPIC, b"offer-1")
        msg = await receive(subs[1])
        assert msg.data == b"offer-1"
        assert msg.from_id == a.peer_id.to_bytes()
        assert msg.signature  # strict signing
        # the publisher gets its own message too, and nothing else arrives at b
        assert (await receive(subs[0])).data == b"offer-1"
        assert await nothing_arrives(subs[1], 0.3) is None


async def test_gossip__three_hosts_relay_through_the_middle():
    async with running_hosts(3) as hosts:
        subs = [await h.subscribe(TOPIC) for h in hosts]
        line = [(0, 1), (2, 1)]  # 0 and 2 are not connected to each other
        await connect_pairs(hosts, line)
        await wait_for_mesh(hosts, line, TOPIC)
        assert hosts[2].peer_id not in hosts[0].host.get_network().connections
        await hosts[0].publish(TOPIC, b"relayed")
        assert (await receive(subs[1])).data == b"relayed"
        got = await receive(subs[2])
        assert got.data == b"relayed"
        assert got.from_id == hosts[0].peer_id.to_bytes()  # origin kept, signature intact


async def test_gossip__same_payload_from_two_publishers_is_one_message():
    async with running_hosts(3) as hosts:
        subs = [await h.subscribe(TOPIC) for h in hosts]
        pairs = [(0, 1), (2, 1)]
        await connect_pairs(hosts, pairs)
        await wait_for_mesh(hosts, pairs, TOPIC)
        await hosts[0].publish(TOPIC, b"same signed offer")
        assert (await receive(subs[1])).data == b"same signed offer"
        await hosts[2].publish(TOPIC, b"same signed offer")
        assert await nothing_arrives(subs[1], 0.5) is None


def test_message_id__is_sha256_of_payload_only():
    from libp2p.pubsub.pb import rpc_pb2
    import hashlib

    m1 = rpc_pb2.Message(data=b"x", from_id=b"a", seqno=b"1")
    m2 = rpc_pb2.Message(data=b"x", from_id=b"b", seqno=b"2")
    assert content_message_id(m1) == content_message_id(m2) == hashlib.sha256(b"x").digest()


def reject_bad(payload, from_peer):
    if payload.startswith(b"bad:"):
        return Verdict.REJECT
    if payload.startswith(b"ign:"):
        return Verdict.IGNORE
    return Verdict.ACCEPT


async def test_validator__reject_stops_delivery_and_costs_the_forwarder_its_mesh_place():
    async with running_hosts(3) as (a, b, c):
        subs = [await h.subscribe(TOPIC) for h in (a, b, c)]
        b.set_topic_validator(TOPIC, reject_bad)
        c.set_topic_validator(TOPIC, reject_bad)
        line = [(0, 1), (2, 1)]
        await connect_pairs([a, b, c], line)
        await wait_for_mesh([a, b, c], line, TOPIC)
        assert b.score(a.peer_id, TOPIC) == 0

        await a.publish(TOPIC, b"bad:forged offer")
        await a.publish(TOPIC, b"good offer")
        assert (await receive(subs[1])).data == b"good offer"  # b never delivered the bad one
        assert (await receive(subs[2])).data == b"good offer"  # nor relayed it to c
        assert b.score(a.peer_id, TOPIC) < 0
        assert c.score(b.peer_id, TOPIC) == 0  # the honest relay is not blamed

        with trio.fail_after(4):  # heartbeat is 1 s
            while a.peer_id in b.mesh_peers(TOPIC):
                await trio.sleep(0.05)
        assert b.peer_id in c.mesh_peers(TOPIC)
        # a's re-GRAFT is refused while its score is negative
        await trio.sleep(1.5)
        assert a.peer_id not in b.mesh_peers(TOPIC)


async def test_validator__ignore_drops_without_penalty():
    async with running_hosts(3) as (a, b, c):
        subs = [await h.subscribe(TOPIC) for h in (a, b, c)]
        b.set_topic_validator(TOPIC, reject_bad)
        line = [(0, 1), (2, 1)]
        await connect_pairs([a, b, c], line)
        await wait_for_mesh([a, b, c], line, TOPIC)
        await a.publish(TOPIC, b"ign:expired by b's clock")
        await a.publish(TOPIC, b"fresh")
        assert (await receive(subs[1])).data == b"fresh"
        assert (await receive(subs[2])).data == b"fresh"
        assert b.score(a.peer_id, TOPIC) == 0
        await trio.sleep(1.5)  # past a heartbeat
        assert a.peer_id in b.mesh_peers(TOPIC)


async def test_validator__exception_is_ignore_not_reject():
    def broken(payload, from_peer):
        raise RuntimeError("protocol bug")

    async with running_hosts(2) as (a, b):
        subs = [await h.subscribe(TOPIC) for h in (a, b)]
        b.set_topic_validator(TOPIC, broken)
        await connect_pairs([a, b], [(0, 1)])
        await wait_for_mesh([a, b], [(0, 1)], TOPIC)
        await a.publish(TOPIC, b"x")
        assert await nothing_arrives(subs[1], 0.5) is None
        assert b.score(a.peer_id, TOPIC) == 0


def plaintext_only_host(listen):
    kp = create_new_key_pair()
    return new_host(
        key_pair=kp,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
    )


async def test_security__plaintext_only_peer_cannot_connect_either_way():
    listen = [multiaddr.Multiaddr(LOOPBACK[0])]
    plain = plaintext_only_host(listen)
    async with running_hosts(1) as (ours,):
        async with plain.run(listen_addrs=listen):
            # the plaintext peer dials us
            with pytest.raises(Exception):
                with trio.fail_after(5):
                    await plain.connect(PeerInfo(ours.peer_id, ours.host.get_transport_addrs()))
            assert ours.peer_id not in plain.get_network().connections
            assert plain.get_id() not in ours.host.get_network().connections
            # we dial the plaintext peer
            with pytest.raises(Exception):
                await ours.connect(PeerInfo(plain.get_id(), plain.get_transport_addrs()))
            assert plain.get_id() not in ours.host.get_network().connections
            # control: a Noise peer (ours) connects fine to another of ours
            async with running_hosts(1) as (other,):
                await other.connect(ours.addrs()[0])
                assert ours.peer_id in other.host.get_network().connections


async def test_bootstrap__dials_in_parallel_and_survives_a_dead_peer():
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{NodeIdentity.from_seed(os.urandom(32)).peer_id.to_base58()}"
    async with running_hosts(2) as (s1, s2):
        cfg = HostConfig(
            listen_addrs=LOOPBACK,
            bootstrap=(str(s1.addrs()[0]), dead, str(s2.addrs()[0])),
            dial_timeout=3,
        )
        async with trio.open_nursery() as nursery:
            node = await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)), cfg).run)
            with trio.fail_after(4):
                while not {s1.peer_id, s2.peer_id} <= set(node.host.get_network().connections):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


async def test_host__mdns_finds_and_connects_a_node_on_the_same_lan():
    import os

    from node.host import GossipHost, HostConfig
    from node.identity import NodeIdentity

    config = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), mdns=True)
    a = GossipHost(NodeIdentity.from_seed(os.urandom(32)), config)
    b = GossipHost(NodeIdentity.from_seed(os.urandom(32)), config)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        with trio.fail_after(15):  # no bootstrap address anywhere: only multicast DNS
            while b.peer_id not in a.host.get_network().connections and \
                    a.peer_id not in b.host.get_network().connections:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
