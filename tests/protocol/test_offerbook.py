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
