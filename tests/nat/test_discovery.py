"""Discovery beyond the bootstrap list (node/discovery.py, issue 15): real libp2p hosts on
127.0.0.1. A node that knows one peer finds the others; a hostile peer that answers with 10,000
peers or addresses gets nowhere beyond the caps; addresses are validated."""

from __future__ import annotations

import os
from collections import Counter
from contextlib import AsyncExitStack
from functools import partial

import multiaddr
import pytest
import trio
import varint
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from node.discovery import (
    MAX_ANSWER_BYTES, PROTOCOL_ID, Discovery, DiscoveryConfig, check_addr, ip_scope,
)
from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.peer_table import PeerTable

FAST = DiscoveryConfig(interval_s=0.3, short_interval_s=0.3, first_round_s=0.1, target_peers=5, dials_per_round=3)


async def start(stack: AsyncExitStack, nursery: trio.Nursery, bootstrap=(),
                config: DiscoveryConfig = FAST, discovery: bool = True):
    host = GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                      HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",), bootstrap=tuple(bootstrap),
                                 reachability=None, dial_timeout=5))
    await nursery.start(host.run)
    d = Discovery(host, PeerTable(host, None, None).dialable, config)  # type: ignore[arg-type]
    if discovery:
        nursery.start_soon(d.run)
    else:
        d.install()
    return host, d


def direct(host: GossipHost) -> int:
    return len(host.host.get_network().connections)


@pytest.mark.trio
async def test_a_node_that_knows_one_peer_finds_the_others() -> None:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        seed, _ = await start(stack, nursery)
        nodes = [await start(stack, nursery, bootstrap=[str(seed.addrs()[0])]) for _ in range(5)]
        with trio.fail_after(30):
            while not all(direct(h) >= 5 for h, _ in nodes):
                await trio.sleep(0.2)
        for h, d in nodes:
            # each was told only the seed, and now holds all 5 others directly
            assert direct(h) >= 5
            assert d.counters["discovery.connected"] >= 1
            # and never dialled more than it was short of, per round
            assert d.counters["discovery.dials"] <= d.rounds * FAST.dials_per_round
        nursery.cancel_scope.cancel()


class Victim:
    """A TCP listener that counts connection attempts (the third party a hostile peer would
    have us dial)."""

    def __init__(self) -> None:
        self.accepted = 0

    async def serve(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        return listeners[0].socket.getsockname()[1]

    async def _handle(self, stream) -> None:
        self.accepted += 1
        await stream.aclose()


def fake_id(i: int) -> ID:
    return ID(b"\x00\x24\x08\x01\x12\x20" + i.to_bytes(32, "big"))  # identity multihash, ed25519


async def hostile_server(host: GossipHost, make_answer) -> None:
    async def handler(stream) -> None:
        await read_varint_prefixed_bytes_limited(stream, 4096)
        data = make_answer().SerializeToString()
        await stream.write(varint.encode(len(data)) + data)
        await stream.close()

    host.host.set_stream_handler(PROTOCOL_ID, handler)


@pytest.mark.trio
@pytest.mark.parametrize("shape", ["10000_peers", "600_peers", "10000_addrs", "3000_addrs"])
async def test_a_hostile_answer_is_bounded(shape: str) -> None:
    victim = Victim()
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        port = await victim.serve(nursery)
        hostile, _ = await start(stack, nursery, discovery=False)
        addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}").to_bytes()

        def answer() -> Message:
            m = Message(type=Message.MessageType.FIND_NODE)
            count = int(shape.split("_")[0])
            if shape.endswith("_addrs"):  # one peer with many addresses, all the victim's
                e = m.closerPeers.add()
                e.id = fake_id(1).to_bytes()
                e.addrs.extend([addr] * count)
                return m
            for i in range(count):
                e = m.closerPeers.add()
                e.id = fake_id(i).to_bytes()
                e.addrs.append(addr)
            return m

        size = len(answer().SerializeToString())
        await hostile_server(hostile, answer)
        config = DiscoveryConfig(interval_s=0.2, short_interval_s=0.2, first_round_s=0.05, target_peers=50,
                                 dials_per_round=4)
        node, d = await start(stack, nursery, bootstrap=[str(hostile.addrs()[0])], config=config)
        with trio.fail_after(20):
            while d.rounds < 10:
                await trio.sleep(0.1)
        rounds = d.rounds
        if size > MAX_ANSWER_BYTES:
            # dropped whole: no candidate, no dial
            assert d.counters["discovery.answer_refused"] >= 1
            assert d.counters["discovery.candidates"] == 0 and victim.accepted == 0
        elif shape == "3000_addrs":
            assert d.counters["discovery.candidates"] == 1  # its first acceptable address
            assert victim.accepted == 1  # dialled once, failed, not retried within retry_s
        else:
            # at most 20 peers read from an answer; every fake peer is at the victim's one IP,
            # so at most one dial per round reaches it, and a failed peer is not retried
            assert size <= MAX_ANSWER_BYTES
            assert d.counters["discovery.peers_over_cap"] >= 600 - 20
            assert len(d.candidates) <= 20
            assert d.counters["discovery.dials"] <= rounds
            assert victim.accepted <= rounds
            assert victim.accepted >= 1  # it did dial (the caps are what bound it)
        assert len(node.host.get_peerstore().peer_ids()) < 30  # nothing entered the peerstore
        nursery.cancel_scope.cancel()


def test_addresses_are_validated() -> None:
    peer = fake_id(7)
    other = fake_id(8)

    def enc(s: str) -> bytes:
        return multiaddr.Multiaddr(s).to_bytes()

    ok = check_addr(enc("/ip4/8.8.8.8/tcp/4001"), peer, "public", False)
    assert ok == f"/ip4/8.8.8.8/tcp/4001/p2p/{peer.to_base58()}"
    assert check_addr(enc(f"/ip4/8.8.8.8/tcp/4001/p2p/{peer.to_base58()}"), peer, "public", False)
    # another peer's id in the address, wrong shapes, unusable ranges
    assert check_addr(enc(f"/ip4/8.8.8.8/tcp/4001/p2p/{other.to_base58()}"), peer, "public", False) is None
    assert check_addr(enc("/ip4/8.8.8.8/udp/4001"), peer, "public", False) is None
    assert check_addr(enc("/dns4/example.com/tcp/4001"), peer, "public", False) is None
    assert check_addr(enc("/ip4/0.0.0.0/tcp/4001"), peer, "public", False) is None
    assert check_addr(enc("/ip4/224.0.0.1/tcp/4001"), peer, "public", False) is None
    assert check_addr(enc("/ip4/169.254.1.1/tcp/4001"), peer, "public", False) is None
    assert check_addr(enc("/ip4/8.8.8.8/tcp/0"), peer, "public", False) is None
    assert check_addr(b"\xff" * 10, peer, "public", False) is None
    assert check_addr(b"\x04" + b"\x01" * 200, peer, "public", False) is None  # over 64 bytes
    # private and loopback: only when named by a peer at such an address (or allowed)
    for ip, scope in (("10.0.0.5", "private"), ("192.168.1.2", "private"),
                      ("100.64.0.1", "private"), ("127.0.0.1", "loopback")):
        assert ip_scope(ip) == scope
        a = enc(f"/ip4/{ip}/tcp/4001")
        assert check_addr(a, peer, "public", False) is None
        assert check_addr(a, peer, "public", True) is not None
        assert check_addr(a, peer, "loopback", False) is not None
    assert check_addr(enc("/ip4/10.0.0.5/tcp/4001"), peer, "private", False) is not None
    assert check_addr(enc("/ip4/127.0.0.1/tcp/4001"), peer, "private", False) is None
    assert ip_scope("198.18.0.7") == "public"  # the NAT test lab's "internet"


def test_the_server_answers_the_closest_and_hides_private_addresses() -> None:
    class FakeHost:
        peer_id = fake_id(0)
        counters: Counter[str] = Counter()

    known = {fake_id(i).to_base58(): [f"/ip4/10.0.0.{i}/tcp/4001/p2p/{fake_id(i).to_base58()}",
                                      f"/ip4/8.8.4.{i}/tcp/4001/p2p/{fake_id(i).to_base58()}"]
             for i in range(1, 40)}
    d = Discovery(FakeHost(), lambda: known)
    requester = fake_id(1)
    public = d.answer(fake_id(5).to_bytes(), requester, "public")
    assert len(public.closerPeers) == 20
    assert requester.to_bytes() not in [e.id for e in public.closerPeers]
    assert all(len(e.addrs) == 1 and multiaddr.Multiaddr(e.addrs[0]).value_for_protocol("ip4")
               .startswith("8.8.4.") for e in public.closerPeers)
    assert public.closerPeers[0].id == fake_id(5).to_bytes()  # distance 0 first
    lan = d.answer(fake_id(5).to_bytes(), requester, "private")
    assert all(len(e.addrs) == 2 for e in lan.closerPeers)


def test_a_restart_rejoins_diverse_peers_not_the_latest_sybils() -> None:
    """node/peer_table.py choose_rejoin: 50 identities from one /24 seen last must not take
    all 8 rejoin dials from the honest peers seen before them."""
    from node.peer_table import address_group, choose_rejoin

    sybils = [(f"s{i}", [f"/ip4/203.0.113.{i}/tcp/4001/p2p/s{i}"]) for i in range(50)]
    honest = [(f"h{i}", [f"/ip4/198.51.{i}.7/tcp/4001/p2p/h{i}"]) for i in range(10)]
    chosen = choose_rejoin(sybils + honest, 8, 2)  # most recent first: the sybils
    assert [r[0] for r in chosen] == ["s0", "s1"] + [f"h{i}" for i in range(6)]
    assert address_group("/ip6/2001:db8:1:2::5/tcp/1") == "2001:db8:1::/48"
    assert address_group("/dns4/x/tcp/1") == "/dns4/x/tcp/1"
