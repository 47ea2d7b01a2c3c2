"""The re-announcement shortcut: an offer whose body repeats the held offer's is validated from
its header alone (validation.validate_reannouncement) and indexed from the held entry. It must
give exactly the verdict of the full path (validate_offer) and the same book."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol.offerbook as offerbook
from tests.protocol.book_helpers import NOW, offer, provider
from protocol.encoding import pack, unpack_canonical
from protocol.errors import ProtocolError
from protocol.messages import Offer, _unsigned_from_wire
from protocol.offerbook import Entry, OfferBook
from protocol.params import Params
from protocol.sortedlist import SortedList
from protocol.validation import BindingCache, offer_header, validate_offer

PARAMS = Params()
BINDINGS = BindingCache(1000)
HELD = offer(7, seq=5, count=2)
PEER = provider(7)[0]
N_FIELDS = len(dataclasses.fields(Offer))


def reannounce(seq: int, created_ms: int, expires_ms: int, *, base: Offer = HELD) -> bytes:
    return dataclasses.replace(base, seq=seq, created_ms=created_ms,
                               expires_ms=expires_ms).sign(PEER).encode()


def resigned(data: bytes) -> bytes:
    """`data` with its signature made again over its own (possibly non-canonical) bytes."""
    sig = PEER.sign(Offer.DOMAIN, _unsigned_from_wire(data, N_FIELDS))
    return data[:-64] + sig


def pad_seq(data: bytes) -> bytes:
    """seq re-encoded as uint64 (non-canonical for any seq below 2**32), re-signed."""
    seq = unpack_canonical(data)[3]
    assert data[37:].startswith(pack(seq)) and seq < 2**32
    return resigned(data[:37] + b"\xcf" + seq.to_bytes(8, "big") + data[37 + len(pack(seq)):])


def outcome(fn):
    try:
        result = fn()
    except ProtocolError as exc:
        return type(exc).__name__, exc.code
    return "ok", result


def full_path(data: bytes, now: int, withdrawn_seq: int = -1):
    book = OfferBook(PARAMS, bindings=BINDINGS)
    book.ingest_offer(HELD.encode(), NOW)
    held = book.held(HELD.provider)
    return outcome(lambda: validate_offer(
        data, now, PARAMS, BINDINGS, known_seq=held.seq, known_digest=held.digest,
        withdrawn_seq=withdrawn_seq)[1])


def book_path(data: bytes, now: int):
    book = OfferBook(PARAMS, bindings=BINDINGS)
    book.ingest_offer(HELD.encode(), NOW)
    return book, outcome(lambda: book.ingest_offer(data, now).digest)


def test_reannouncement__takes_the_shortcut_and_matches_a_fresh_entry(monkeypatch):
    data = reannounce(6, NOW + 1000, NOW + 1000 + 3_600_000)
    book = OfferBook(PARAMS, bindings=BINDINGS)
    book.ingest_offer(HELD.encode(), NOW)
    calls = []
    monkeypatch.setattr(offerbook, "validate_offer", lambda *a, **k: calls.append(1))
    entry = book.ingest_offer(data, NOW + 2000)
    assert calls == []  # the full path did not run
    monkeypatch.undo()
    fresh = OfferBook(PARAMS, bindings=BINDINGS).ingest_offer(data, NOW + 2000)
    # since_ms is when the book first held the provider: a re-announcement keeps it, a fresh
    # book starts it now (and the keep-order key _skey carries it)
    assert entry.since_ms == NOW and fresh.since_ms == NOW + 2000
    assert entry._skey == (*fresh._skey[:2], -NOW, *fresh._skey[3:])
    for name in Entry.__slots__:
        if name not in ("bucket", "since_ms", "_skey"):
            assert getattr(entry, name) == getattr(fresh, name), name
    assert entry.bucket is not None and entry.bucket.key == fresh.bucket.key
    assert len(book) == 1 and book.held(HELD.provider) is entry
    assert book.get(entry.offer_id) is entry and entry.offer.seq == 6


def test_reannouncement__changed_body_takes_the_full_path(monkeypatch):
    terms = dataclasses.replace(HELD.terms, price_per_gpu_second=HELD.terms.price_per_gpu_second + 1)
    data = dataclasses.replace(HELD, seq=6, terms=terms).sign(PEER).encode()
    book = OfferBook(PARAMS, bindings=BINDINGS)
    book.ingest_offer(HELD.encode(), NOW)
    real = offerbook.validate_offer
    calls = []
    monkeypatch.setattr(offerbook, "validate_offer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    entry = book.ingest_offer(data, NOW)
    assert calls == [1] and entry.price_per_gpu_hour == terms.price_per_gpu_second * 3600


def test_reannouncement__header_shape():
    data = HELD.encode()
    seq, created, expires, body_at = offer_header(data)
    assert (seq, created, expires) == (HELD.seq, HELD.created_ms, HELD.expires_ms)
    value = unpack_canonical(data)
    assert data[body_at:-66] == b"".join(pack(v) for v in value[6:-1])
    assert offer_header(pad_seq(data)) is None  # non-minimal: left to the full decoder
    assert offer_header(data[:-1]) is None and offer_header(b"") is None
    assert offer_header(data[:40]) is None


# Header variations around the held offer (seq 5, created NOW): every verdict of the full path.
SEQS = st.sampled_from([4, 5, 6, 2**53 - 1])
OFFSETS = st.sampled_from([-10**9, -PARAMS.offer_max_lifetime_ms - PARAMS.clock_skew_ms - 1,
                           -60_000, 0, 1, PARAMS.clock_skew_ms + 1, 10**9])
LIFETIMES = st.sampled_from([0, PARAMS.offer_min_lifetime_ms - 1, PARAMS.offer_min_lifetime_ms,
                             3_600_000, PARAMS.offer_max_lifetime_ms,
                             PARAMS.offer_max_lifetime_ms + 1])


@settings(max_examples=150, deadline=None)
@given(seq=SEQS, created_offset=OFFSETS, lifetime=LIFETIMES,
       tamper=st.sampled_from(["none", "signature", "pad", "same_bytes"]),
       now_offset=st.sampled_from([0, 30_000, 3_700_000]))
def test_reannouncement__verdict_equals_the_full_path(seq, created_offset, lifetime, tamper,
                                                      now_offset):
    created = NOW + created_offset
    if tamper == "same_bytes":
        data = HELD.encode()
    else:
        data = reannounce(seq, created, created + lifetime)
    if tamper == "signature":
        data = data[:-1] + bytes([data[-1] ^ 1])
    elif tamper == "pad" and seq < 2**32:
        data = pad_seq(data)
    now = NOW + now_offset
    expected = full_path(data, now)
    book, got = book_path(data, now)
    assert got == expected
    held = book.held(HELD.provider)
    assert held is not None
    if got[0] == "ok":
        assert held.data == data
    else:
        assert held.data == HELD.encode()  # a refused offer leaves the book as it was


def test_reannouncement__chains_over_many_rounds_and_queries_agree():
    """Re-announcements of many providers, fast path, against a book fed only through the full
    path (a fresh book per round): same offers, same query answers."""
    offers = [offer(i, seq=1, price_per_gpu_second=100 + i % 7, count=1 + i % 3) for i in range(40)]
    book = OfferBook(PARAMS, bindings=BINDINGS)
    for o in offers:
        book.ingest_offer(o.encode(), NOW)
    rng = random.Random(3)
    for r in range(2, 6):
        now = NOW + r * 60_000
        batch = []
        for i, o in enumerate(offers):
            peer = provider(i)[0]
            batch.append(dataclasses.replace(o, seq=r, created_ms=now,
                                             expires_ms=now + 3_600_000).sign(peer).encode())
        rng.shuffle(batch)
        for d in batch:
            book.ingest_offer(d, now)
        reference = OfferBook(PARAMS, bindings=BINDINGS)
        for d in batch:
            reference.ingest_offer(d, now)
        for q, sort in (("", "price"), ("count>=2", "-price"), ("price<=0.40", "score"), ("", "count")):
            got = [e.digest for e in book.query(q, sort=sort, limit=25)]
            want = [e.digest for e in reference.query(q, sort=sort, limit=25)]
            assert got == want, (q, sort)
        assert sorted(book.snapshot()) == sorted(reference.snapshot())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=400),
       st.integers(1, 4))
def test_sorted_list_replace__equals_remove_then_add(ops, chunk):
    """`replace` in place or not, the list equals a plain sorted model (tiny chunks force the
    chunk-boundary cases)."""
    sl = type("Tiny", (SortedList,), {"__slots__": (), "CHUNK": chunk})()
    model: dict = {}
    for old, new in ops:
        if old in model and (new not in model or new == old):
            sl.replace(old, new, f"v{new}")
            del model[old]
            model[new] = f"v{new}"
        elif old not in model:
            sl.add(old, f"v{old}")
            model[old] = f"v{old}"
        assert len(sl) == len(model)
        assert [v for part in sl.slices() for v in part] == [model[k] for k in sorted(model)]
        assert sl._maxes == [keys[-1] for keys in sl._keys]


@pytest.mark.parametrize("cap", [1, 2])
def test_reannouncement__book_caps_still_hold(cap):
    book = OfferBook(dataclasses.replace(PARAMS, book_max_providers=cap), bindings=BINDINGS)
    book.ingest_offer(HELD.encode(), NOW)
    book.ingest_offer(reannounce(6, NOW, NOW + 3_600_000), NOW)
    assert len(book) == 1
