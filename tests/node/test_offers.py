"""The offer service on real py-libp2p hosts (127.0.0.1, one process): publish, re-announce,
withdraw, expiry, seq persistence across a restart, sync on join, relays, rate limit."""

import os
import random

import pytest
import trio

from node.fake_nvml import FakeNvml
from node.gpu import NoGpuError
from node.offers import OFFER_TOPIC, ByteBudget, OfferServiceConfig, chunk_offers, decode_sync_frame, iter_frames
from node.publisher import OfferPublisher
from protocol.identity import PeerKey
from protocol.samples import make_offer, make_provider
from tests.node.offer_helpers import (
    TEST_PARAMS,
    binding_for,
    connect_and_mesh,
    market,
    provider_config,
    publisher,
    start_node,
    wait_until,
)


def held_seq(node, provider_key):
    entry = node.book.held(provider_key)
    return None if entry is None else entry.seq


async def test_offers__published_offers_reach_every_renter_then_reannounce_replaces_and_withdrawal_evicts(tmp_path):
    async with market(4, tmp_path) as nodes:
        # providers 0 and 1, renters 2 and 3; 0 and 3 are two hops apart
        await connect_and_mesh(nodes, [(0, 2), (1, 2), (3, 2), (1, 3)])
        async with trio.open_nursery() as nursery:
            pubs = [await nursery.start(publisher(nodes[i]).run) for i in (0, 1)]
            keys = [nodes[i].identity.public_key for i in (0, 1)]
            for renter in nodes[2:]:
                await wait_until(lambda: all(renter.book.held(k) for k in keys))
            first = [p.live.seq for p in pubs]
            entry = nodes[3].book.held(keys[0])
            assert entry.gpu_count == 2 and entry.offer.provider == keys[0]
            assert entry.offer.gpus[0].model == "NVIDIA H100 80GB HBM3"  # from the GPU probe

            # re-announce: seq + 1 replaces the held offer everywhere
            await pubs[0].publish()
            assert pubs[0].live.seq == first[0] + 1
            for renter in nodes[2:]:
                await wait_until(lambda: held_seq(renter, keys[0]) == first[0] + 1)
                assert len(renter.book) == 2

            # withdrawal (capacity rented): gone from every book, the other provider stays
            await pubs[0].withdraw()
            for node in nodes:
                await wait_until(lambda: node.book.held(keys[0]) is None)
                assert held_seq(node, keys[1]) == first[1]
            nursery.cancel_scope.cancel()

        # accepted offers were persisted, withdrawn ones deleted again, and the counters were
        # flushed
        renter = nodes[3]
        await renter.service.flush()
        assert await renter.store.offers_of(keys[0]) == []
        assert [r.seq for r in await renter.store.offers_of(keys[1])] == [first[1]]
        counters = await renter.store.counters("offers.gossip.")
        assert counters["offers.gossip.accept.offer"] >= 3
        assert counters["offers.gossip.accept.withdrawal"] >= 1
        assert not [k for k in counters if ".reject." in k]


async def test_offers__reannounced_automatically_before_expiry(tmp_path):
    async with market(2, tmp_path) as (prov, renter):
        await connect_and_mesh([prov, renter], [(0, 1)])
        async with trio.open_nursery() as nursery:
            pub = await nursery.start(publisher(prov, provider_config(lifetime_ms=1500)).run)
            key = prov.identity.public_key
            seq0 = pub.live.seq
            await wait_until(lambda: held_seq(renter, key) == seq0)
            # at 2/3 of 1.5 s the provider publishes seq + 1, well before the offer expires
            await wait_until(lambda: held_seq(renter, key) == seq0 + 1, timeout=2.0)
            await wait_until(lambda: held_seq(renter, key) == seq0 + 2, timeout=2.0)
            assert renter.service.counters["offers.expired"] == 0
            nursery.cancel_scope.cancel()


async def test_offers__expired_offer_is_evicted_at_its_deadline_and_a_relayed_offer_is_accepted(tmp_path):
    async with market(2, tmp_path) as (relay, renter):
        await connect_and_mesh([relay, renter], [(0, 1)])
        rng = random.Random(7)
        peer, _, binding = make_provider(rng)  # a provider that is not on the network
        now = renter.service.now_ms()
        offer = make_offer(peer, binding, rng, now, lifetime_ms=1000)
        await relay.host.publish(OFFER_TOPIC, offer.encode())  # relayed, not the provider's node
        await wait_until(lambda: renter.book.held(peer.public) is not None)
        skew = TEST_PARAMS.clock_skew_ms
        deadline_ms = offer.expires_ms + skew
        await wait_until(lambda: renter.book.held(peer.public) is None, timeout=3.0)
        evicted_at = renter.service.now_ms()
        assert deadline_ms < evicted_at < deadline_ms + 500
        assert renter.service.counters["offers.expired"] == 1
        assert renter.book.next_deadline() is None


async def test_offers__restarted_provider_continues_its_seq_from_the_store(tmp_path):
    seed = os.urandom(32)
    async with trio.open_nursery() as outer:
        renter = await start_node(outer, tmp_path / "renter.db")
        for run in range(2):
            async with trio.open_nursery() as nursery:
                prov = await start_node(nursery, tmp_path / "provider.db", seed=seed)
                await connect_and_mesh([prov, renter], [(0, 1)])
                pub = await nursery.start(publisher(prov).run)
                key = prov.identity.public_key
                if run == 0:
                    await pub.publish()
                    last = pub.live.seq
                    await wait_until(lambda: held_seq(renter, key) == last)
                else:
                    # exactly last + 1: the seq came from the store (a fresh store would start
                    # at the clock in ms); the withdrawal reused the offer's seq, as specified
                    assert pub.live.seq == last + 1
                    await wait_until(lambda: held_seq(renter, key) == last + 1)
                    assert renter.service.counters["offers.gossip.reject.equivocation"] == 0
                await pub.withdraw()
                await wait_until(lambda: renter.book.held(key) is None)
                # close the connections as a process exit would: a cancelled py-libp2p host
                # leaves them open, and the renter would keep a stale mesh entry for this peer id
                with trio.move_on_after(2):
                    await prov.host.host.close()
                nursery.cancel_scope.cancel()
            await prov.store.close()  # after the service's final flush
        outer.cancel_scope.cancel()


async def test_offers__provider_without_gpu_refuses_to_publish(tmp_path):
    async with market(1, tmp_path) as (node,):
        for nvml in (FakeNvml.with_gpus(0), FakeNvml.with_gpus(1, init_error=9)):
            pub = OfferPublisher(node.service, node.identity, binding_for(node.identity),
                                 provider_config(), nvml=nvml)
            async with trio.open_nursery() as nursery:
                with pytest.raises(NoGpuError):
                    await nursery.start(pub.run)
            assert pub.live is None
        assert node.service.counters["offers.published"] == 0
        assert len(node.book) == 0
        assert await node.store.counters("provider.") == {}


async def test_offers__publishing_is_rate_limited_by_a_token_bucket(tmp_path):
    async with market(1, tmp_path) as (node,):
        async with trio.open_nursery() as nursery:
            pub = await nursery.start(publisher(node, provider_config(interval_s=0.25, burst=2)).run)
            t0 = trio.current_time()
            for _ in range(4):  # the first publish used one token; one left, then 0.25 s each
                await pub.publish()
            # a lower bound only: the publisher waits on its bucket (the exact wait is checked on
            # trio's virtual clock in tests/node/test_ratelimit.py, whatever the machine's load)
            assert trio.current_time() - t0 >= 0.45
            assert node.service.counters["offers.published"] == 5
            nursery.cancel_scope.cancel()


def test_sync_frames__chunks_respect_the_frame_limit_and_round_trip():
    rng = random.Random(3)
    raws = [rng.randbytes(rng.choice((100, 300, 2000, 16000))) for _ in range(200)]
    frames = chunk_offers(raws, 40_000)
    assert len(frames) > 1 and all(len(f) <= 40_000 for f in frames)
    assert [x for f in frames for x in decode_sync_frame(f, 40_000)] == raws


async def test_sync__joining_renter_gets_the_whole_market_published_before_it_started(tmp_path):
    async with market(3, tmp_path) as nodes:
        await connect_and_mesh(nodes, [(0, 2), (1, 2)])
        rng = random.Random(11)
        relayed = []
        async with trio.open_nursery() as nursery:
            pubs = [await nursery.start(publisher(nodes[i]).run) for i in (0, 1)]
            for _ in range(20):  # plus offers of providers that are not online themselves
                peer, _, binding = make_provider(rng)
                relayed.append(make_offer(peer, binding, rng, nodes[2].service.now_ms()))
                await nodes[2].host.publish(OFFER_TOPIC, relayed[-1].encode())
                await trio.sleep(0.1)  # back-to-back publishes overflow py-libp2p's peer queues
            expected = {p.key.public for p in pubs} | {o.provider for o in relayed}
            for node in nodes:
                await wait_until(lambda: {e.provider for e in node.book} == expected)

            async with trio.open_nursery() as late:
                # the joiner listens on another topic: whatever it holds came by sync alone
                # (otherwise gossip's replay to new subscribers delivers part of the market)
                joiner = await start_node(late, tmp_path / "joiner.db", config=OfferServiceConfig(
                    topic=OFFER_TOPIC + "-elsewhere", flush_interval_s=0.2))
                await joiner.host.connect_all([nodes[0].host.addrs()[0], nodes[2].host.addrs()[0]])
                results = await joiner.service.sync()  # within its own timeout: error is None
                assert {e.provider for e in joiner.book} == expected
                assert len(results) == 2 and all(r.error is None for r in results)
                assert all(r.offers == len(expected) for r in results)
                assert sum(r.accepted for r in results) == len(expected)
                assert joiner.service.counters["offers.sync.accept.offer"] == len(expected)
                assert joiner.service.counters["offers.sync.ignore.duplicate"] == len(expected)
                late.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


def test_byte_budget__spends_refills_and_forgets_refilled_peers_first():
    b = ByteBudget(rate=100, burst=1000, max_peers=2)
    assert b.take("a", 800, now=0) and not b.take("a", 300, now=0)  # 200 left
    assert b.take("a", 300, now=1)  # +100 after 1 s
    assert b.available("a", now=100) == 1000  # never above the burst
    assert b.take("b", 1000, now=100) and b.available("b", now=100) == 0
    assert b.take("c", 10, now=100) and len(b) == 2  # "a" was full again: forgotten first
    assert b.available("b", now=100) == 0  # the spent budget of "b" is remembered
    assert b.take("d", 10, now=100) and len(b) == 2  # none full: the least recently used goes
    with pytest.raises(ValueError):
        ByteBudget(rate=0, burst=1, max_peers=1)


def test_iter_frames__lazy_and_equal_to_chunk_offers():
    offers = [bytes([i]) * (100 + 7 * i) for i in range(200)]  # 100 .. 1,493 bytes
    frames = iter_frames(iter(offers), 4096)
    first = next(frames)  # one frame encoded, the rest not yet
    assert [first, *frames] == chunk_offers(offers, 4096)
    assert all(len(f) <= 4096 for f in chunk_offers(offers, 4096))
    assert [x for f in chunk_offers(offers, 4096) for x in decode_sync_frame(f, 4096)] == offers
