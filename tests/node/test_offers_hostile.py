"""Bad input at a running node, from a real second host: on the offer topic and on offer sync.
Each bad message must be counted under its reason code, reach neither the book nor the store,
and leave the node able to ingest an honest provider's offer."""

import dataclasses
import hashlib
import random

import msgpack
import trio
from libp2p.custom_types import TProtocol

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC, SYNC_PROTOCOL, OfferServiceConfig, chunk_offers, encode_sync_request
from node.reqresp import encode_uvarint, read_frame, write_frame
from node.testing import LOOPBACK
from protocol.messages import OfferWithdrawal
from protocol.samples import make_offer, make_provider
from tests.node.offer_helpers import connect_and_mesh, publisher, start_node, wait_until

HOUR_MS = 3_600_000


def bad_gossip(rng, now):
    """(payload, expected counter) pairs, plus the valid offers an attacker may relay."""
    peer, _, binding = make_provider(rng)
    seq1 = make_offer(peer, binding, rng, now - 1000, seq=1)
    seq2 = make_offer(peer, binding, rng, now, seq=2)
    seq3a = make_offer(peer, binding, rng, now, seq=3, price_per_gpu_second=100)
    seq3b = make_offer(peer, binding, rng, now, seq=3, price_per_gpu_second=200)
    forged = dataclasses.replace(seq3a, terms=dataclasses.replace(seq3a.terms, price_per_gpu_second=1))
    other, _, other_binding = make_provider(rng)
    expired = make_offer(other, other_binding, rng, now - 2 * HOUR_MS, lifetime_ms=HOUR_MS)
    future = make_offer(other, other_binding, rng, now + HOUR_MS)
    withdrawal = OfferWithdrawal(provider=peer.public, seq=3, created_ms=now).sign(peer)
    forged_withdrawal = dataclasses.replace(withdrawal, seq=4)
    good = [seq2.encode(), seq3a.encode()]  # relayed by the attacker: valid, accepted
    bad = [
        (b"\xc1", "reject.malformed"),
        (seq2.encode()[:1] + b"\xcc\x01" + seq2.encode()[2:], "reject.non_canonical"),  # type 1 as uint8
        (seq2.encode()[:5] + bytes(17 * 1024), "reject.oversized"),
        (msgpack.packb([99, 1]), "reject.unknown_type"),
        (forged.encode(), "reject.bad_signature"),
        (seq3b.encode(), "reject.equivocation"),
        (seq1.encode(), "ignore.stale_seq"),  # replay of an older offer never seen here
        (expired.encode(), "ignore.expired"),
        (future.encode(), "ignore.from_future"),
        (forged_withdrawal.encode(), "reject.bad_signature"),
    ]
    return good, bad


async def test_hostile__bad_gossip_and_bad_sync_are_counted_and_never_stored(tmp_path):
    rng = random.Random(5)
    cfg = OfferServiceConfig(flush_interval_s=0.2, sync_request_timeout_s=0.5)
    async with trio.open_nursery() as nursery:
        victim = await start_node(nursery, tmp_path / "victim.db", config=cfg)
        honest = await start_node(nursery, tmp_path / "honest.db")
        attacker = await nursery.start(
            GossipHost(NodeIdentity.from_seed(rng.randbytes(32)), HostConfig(listen_addrs=LOOPBACK)).run)
        await connect_and_mesh([victim, honest], [(1, 0)])
        await attacker.connect(victim.host.addrs()[0])
        # the attacker is not subscribed: it publishes through fanout, whatever its score
        await wait_until(lambda: victim.host.peer_id in attacker.pubsub.peer_topics.get(OFFER_TOPIC, ()))

        # ---- gossip ----
        good, bad = bad_gossip(rng, victim.service.now_ms())
        for payload in good:
            await attacker.publish(OFFER_TOPIC, payload)
        await wait_until(lambda: victim.service.counters["offers.gossip.accept.offer"] == 2)
        for payload, _ in bad:
            await attacker.publish(OFFER_TOPIC, payload)
            await trio.sleep(0.02)
        expected = {}
        for _, name in bad:
            expected[f"offers.gossip.{name}"] = expected.get(f"offers.gossip.{name}", 0) + 1
        c = victim.service.counters
        await wait_until(lambda: all(c[k] == v for k, v in expected.items()))
        assert victim.host.score(attacker.peer_id, OFFER_TOPIC) < 0  # REJECTs cost it score
        assert honest.service.counters["offers.gossip.accept.offer"] == 2  # only the good relayed

        # ---- sync: the victim fetches from a hostile server ----
        forged_raw = bad[4][0]
        valid_raw = make_offer(*make_provider(rng)[::2], rng, victim.service.now_ms()).encode()
        modes = {
            "mixed": [forged_raw, b"\xc1", valid_raw],
            "withdrawal": [bad[9][0]],
        }
        mode = "mixed"

        async def hostile_server(stream):
            await read_frame(stream, timeout=2)
            if mode in modes:
                for frame in chunk_offers(modes[mode], 256 * 1024):
                    await write_frame(stream, frame)
                await write_frame(stream, msgpack.packb([]))
            elif mode == "huge_frame":
                await stream.write(encode_uvarint(10_000_000))
            elif mode == "not_bytes":
                await write_frame(stream, msgpack.packb([1, 2]))
            elif mode == "silent":
                await trio.sleep(5)

        attacker.host.set_stream_handler(TProtocol(SYNC_PROTOCOL), hostile_server)
        (r,) = await victim.service.sync([attacker.peer_id], timeout=2)
        assert (r.error, r.offers, r.accepted, r.rejected) == (None, 3, 1, 2)
        outcomes = {}
        for mode in ("withdrawal", "huge_frame", "not_bytes", "silent"):
            (r,) = await victim.service.sync([attacker.peer_id], timeout=1)
            outcomes[mode] = r.error
        # "silent" ends in "timeout", not in the server's close 5 s later: the 1 s deadline fired
        assert outcomes == {"withdrawal": None, "huge_frame": "frame_too_large",
                            "not_bytes": "bad_sync_frame", "silent": "timeout"}
        for name in ("sync.reject.bad_signature", "sync.reject.malformed", "sync.accept.offer",
                     "sync.reject.unexpected_type", "sync.fail.frame_too_large",
                     "sync.fail.bad_sync_frame", "sync.fail.timeout"):
            assert c[f"offers.{name}"] == 1, name

        # ---- sync: a hostile client at the victim's server ----
        silent = await attacker.host.new_stream(victim.host.peer_id, [TProtocol(SYNC_PROTOCOL)])
        garbled = await attacker.host.new_stream(victim.host.peer_id, [TProtocol(SYNC_PROTOCOL)])
        await write_frame(garbled, b"\xc1")
        await wait_until(lambda: c["offers.sync_serve.timeout"] == 1 and c["offers.sync_serve.malformed"] == 1,
                         timeout=2)
        # ... and the server still answers an honest client
        (r,) = await honest.service.sync([victim.host.peer_id], timeout=2)
        assert r.error is None and r.offers == 2 and c["offers.sync_serve.ok"] == 1

        # ---- the honest provider is still heard ----
        def d(raw):
            return hashlib.sha256(raw).digest()

        async with trio.open_nursery() as prov:
            pub = await prov.start(publisher(honest).run)
            honest_digest = pub.live.digest
            await wait_until(lambda: victim.book.held(honest.identity.public_key) is not None)
            assert c["offers.gossip.accept.offer"] == 3
            # ---- nothing invalid in the book ...
            assert {e.digest for e in victim.book} == {d(good[1]), d(valid_raw), honest_digest}
            await victim.service.flush()
            stored = await victim.store._run(lambda: {
                row[0] for row in victim.store._conn.execute("SELECT digest FROM offers_seen")})
            prov.cancel_scope.cancel()
        # ---- ... nor in the store (good[0] was superseded by good[1]), and the counters were
        # flushed there
        assert stored == {d(good[1]), d(valid_raw), honest_digest}
        await wait_until(lambda: victim.book.held(honest.identity.public_key) is None)  # withdrawn
        await victim.service.flush()
        assert await victim.store._run(lambda: {
            row[0] for row in victim.store._conn.execute("SELECT digest FROM offers_seen")}
        ) == {d(good[1]), d(valid_raw)}  # the withdrawn offer's row went with it
        counters = await victim.store.counters("offers.")
        for k, v in expected.items():
            assert counters[k] == v, k
        assert counters["offers.sync.fail.timeout"] == 1
        nursery.cancel_scope.cancel()
