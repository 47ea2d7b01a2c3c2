"""Patched <-> unpatched py-libp2p 0.8.1 on one network (issue 16): a node with the CPU fixes of
node/libp2p_perf.py must keep working with py-libp2p nodes that do not have them (and the other
way round), since other people's nodes will run plain py-libp2p.

What each fix changes on the wire, and what here would fail if a peer could not take it:
* yamux window credit only at half the window: a message several windows long (400 KiB) each
  way; the sender stalls unless the receiver's credit comes back.
* the peer record once per stream: offers keep flowing after the first RPC of each stream, and
  the unpatched side (which verifies the record on every RPC that has one) accepts RPCs without.
* IDONTWANT only for >= 1 KiB: 2 KiB messages in a mixed mesh (IDONTWANT both ways).
* buffered frame reads: many RPCs back to back on one stream.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest
import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.libp2p_perf import FastPubsub
from node.offers import OFFER_TOPIC
from node.testing import LOOPBACK, settle_meshes
from protocol.samples import make_offer, make_provider
from tests.node.offer_helpers import connect_and_mesh, publisher, start_node, wait_until

PATCHED = HostConfig(listen_addrs=LOOPBACK)
UNPATCHED = replace(PATCHED, fast_gossip=False)
TOPIC = "/gpumarket/test/mixed"


async def test_offers_both_ways_between_a_patched_and_an_unpatched_node(tmp_path):
    async with trio.open_nursery() as nursery:
        fast = await start_node(nursery, tmp_path / "fast.db", host_config=PATCHED)
        plain = await start_node(nursery, tmp_path / "plain.db", host_config=UNPATCHED)
        assert isinstance(fast.host.pubsub, FastPubsub)
        assert not isinstance(plain.host.pubsub, FastPubsub)
        await connect_and_mesh([fast, plain], [(0, 1)])
        async with trio.open_nursery() as providers:
            await providers.start(publisher(fast).run)
            await providers.start(publisher(plain).run)
            await wait_until(lambda: plain.book.held(fast.identity.public_key) is not None, 15)
            await wait_until(lambda: fast.book.held(plain.identity.public_key) is not None, 15)
            providers.cancel_scope.cancel()
        # relayed offers of a provider that is not on the network, many on the same streams
        rng = random.Random(16)
        peer, _, binding = make_provider(rng)
        for seq in range(1, 21):
            sender = fast if seq % 2 else plain
            offer = make_offer(peer, binding, rng, fast.service.now_ms(), seq=seq)
            await sender.host.publish(OFFER_TOPIC, offer.encode())
            await trio.sleep(0.02)
        for node in (fast, plain):
            await wait_until(lambda node=node: (node.book.held(peer.public) is not None
                                                and node.book.held(peer.public).seq == 20), 15)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("relay", ["patched", "unpatched"])
async def test_an_offer_crosses_a_relay_of_the_other_kind(tmp_path, relay):
    ends, middle = (UNPATCHED, PATCHED) if relay == "patched" else (PATCHED, UNPATCHED)
    async with trio.open_nursery() as nursery:
        nodes = [await start_node(nursery, tmp_path / f"{i}.db", host_config=config)
                 for i, config in enumerate((ends, middle, ends))]
        await connect_and_mesh(nodes, [(0, 1), (1, 2)])
        async with trio.open_nursery() as providers:
            await providers.start(publisher(nodes[0]).run)
            await providers.start(publisher(nodes[2]).run)
            await wait_until(lambda: nodes[2].book.held(nodes[0].identity.public_key) is not None, 15)
            await wait_until(lambda: nodes[0].book.held(nodes[2].identity.public_key) is not None, 15)
            providers.cancel_scope.cancel()
        network = nodes[0].host.host.get_network()
        assert nodes[2].host.peer_id not in network.connections, "only through the relay"
        nursery.cancel_scope.cancel()


async def test_large_and_bulky_messages_in_a_mixed_mesh():
    """Three hosts, full mesh, patched / unpatched / patched: 2 KiB messages (IDONTWANT flows
    both ways), 400 KiB messages (more than one yamux window each way), all delivered."""
    configs = (PATCHED, UNPATCHED, PATCHED)
    async with trio.open_nursery() as nursery:
        hosts = [await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)), c).run)
                 for c in configs]
        subs = [await h.subscribe(TOPIC) for h in hosts]
        for i, j in ((0, 1), (1, 2), (0, 2)):
            await hosts[i].connect(hosts[j].addrs()[0])
        await settle_meshes(hosts, TOPIC, timeout=6, d_low=2)
        sent: list[bytes] = []
        got: list[list[bytes]] = [[] for _ in hosts]

        async def reader(k, sub):
            while True:
                msg = await sub.get()
                got[k].append(msg.data)

        async with trio.open_nursery() as readers:
            for k, sub in enumerate(subs):
                readers.start_soon(reader, k, sub)
            for size in (2048,) * 6 + (400 * 1024,) * 3:
                for host in hosts:
                    data = os.urandom(size)
                    sent.append(data)
                    await host.publish(TOPIC, data)
                    await trio.sleep(0.02)
            with trio.move_on_after(20):
                while any(len(g) < len(sent) for g in got):
                    await trio.sleep(0.05)
            readers.cancel_scope.cancel()
        for k in range(len(hosts)):
            assert sorted(got[k]) == sorted(sent), f"host {k}: {len(got[k])}/{len(sent)}"
        nursery.cancel_scope.cancel()
