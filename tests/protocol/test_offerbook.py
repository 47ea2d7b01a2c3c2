"""The renter's offer book: replacement, withdrawal, expiry, caps, ids, snapshot."""

from __future__ import annotations

import dataclasses

import pytest

from tests.protocol.book_helpers import NOW, fat_offer, offer, provider, withdrawal
from protocol.errors import Ignore, LocalProtocolError, Reject
from protocol.offerbook import OfferBook, model_token, vram_gib
from protocol.params import Params
from protocol.samples import GPU_MODELS
from protocol.validation import BindingCache

PARAMS = Params()
SHARED_BINDINGS = BindingCache(1000)  # verified bindings reused across tests (speed only)


def new_book(params: Params = PARAMS, **kw) -> OfferBook:
    return OfferBook(params, bindings=SHARED_BINDINGS, **kw)


def test_offerbook__higher_seq_replaces_lower():
    book = new_book()
    book.ingest_offer(offer(1, seq=1).encode(), NOW)
    newer = offer(1, seq=2, price_per_gpu_second=200).encode()
    book.ingest_offer(newer, NOW)
    assert len(book) == 1
    assert book.snapshot() == [newer]
    assert book.query("")[0].seq == 2


def test_offerbook__older_seq_ignored_and_book_unchanged():
    book = new_book()
    newer = offer(1, seq=5).encode()
    book.ingest_offer(newer, NOW)
    with pytest.raises(Ignore) as exc:
        book.ingest_offer(offer(1, seq=4).encode(), NOW)
    assert exc.value.code == "stale_seq"
    assert book.snapshot() == [newer]


def test_offerbook__duplicate_ignored():
    book = new_book()
    data = offer(1).encode()
    book.ingest_offer(data, NOW)
    with pytest.raises(Ignore) as exc:
        book.ingest_offer(data, NOW)
    assert exc.value.code == "duplicate"


def test_offerbook__equivocation_rejected():
    book = new_book()
    book.ingest_offer(offer(1, seq=3, price_per_gpu_second=100).encode(), NOW)
    with pytest.raises(Reject) as exc:
        book.ingest_offer(offer(1, seq=3, price_per_gpu_second=101).encode(), NOW)
    assert exc.value.code == "equivocation"
    assert book.query("")[0].price_per_gpu_hour == 100 * 3600


def test_offerbook__validation_errors_propagate_with_their_code():
    book = new_book()
    good = offer(1)
    forged = dataclasses.replace(good, signature=bytes(64)).encode()
    with pytest.raises(Reject) as exc:
        book.ingest_offer(forged, NOW)
    assert exc.value.code == "bad_signature"
    with pytest.raises(Reject) as exc:
        book.ingest_offer(b"\x93\x01\x01", NOW)
    assert exc.value.code == "truncated"
    assert len(book) == 0


def test_offerbook__withdrawal_evicts_and_blocks_older_seqs():
    book = new_book()
    book.ingest_offer(offer(1, seq=3).encode(), NOW)
    book.ingest_offer(offer(2, seq=1).encode(), NOW)
    book.ingest_withdrawal(withdrawal(1, seq=3), NOW + 1)
    assert [e.provider for e in book] == [provider(2)[0].public]
    with pytest.raises(Ignore) as exc:
        book.ingest_offer(offer(1, seq=2).encode(), NOW + 2)
    assert exc.value.code == "withdrawn"
    book.ingest_offer(offer(1, seq=4).encode(), NOW + 2)  # a new seq is welcome again
    assert len(book) == 2


def test_offerbook__withdrawal_of_older_seq_keeps_newer_offer():
    book = new_book()
    book.ingest_offer(offer(1, seq=5).encode(), NOW)
    book.ingest_withdrawal(withdrawal(1, seq=4), NOW)
    assert len(book) == 1
    with pytest.raises(Ignore) as exc:
        book.ingest_withdrawal(withdrawal(1, seq=4), NOW)
    assert exc.value.code == "duplicate"


def test_offerbook__withdrawal_before_offer_blocks_it():
    book = new_book()
    book.ingest_withdrawal(withdrawal(1, seq=2), NOW)
    with pytest.raises(Ignore):
        book.ingest_offer(offer(1, seq=2).encode(), NOW)
    assert len(book) == 0


def test_offerbook__expiry_evicts_exactly_after_expiry_plus_skew():
    book = new_book()
    book.ingest_offer(offer(1, lifetime_ms=60_000).encode(), NOW)
    book.ingest_offer(offer(2, lifetime_ms=120_000).encode(), NOW)
    deadline = book.next_deadline()
    assert deadline == NOW + 60_000 + PARAMS.clock_skew_ms + 1
    assert book.expire(deadline - 1) == []
    gone = book.expire(deadline)
    assert [e.provider for e in gone] == [provider(1)[0].public]
    assert book.next_deadline() == NOW + 120_000 + PARAMS.clock_skew_ms + 1
    book.expire(book.next_deadline())
    assert len(book) == 0 and book.next_deadline() is None


def test_offerbook__replaced_offer_does_not_expire_its_successor():
    book = new_book()
    book.ingest_offer(offer(1, seq=1, lifetime_ms=60_000).encode(), NOW)
    book.ingest_offer(offer(1, seq=2, lifetime_ms=600_000).encode(), NOW)
    assert book.next_deadline() == NOW + 600_000 + PARAMS.clock_skew_ms + 1
    assert book.expire(NOW + 300_000) == []
    assert len(book) == 1


def test_offerbook__watermark_kept_until_no_withdrawn_offer_can_live():
    book = new_book()
    book.ingest_withdrawal(withdrawal(1, seq=2, created_ms=NOW), NOW)
    keep = NOW + PARAMS.offer_max_lifetime_ms + PARAMS.clock_skew_ms
    assert book.next_deadline() == keep + 1
    book.expire(keep)
    assert book.watermarks() == 1
    book.expire(keep + 1)
    assert book.watermarks() == 0 and book.next_deadline() is None


def test_offerbook__cap_holds_under_flood_and_keeps_reputable_providers():
    small = PARAMS.replace(book_max_providers=5)
    reputable = {provider(i)[0].public for i in range(3)}
    book = new_book(small, score_of=lambda p: 0.9 if p in reputable else 0.5)
    for i in range(3):
        book.ingest_offer(offer(i, lifetime_ms=60_000).encode(), NOW)
    refused = 0
    for i in range(3, 15):  # unknown newcomers with long-lived offers
        try:
            book.ingest_offer(offer(i, lifetime_ms=3_600_000).encode(), NOW)
        except Ignore as exc:
            assert exc.code == "book_full"
            refused += 1
        assert len(book) <= 5
    assert len(book) == 5
    assert reputable <= {e.provider for e in book}
    assert refused == 12 - 2  # equal-rank newcomers do not displace each other


def test_offerbook__full_book_evicts_soonest_expiring_among_equals():
    small = PARAMS.replace(book_max_providers=2)
    book = new_book(small)
    book.ingest_offer(offer(1, lifetime_ms=60_000).encode(), NOW)
    book.ingest_offer(offer(2, lifetime_ms=120_000).encode(), NOW)
    book.ingest_offer(offer(3, lifetime_ms=180_000).encode(), NOW)
    assert {e.provider for e in book} == {provider(2)[0].public, provider(3)[0].public}


def test_offerbook__byte_cap_holds_under_fat_sybil_flood_and_keeps_known_providers():
    # 20 honest slim offers (517 B) held since NOW; then 200 fat Sybil offers (9.9 KB) from
    # fresh keys, one a second. The book never holds more than book_max_bytes of offers, and
    # the Sybils displace none of the honest offers (all unknown, but held longer).
    cap = 64 * 1024
    book = new_book(PARAMS.replace(book_max_bytes=cap))
    honest = {provider(i)[0].public for i in range(20)}
    for i in range(20):
        book.ingest_offer(offer(i).encode(), NOW)
    refused = 0
    for n in range(200):
        i = 1000 + n
        try:
            book.ingest_offer(fat_offer(i, now=NOW + n * 1000).encode(), NOW + n * 1000)
        except Ignore as exc:
            assert exc.code == "book_full"
            refused += 1
        assert book.bytes == sum(len(e.data) for e in book) <= cap
        assert len(book._by_since) == len(book._by_score) == len(book)
    assert honest <= {e.provider for e in book}
    assert refused > 190  # after the first few fill the room, later (newer) ones are refused
    assert book.bytes <= cap


def test_offerbook__byte_cap_evicts_newest_unknown_first_and_a_known_provider_gets_in():
    # Three unknown fat offers first seen at NOW, NOW+1s, NOW+2s fill the byte cap; a known-good
    # provider's offer evicts the newest (NOW+2s) one; an unknown newcomer is refused.
    size = len(fat_offer(1).encode())
    evicted = []
    good = provider(9)[0].public
    book = new_book(PARAMS.replace(book_max_bytes=3 * size + 100),
                    score_of=lambda p: 0.9 if p == good else 0.5)
    book.on_evict = evicted.append
    for k in range(3):
        book.ingest_offer(fat_offer(1 + k, now=NOW + k * 1000).encode(), NOW + k * 1000)
    with pytest.raises(Ignore) as exc:
        book.ingest_offer(fat_offer(5, now=NOW + 3000).encode(), NOW + 3000)
    assert exc.value.code == "book_full" and len(book) == 3 and not evicted
    book.ingest_offer(fat_offer(9, now=NOW + 4000).encode(), NOW + 4000)
    assert [e.provider for e in evicted] == [provider(3)[0].public]
    assert {e.provider for e in book} == {provider(1)[0].public, provider(2)[0].public, good}
    assert book.bytes == sum(len(e.data) for e in book) <= 3 * size + 100


def _keep_order_consistent(book: OfferBook) -> None:
    """Every entry's keep key is (score, proven, -since_ms, expires_ms, digest), the score index
    holds exactly these keys, and each proven wallet's one proven offer is its first held."""
    entries = list(book._by_score.irange())
    assert len(entries) == len(book)
    for e in entries:
        assert e._skey == (e.score, e.proven, -e.since_ms, e.expires_ms, e.digest)
    assert [e._skey for e in entries] == sorted(e._skey for e in book)
    firsts: dict[bytes, tuple] = {}
    for e in book:
        if book.proven_of(e.wallet):
            firsts[e.wallet] = min(firsts.get(e.wallet, (e.since_ms, e.provider)),
                                   (e.since_ms, e.provider))
    assert {e.provider for e in book if e.proven} == {k[1] for k in firsts.values()}


def test_offerbook__sybil_flood_at_the_cap_keeps_proven_and_known_good_providers():
    # The book filled with Sybil offers first (a node that synced from an attacker), one known-bad
    # provider among them held longest. A proven provider (its wallet paid on the escrow by two
    # renters) and a known-good one arrive later; then a flood of fresh Sybil keys, and the aged
    # Sybils fatten their offers to claim bytes. At the cap the book keeps known-good, proven,
    # then the longest-held unknown offers, and drops the known-bad first. (The old keep order,
    # (score, -since, ...), refused the proven provider: it was newer than every Sybil; and had
    # it been held, the fattening aged Sybils would have pushed it out.)
    slim, fat = len(offer(1).encode()), len(fat_offer(1).encode())
    cap = 8 * slim + 2 * fat
    P, G, X = 500, 501, 502  # proven, known-good, known-bad
    proven_wallet = provider(P)[2].wallet
    good, bad = provider(G)[0].public, provider(X)[0].public
    book = new_book(PARAMS.replace(book_max_providers=10, book_max_bytes=cap),
                    score_of=lambda p: 0.9 if p == good else 0.2 if p == bad else 0.5,
                    proven_of=lambda w: w == proven_wallet)
    evicted: list[bytes] = []
    book.on_evict = lambda e: evicted.append(e.provider)
    book.ingest_offer(offer(X).encode(), NOW)
    aged = [1000 + k for k in range(9)]
    for k, i in enumerate(aged):
        book.ingest_offer(offer(i, now=NOW + k).encode(), NOW + k)
    assert len(book) == 10
    t = NOW + 10_000
    book.ingest_offer(offer(G, now=t).encode(), t)
    assert evicted == [bad]  # known-bad first
    book.ingest_offer(offer(P, now=t + 1).encode(), t + 1)  # the old code: Ignore book_full
    assert evicted[1:] == [provider(aged[-1])[0].public]  # then the newest unknown
    assert book.held(provider(P)[0].public).proven
    keep = {provider(P)[0].public, good}
    refused = 0
    for n in range(120):  # fresh Sybil keys, slim and fat
        now = t + 1000 + n * 500
        make = fat_offer if n % 2 else offer
        try:
            book.ingest_offer(make(2000 + n, now=now).encode(), now)
        except Ignore as exc:
            assert exc.code == "book_full"
            refused += 1
        assert keep <= {e.provider for e in book}
        assert len(book) <= 10 and book.bytes <= cap
    assert refused == 120
    for k, i in enumerate(aged[:-1]):  # the aged Sybils grow their offers: bytes needed
        now = t + 100_000 + k
        try:
            book.ingest_offer(fat_offer(i, seq=2, now=now).encode(), now)
        except Ignore as exc:
            assert exc.code == "book_full"
        assert keep <= {e.provider for e in book}
        assert book.bytes == sum(len(e.data) for e in book) <= cap
        _keep_order_consistent(book)
    assert book.held(provider(P)[0].public).proven


def test_offerbook__aged_sybils_growing_their_offers_do_not_push_out_a_proven_provider():
    # Nine Sybil keys held first, then a proven provider; the book's bytes are nearly full. Each
    # Sybil re-announces a slightly larger offer (2 GPUs): every growth past the byte cap evicts
    # the weakest held offer. The old keep order took the proven provider first (the newest
    # unknown); now it is kept and the newest Sybils go.
    slim = len(offer(1).encode())
    P = 500
    proven_wallet = provider(P)[2].wallet
    book = new_book(PARAMS.replace(book_max_providers=10, book_max_bytes=10 * slim + 300),
                    proven_of=lambda w: w == proven_wallet)
    for k in range(9):
        book.ingest_offer(offer(1000 + k, now=NOW + k).encode(), NOW + k)
    book.ingest_offer(offer(P, now=NOW + 10).encode(), NOW + 10)
    for k in range(8):
        now = NOW + 100 + k
        book.ingest_offer(offer(1000 + k, seq=2, count=2, now=now).encode(), now)
        assert provider(P)[0].public in {e.provider for e in book}
        assert book.bytes <= 10 * slim + 300
    assert len(book) < 10  # growth did evict (Sybils, newest first)
    _keep_order_consistent(book)


def test_offerbook__proven_flag_moves_in_the_keep_order():
    # Two keys of one wallet, held after an unknown provider: the wallet's first held key is its
    # proven offer and ranks above unknown offers. When the wallet becomes proven only later
    # (restand), or its proven offer leaves, the keep keys and the score index follow.
    from tests.protocol.book_helpers import provider_of_wallet
    proven: set[bytes] = set()
    wallet = provider(600)[2].wallet
    good = provider(606)[0].public
    book = new_book(PARAMS.replace(book_max_providers=3), proven_of=lambda w: w in proven,
                    score_of=lambda p: 0.9 if p == good else 0.5)
    book.ingest_offer(offer(603).encode(), NOW)
    book.ingest_offer(offer(601, wallet_of=600, now=NOW + 1).encode(), NOW + 1)
    book.ingest_offer(offer(602, wallet_of=600, now=NOW + 2).encode(), NOW + 2)
    assert not any(e.proven for e in book)
    _keep_order_consistent(book)
    with pytest.raises(Ignore):  # unknown and newest: refused
        book.ingest_offer(offer(604, now=NOW + 3).encode(), NOW + 3)
    proven.add(wallet)
    book.restand({wallet})
    _keep_order_consistent(book)
    first = provider_of_wallet(601, 600)[0].public
    second = provider_of_wallet(602, 600)[0].public
    assert [e.provider for e in book if e.proven] == [first]
    assert book.snapshot_entries()[0].provider == first  # strongest: proven
    book.ingest_withdrawal(withdrawal_of_wallet_key(601, 600, seq=1), NOW + 4)
    _keep_order_consistent(book)
    assert [e.provider for e in book if e.proven] == [second]
    book.ingest_offer(offer(605, now=NOW + 5).encode(), NOW + 5)  # the free slot
    evicted: list[bytes] = []
    book.on_evict = lambda e: evicted.append(e.provider)
    # a known-good newcomer evicts the newest unknown (605), then the older unknown (603), and
    # never the wallet's second key, newer than 603 but now its proven offer
    book.ingest_offer(offer(606, now=NOW + 6).encode(), NOW + 6)
    assert evicted == [provider(605)[0].public]
    good2 = provider(608)[0].public
    book.score_of = lambda p: 0.9 if p in (good, good2) else 0.5
    book.ingest_offer(offer(608, now=NOW + 8).encode(), NOW + 8)
    assert evicted[1:] == [provider(603)[0].public]
    assert {e.provider for e in book} == {second, good, good2}
    _keep_order_consistent(book)
    proven.clear()
    book.restand({wallet})
    _keep_order_consistent(book)
    assert not any(e.proven for e in book)


def withdrawal_of_wallet_key(i: int, owner: int, seq: int) -> bytes:
    from protocol.messages import OfferWithdrawal
    from tests.protocol.book_helpers import provider_of_wallet
    peer = provider_of_wallet(i, owner)[0]
    return OfferWithdrawal(provider=peer.public, seq=seq, created_ms=NOW).sign(peer).encode()


def test_offerbook__offer_larger_than_the_byte_cap_is_refused():
    book = new_book(PARAMS.replace(book_max_bytes=4096))
    with pytest.raises(Ignore) as exc:
        book.ingest_offer(fat_offer(1).encode(), NOW)
    assert exc.value.code == "book_full" and len(book) == 0 and book.bytes == 0


def test_offerbook__bytes_follow_replacement_withdrawal_and_expiry():
    book = new_book()
    book.ingest_offer(offer(1, seq=1).encode(), NOW)
    book.ingest_offer(fat_offer(2).encode(), NOW)
    assert book.bytes == len(offer(1, seq=1).encode()) + len(fat_offer(2).encode())
    book.ingest_offer(fat_offer(1, seq=2).encode(), NOW)  # a bigger re-announcement
    assert book.bytes == len(fat_offer(1, seq=2).encode()) + len(fat_offer(2).encode())
    book.ingest_withdrawal(withdrawal(2, seq=1), NOW)
    assert book.bytes == len(fat_offer(1, seq=2).encode())
    book.expire(NOW + 3_600_000 + PARAMS.clock_skew_ms + 1)
    assert book.bytes == 0 and len(book) == 0


def test_offerbook__since_survives_reannouncement_and_snapshot_is_strongest_first():
    good = provider(3)[0].public
    book = new_book(score_of=lambda p: 0.9 if p == good else 0.5)
    book.ingest_offer(offer(1, seq=1).encode(), NOW)
    book.ingest_offer(offer(2, seq=1, now=NOW + 5000).encode(), NOW + 5000)
    book.ingest_offer(offer(3, seq=1, now=NOW + 9000).encode(), NOW + 9000)
    book.ingest_offer(offer(1, seq=2, now=NOW + 10_000).encode(), NOW + 10_000)
    assert book.held(provider(1)[0].public).since_ms == NOW
    order = [e.provider for e in book.snapshot_entries()]
    assert order == [good, provider(1)[0].public, provider(2)[0].public]
    assert book.snapshot() == [e.data for e in book.snapshot_entries()]


def test_offerbook__watermarks_bounded():
    small = PARAMS.replace(book_max_providers=3)
    book = new_book(small)
    for i in range(8):
        book.ingest_withdrawal(withdrawal(i, seq=1, created_ms=NOW + i), NOW + 10)
        assert book.watermarks() <= 3
    assert book.watermarks() == 3


def test_offerbook__expiry_heap_compacts_under_reannouncement():
    book = new_book()
    # re-announcements replace each other; their stale heap items must not pile up forever
    for seq in range(1, 1100):
        book.ingest_offer(offer(1, seq=seq, lifetime_ms=60_000 + seq).encode(), NOW)
        assert len(book._expiry) <= 2 * len(book) + 1024 + 1
    assert len(book) == 1
    assert book.next_deadline() == NOW + 60_000 + 1099 + PARAMS.clock_skew_ms + 1


def test_offerbook__get_resolves_unique_prefix_and_refuses_ambiguous_or_unknown():
    book = new_book()
    for i in range(40):
        book.ingest_offer(offer(i).encode(), NOW)
    entry = book.query("", limit=1)[0]
    assert len(entry.offer_id) == 12
    assert book.get(entry.offer_id) is entry
    assert book.get(entry.digest.hex()) is entry
    first = {e.offer_id[0] for e in book}
    shared = next(c for c in "0123456789abcdef" if sum(e.offer_id[0] == c for e in book) > 1)
    with pytest.raises(LocalProtocolError, match="matches .* offers"):
        book.get(shared)
    missing = next(c for c in "0123456789abcdef" if c not in first) if len(first) < 16 else None
    with pytest.raises(LocalProtocolError, match="no offer"):
        book.get(missing + "0" * 11 if missing else "f" * 63 + "0")
    with pytest.raises(LocalProtocolError, match="not hex"):
        book.get("xyz")


def test_offerbook__entry_derives_query_facts():
    book = new_book()
    book.ingest_offer(offer(1, model=GPU_MODELS[3], count=2, mixed_with=GPU_MODELS[2],
                            price_per_gpu_second=400, cuda=12020).encode(), NOW)
    (e,) = book.query("")
    assert e.models == ("A100_SXM4_40GB", "A100_SXM4_80GB")
    assert e.vram_gib == 40 and e.gpu_count == 2 and e.cuda_version == 12020
    assert e.price_per_gpu_hour == 400 * 3600 and str(e.price_per_gpu_hour_tokens()) == "1.440000"
    assert e.score == 0.5
    assert e.offer.provider == e.provider


def test_offerbook__rescore_reorders_score_queries():
    scores = {}
    book = new_book(score_of=lambda p: scores.get(p, 0.5))
    for i in range(3):
        book.ingest_offer(offer(i).encode(), NOW)
    scores[provider(2)[0].public] = 0.99
    assert book.query("score>=0.9") == []
    book.rescore()
    assert [e.provider for e in book.query("score>=0.9")] == [provider(2)[0].public]
    assert book.query("", "-score", 1)[0].provider == provider(2)[0].public


@pytest.mark.parametrize("name, token", [
    ("NVIDIA GeForce RTX 4090", "RTX_4090"),
    ("NVIDIA A100-SXM4-80GB", "A100_SXM4_80GB"),
    ("NVIDIA H100 80GB HBM3", "H100_80GB_HBM3"),
    ("NVIDIA RTX A6000", "RTX_A6000"),
    ("Tesla V100-PCIE-16GB", "V100_PCIE_16GB"),
    ("NVIDIA", "NVIDIA"),
    ("--", "UNKNOWN"),
])
def test_offerbook__model_token_normalises_nvml_names(name, token):
    assert model_token(name) == token


def test_offerbook__vram_gib_rounds_half_up():
    assert vram_gib(24564) == 24 and vram_gib(40960) == 40 and vram_gib(1536) == 2


def test_offerbook__signature_check_refuses_any_flipped_bit_and_foreign_key():
    good = offer(1)
    data = good.encode()
    assert good.signature_valid(good.provider, data)
    assert good.signature_valid(good.provider)  # re-encoded path agrees
    for i in (0, 31, 63):
        sig = bytearray(good.signature)
        sig[i] ^= 1
        assert not dataclasses.replace(good, signature=bytes(sig)).signature_valid(good.provider)
    assert not good.signature_valid(provider(2)[0].public, data)
    assert not good.signature_valid(good.provider[:31], data)
    assert not dataclasses.replace(good, seq=2).signature_valid(good.provider)


def test_offerbook__image_filter_matches_any_offered_image_and_agrees_with_the_reference():
    from protocol.query import parse_query

    book = new_book()
    with_images = {
        1: ("pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", "ubuntu:24.04"),
        2: ("ubuntu:22.04",),
        3: (),  # a hook provider: no images
    }
    for i, images in with_images.items():
        o = dataclasses.replace(offer(i), images=images).sign(provider(i)[0])
        book.ingest_offer(o.encode(), NOW)
    found = {tuple(e.offer.images) for e in book.query("image=pytorch/*")}
    assert found == {with_images[1]}
    assert {e.offer.images for e in book.query("image=ubuntu:24.04,ubuntu:22.04")} == {
        with_images[1], with_images[2]}
    assert {e.offer.images for e in book.query("image!=ubuntu:*")} == {()}
    for q in ("image=pytorch/*", "image=UBUNTU:2?.04 price<=1", "image!=ubuntu:*"):
        query = parse_query(q)
        assert sorted(e.digest for e in book.query(q)) == sorted(
            e.digest for e in book.query("") if query.matches(e))
