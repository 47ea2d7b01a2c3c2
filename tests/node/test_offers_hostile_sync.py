"""A hostile peer speaking real libp2p against a running node's offer sync and offer book
(issue 11, items 4 and 5): silent sync streams, a sync response's memory, the per-peer byte
budget, fat Sybil offers against the book's byte bound, and the store's pruning."""

from __future__ import annotations

import os

import trio
from libp2p.custom_types import TProtocol

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC, SYNC_PROTOCOL, OfferService, OfferServiceConfig, encode_sync_request
from node.reqresp import read_frame, write_frame
from node.store import Store
from node.testing import LOOPBACK
from protocol.offerbook import OfferBook
from tests.node.offer_helpers import TEST_PARAMS, Node, start_node, wait_until
from tests.protocol.book_helpers import fat_offer, offer, provider

FAT = len(fat_offer(0).encode())  # 9,911 bytes: 64 GPUs with the longest names allowed


async def start_attacker(nursery: trio.Nursery, victim: Node) -> GossipHost:
    host = await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                                          HostConfig(listen_addrs=LOOPBACK)).run)
    await host.connect(victim.host.addrs()[0])
    return host


def fill_book(node: Node, first: int, n: int, *, fat: bool = True) -> int:
    """Ingest ``n`` offers of fresh providers into ``node``'s book; returns their wire bytes."""
    now = node.service.now_ms()
    total = 0
    for i in range(first, first + n):
        raw = (fat_offer(i, now=now) if fat else offer(i, now=now)).encode()
        assert node.service.ingest(raw, "test", None).value == "accept"
        total += len(raw)
    return total


async def open_sync(attacker: GossipHost, victim: Node):
    return await attacker.host.new_stream(victim.host.peer_id, [TProtocol(SYNC_PROTOCOL)])


async def read_response(stream, max_frame: int, timeout: float) -> tuple[int, bool]:
    """(frame bytes read, whether the response ended with the end frame) until the end frame,
    a reset, or ``timeout``; bounded by the frames a response can hold."""
    got = 0
    with trio.move_on_after(timeout):
        for _ in range(10_000):
            try:
                frame = await read_frame(stream, max_frame=max_frame, timeout=timeout)
            except Exception:
                return got, False
            if frame == b"\x90":
                return got, True
            got += len(frame)
    return got, False


async def test_sync_hostile__silent_streams_from_one_peer_do_not_stop_honest_syncs(tmp_path):
    # The attack from issue 11: eight silent sync streams from one peer, reopened as soon as
    # they are cut, for the whole test. Every one of 15 honest syncs (3 peers x 5) is served.
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db")
        book_bytes = fill_book(victim, 30_000, 20, fat=False)
        honest = [await start_node(nursery, tmp_path / f"honest{i}.db") for i in range(3)]
        for h in honest:
            await h.host.connect(victim.host.addrs()[0])
        attacker = await start_attacker(nursery, victim)
        opened = 0
        stop = trio.Event()

        async def silent_stream() -> None:
            nonlocal opened
            for _ in range(2_000):  # bounded; in practice ended by `stop`
                if stop.is_set():
                    return
                try:
                    stream = await open_sync(attacker, victim)
                except Exception:
                    await trio.sleep(0.05)
                    continue
                opened += 1
                with trio.move_on_after(10):
                    try:
                        while await stream.read(1):
                            pass
                    except Exception:
                        pass  # cut by the victim: open another
                with trio.move_on_after(0.5):
                    try:
                        await stream.reset()
                    except Exception:
                        pass
                await trio.sleep(0.01)

        async with trio.open_nursery() as attack:
            for _ in range(8):
                attack.start_soon(silent_stream)
            await wait_until(lambda: opened >= 8, timeout=5)
            await trio.sleep(0.3)  # the slots are taken, if they can be
            results = []
            for _ in range(5):
                async with trio.open_nursery() as syncs:
                    for h in honest:
                        async def one(h=h):
                            results.extend(await h.service.sync([victim.host.peer_id], timeout=3))
                        syncs.start_soon(one)
            stop.set()
            attack.cancel_scope.cancel()
        served = [r for r in results if r.error is None and r.offers == 20]
        c = victim.service.counters
        print(f"honest syncs served: {len(served)}/15; attacker streams opened: {opened}; "
              f"cut busy_peer: {c['offers.sync_serve.busy_peer']}, "
              f"timeout: {c['offers.sync_serve.timeout']}; book {book_bytes} B")
        assert len(results) == 15
        assert len(served) == 15, [r.error for r in results]
        assert c["offers.sync_serve.busy_peer"] > 0  # the attacker's extra streams were cut
        nursery.cancel_scope.cancel()


async def test_sync_hostile__response_is_encoded_as_sent_one_frame_in_flight(tmp_path, monkeypatch):
    # A 4 MB book (400 fat offers) and a 4-byte request, from each of 4 peers at once: the
    # server may hold the snapshot (references) and one encoded frame per response, never a
    # response. Measured as frames in flight: bytes the sync server's msgpack encoder produced
    # minus bytes write_frame has finished writing. (tracemalloc over the process is no measure here:
    # the readers are in this process too and py-libp2p's yamux buffers on their side what
    # arrives faster than they read, and sampling snapshots stalls the event loop for seconds.)
    import msgpack

    import node.offers as offers_module

    frame = 64 * 1024
    in_flight = {"now": 0, "peak": 0}
    real_write = offers_module.write_frame

    class CountingMsgpack:  # node.offers' msgpack, counting the frames it encodes
        def __getattr__(self, name):
            return getattr(msgpack, name)

        @staticmethod
        def packb(obj, **kw):
            out = msgpack.packb(obj, **kw)
            if kw.get("use_bin_type"):  # offer frames (requests and the end frame are not)
                in_flight["now"] += len(out)
                in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
            return out

    async def counting_write(stream, payload, **kw):
        await real_write(stream, payload, **kw)
        if payload != b"\x90":  # written: no longer held by the server
            in_flight["now"] -= len(payload)

    monkeypatch.setattr(offers_module, "msgpack", CountingMsgpack())
    monkeypatch.setattr(offers_module, "write_frame", counting_write)
    cfg = OfferServiceConfig(flush_interval_s=0.2, sync_max_frame=frame)
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db", config=cfg)
        book_bytes = fill_book(victim, 40_000, 400)
        attackers = [await start_attacker(nursery, victim) for _ in range(4)]
        results = []

        async def one(attacker):
            stream = await open_sync(attacker, victim)
            await real_write(stream, encode_sync_request(0))
            results.append(await read_response(stream, frame, timeout=30))

        async with trio.open_nursery() as reads:
            for a in attackers:
                reads.start_soon(one, a)
        print(f"book {book_bytes} B in {len(victim.book)} offers; 4 responses of "
              f"{[got for got, _ in results]} B; peak encoded bytes in flight {in_flight['peak']} B")
        assert all(ended and got >= book_bytes for got, ended in results)  # all served ...
        assert in_flight["peak"] <= 4 * frame  # ... one frame in flight per response at most
        nursery.cancel_scope.cancel()


async def test_sync_hostile__byte_budget_per_peer_is_enforced(tmp_path):
    # Budget 100 kB per peer (refill 1 kB/s), a 600 kB book: a request gets at most the budget
    # and then a reset; the next one is refused at once; another peer has its own budget.
    budget = 100_000
    cfg = OfferServiceConfig(flush_interval_s=0.2, sync_max_frame=16 * 1024,
                             sync_peer_burst_bytes=budget, sync_peer_bytes_per_s=1000)
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db", config=cfg)
        book_bytes = fill_book(victim, 50_000, 60)
        attacker = await start_attacker(nursery, victim)
        c = victim.service.counters
        got = []
        for _ in range(2):
            stream = await open_sync(attacker, victim)
            await write_frame(stream, encode_sync_request(0))
            got.append(await read_response(stream, 16 * 1024, timeout=5))
        print(f"book {book_bytes} B; budget {budget} B; server sent {c['offers.sync_serve.bytes']} B;"
              f" the reader got {got[0][0]} B before the stream was reset, then {got[1][0]} B")
        assert got[0][0] <= budget and not got[0][1]  # cut at the budget, no end frame
        assert got[1] == (0, False)
        assert c["offers.sync_serve.budget_exhausted"] == 1
        assert c["offers.sync_serve.budget_refused"] == 1
        assert c["offers.sync_serve.bytes"] <= budget
        honest = await start_node(nursery, tmp_path / "honest.db")
        await honest.host.connect(victim.host.addrs()[0])
        (r,) = await honest.service.sync([victim.host.peer_id], timeout=3)
        assert 0 < r.bytes <= budget and r.accepted > 0  # its own budget, not the attacker's
        nursery.cancel_scope.cancel()


async def test_sync_hostile__fat_sybil_flood_over_gossip_stays_under_the_byte_bound(tmp_path):
    # book_max_bytes 60 kB; an honest provider's slim offer is held first (for longer than
    # book_established_ms, 3 s here); then 30 fat, cheaper Sybil offers (9.9 kB each, 297 kB)
    # arrive over gossip from fresh keys. The book and the store stay under the bound and keep
    # the honest offer, the node's search (default sort) lists it above the Sybils; a provider
    # with a good record still gets in, evicting the newest Sybils, whose stored copies are
    # deleted.
    from types import SimpleNamespace

    from node.control import ControlServer

    cap = 60_000
    params = TEST_PARAMS.replace(book_max_bytes=cap, book_established_ms=3000)
    good = provider(61_000)[0].public
    async with trio.open_nursery() as nursery:
        identity = NodeIdentity.from_seed(os.urandom(32))
        host = await nursery.start(GossipHost(identity, HostConfig(listen_addrs=LOOPBACK)).run)
        store = await Store.open(tmp_path / "victim.db", synchronous="NORMAL")
        book = OfferBook(params, score_of=lambda p: 0.9 if p == good else 0.5)
        service = OfferService(host, store, params, book=book,
                               config=OfferServiceConfig(flush_interval_s=0.2))
        await nursery.start(service.run)
        victim = Node(host, service, store, identity)
        attacker = await start_attacker(nursery, victim)
        await wait_until(lambda: victim.host.peer_id in attacker.pubsub.peer_topics.get(OFFER_TOPIC, ()))
        honest = offer(60_000, now=service.now_ms(), price_per_gpu_second=300)
        await attacker.publish(OFFER_TOPIC, honest.encode())  # relayed: accepted like any relay
        await wait_until(lambda: book.held(honest.provider) is not None)
        await trio.sleep(3.1)  # the honest provider is now established
        c = service.counters
        for n in range(30):
            await attacker.publish(OFFER_TOPIC, fat_offer(60_001 + n, now=service.now_ms()).encode())
            await trio.sleep(0.01)
        await wait_until(lambda: c["offers.gossip.accept.offer"] + c["offers.gossip.ignore.book_full"] == 31)
        # only its book is read (Node.search also keeps only offers for its own escrow)
        node = SimpleNamespace(book=book, search=lambda q, s, *, limit, at_ms: book.query(
            q, s, limit=limit, now_ms=at_ms))
        control = ControlServer(node, tmp_path)
        ranked = await control.op_search("")
        by_price = await control.op_search("", sort="price")
        honest_id = book.held(honest.provider).offer_id
        assert ranked[0]["offer_id"] == honest_id and ranked[0]["tier"] == "established"
        assert {r["tier"] for r in ranked[1:]} == {"new"}
        assert by_price[-1]["offer_id"] == honest_id  # by price alone the Sybils come first
        await service.flush()
        rows, stored = await store.offer_rows()
        print(f"after the flood: book {len(book)} offers {book.bytes} B (cap {cap}); store {rows} "
              f"rows {stored} B; refused {c['offers.gossip.ignore.book_full']}")
        assert book.bytes <= cap and book.held(honest.provider) is not None
        assert c["offers.gossip.ignore.book_full"] >= 30 - cap // FAT
        assert stored <= cap
        before = {e.provider for e in book}
        await attacker.publish(OFFER_TOPIC, fat_offer(61_000, now=service.now_ms()).encode())
        await wait_until(lambda: book.held(good) is not None)
        await service.flush()
        rows, stored = await store.offer_rows()
        assert book.bytes <= cap and stored <= cap and book.held(honest.provider) is not None
        assert c["offers.evicted"] >= 1 and len(before - {e.provider for e in book}) == c["offers.evicted"]
        nursery.cancel_scope.cancel()


async def test_sync_hostile__offers_seen_is_pruned_on_a_schedule(tmp_path):
    # Offers superseded by a higher seq leave the store when the newer one is written, offers
    # that expired within a prune interval; only each provider's newest live offer stays.
    cfg = OfferServiceConfig(flush_interval_s=0.1, prune_interval_s=0.3)
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db", config=cfg)
        now = victim.service.now_ms()
        for i in range(5):  # short-lived: expire after 1.2 s (+ 0.3 s skew)
            raw = offer(70_000 + i, now=now, lifetime_ms=1200).encode()
            assert victim.service.ingest(raw, "test", None).value == "accept"
        for seq in (1, 2, 3):  # one long-lived provider re-announcing
            raw = offer(70_010, seq=seq, now=now).encode()
            assert victim.service.ingest(raw, "test", None).value == "accept"
        await victim.service.flush()
        assert (await victim.store.offer_rows())[0] == 6  # seq 1 and 2 of 70_010 are gone
        key = provider(70_010)[0].public

        async def rows():
            return await victim.store._run(
                victim.store._all, "SELECT provider_key, seq FROM offers_seen ORDER BY seq")

        with trio.fail_after(5):
            while await rows() != [(key, 3)]:
                await trio.sleep(0.1)
        assert victim.service.counters["offers.store_pruned"] == 5
        nursery.cancel_scope.cancel()


async def test_sync_hostile__one_sync_peer_fills_at_most_its_share_of_the_book(tmp_path):
    # A joining node (book_max_bytes 60 kB) syncs first from a hostile peer that serves 30 fat
    # offers of fresh keys (297 kB), then from an honest peer with 10 slim offers. The hostile
    # peer's offers stop at a third of the book (sync_peer_share), so the honest ones, which
    # arrive later and rank below the held ones, still fit.
    from node.offers import chunk_offers

    cap = 60_000
    params = TEST_PARAMS.replace(book_max_bytes=cap)
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db", params=params)
        honest = await start_node(nursery, tmp_path / "honest.db")
        honest_bytes = fill_book(honest, 80_000, 10, fat=False)
        attacker = await start_attacker(nursery, victim)
        now = victim.service.now_ms()
        sybils = [fat_offer(80_100 + i, now=now).encode() for i in range(30)]

        async def hostile_server(stream):
            await read_frame(stream, timeout=2)
            for frame in chunk_offers(sybils, 256 * 1024):
                await write_frame(stream, frame, max_frame=256 * 1024)
            await write_frame(stream, b"\x90")

        attacker.host.set_stream_handler(TProtocol(SYNC_PROTOCOL), hostile_server)
        await victim.host.connect(honest.host.addrs()[0])
        (r1,) = await victim.service.sync([attacker.peer_id], timeout=5)
        (r2,) = await victim.service.sync([honest.host.peer_id], timeout=5)
        print(f"hostile peer: {r1.accepted} offers, {r1.accepted_bytes} B taken ({r1.error}); "
              f"honest peer: {r2.accepted} of 10 ({r2.error}); book {victim.book.bytes} B of {cap}")
        assert r1.error == "sync_share_full" and r1.accepted_bytes < cap / 3 + FAT
        assert r2.error is None and r2.accepted == 10 and r2.accepted_bytes == honest_bytes
        assert victim.book.bytes <= cap
        nursery.cancel_scope.cancel()
