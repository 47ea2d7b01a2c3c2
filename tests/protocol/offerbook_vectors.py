"""Builds specs/vectors/offerbook.json (run: python -m tests.protocol.offerbook_vectors).

One scenario a second implementation can replay against its own offer book: a sequence of
signed offers, each ingested at a given time with given provider scores, with the verdict and
the offers evicted to make room under `book_max_providers` and `book_max_bytes`
(specs/offerbook.md, "Caps and eviction": the keep order puts a proven wallet's one offer above
other unknown ones), then the order of the `rank` sort (with one wallet proven on the escrow,
"Standing") and of the price sort (specs/offerbook.md, "Ranking"). Every key here is a fixed
test key: never use them for real funds.
"""

from __future__ import annotations

import random

from protocol.errors import Ignore
from protocol.messages import Binding
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.samples import GPU_MODELS, make_offer, make_provider
from tests.protocol.vectors import VECTORS_DIR, render

VECTOR = VECTORS_DIR / "offerbook.json"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ESTABLISHED_MS = 60_000


def _offers() -> tuple[dict[str, float], list[tuple[str, int, bytes]], set[str]]:
    """(score per provider name, [(provider name, now_ms, wire bytes)] in ingest order, the
    proven wallets)."""
    keys = {name: make_provider(random.Random(f"offerbook-vector-{name}"))
            for name in ("A", "B", "C", "D", "E", "G", "X", "P")}
    q_peer = make_provider(random.Random("offerbook-vector-Q"))[0]
    keys["Q"] = (q_peer, keys["P"][1], Binding.create(q_peer, keys["P"][1], 31337))  # P's wallet

    def wire(name: str, now: int, *, seq: int = 1, price: int, gpus: int = 1) -> bytes:
        peer, _, binding = keys[name]
        return make_offer(peer, binding, random.Random(f"{name}-{seq}"), now, seq=seq,
                          model=GPU_MODELS[3], gpu_count=gpus, region="eu-frankfurt",
                          price_per_gpu_second=price, lifetime_ms=3_600_000).encode()

    scores = {"G": 0.9, "X": 0.2}
    steps = [
        ("X", T0, wire("X", T0, price=70)),  # known-bad, held while there is room
        ("A", T0 + 1_000, wire("A", T0 + 1_000, price=120)),
        ("B", T0 + 2_000, wire("B", T0 + 2_000, price=130)),
        ("C", T0 + 3_000, wire("C", T0 + 3_000, price=100, gpus=16)),  # fat: evicts X first
        ("D", T0 + 4_000, wire("D", T0 + 4_000, price=90)),  # newest unknown: book_full
        ("G", T0 + 5_000, wire("G", T0 + 5_000, price=200)),  # known-good: evicts C
        ("D", T0 + 6_000, wire("D", T0 + 6_000, seq=2, price=90)),  # fits now
        ("E", T0 + 7_000, wire("E", T0 + 7_000, price=80)),  # no slot, newest: book_full
        ("A", T0 + 8_000, wire("A", T0 + 8_000, seq=2, price=120)),  # re-announce: since kept
        ("P", T0 + 9_000, wire("P", T0 + 9_000, price=150)),  # proven wallet: evicts D
        ("Q", T0 + 10_000, wire("Q", T0 + 10_000, price=60)),  # P's wallet's 2nd key: book_full
        ("X", T0 + 11_000, wire("X", T0 + 11_000, seq=2, price=70)),  # known-bad: book_full
        # B (held since T0 + 2 s) grows to a fat offer: it needs bytes, and every offer it could
        # displace is stronger (A held longer, P proven, G known-good): book_full
        ("B", T0 + 12_000, wire("B", T0 + 12_000, seq=2, price=130, gpus=16)),
    ]
    proven = {keys["P"][2].wallet.hex()}  # P's wallet: paid on the escrow by two renters
    return {keys[n][0].public.hex(): s for n, s in scores.items()}, [
        (keys[n][0].public.hex(), now, data) for n, now, data in steps], proven


def build() -> dict:
    scores, steps, proven = _offers()
    slim, fat = len(steps[0][2]), len(steps[3][2])
    params = Params().replace(book_max_providers=4, book_max_bytes=2 * slim + fat + 64,
                              book_established_ms=ESTABLISHED_MS)
    book = OfferBook(params, score_of=lambda p: scores.get(p.hex(), 0.5),
                     proven_of=lambda w: w.hex() in proven)
    evicted: list[str] = []
    book.on_evict = lambda e: evicted.append(e.provider.hex())
    out_steps = []
    for provider, now, data in steps:
        evicted.clear()
        try:
            book.ingest_offer(data, now)
            verdict = "accept"
        except Ignore as exc:
            verdict = f"ignore:{exc.code}"
        out_steps.append({"provider": provider, "now_ms": now, "wire_hex": data.hex(),
                          "size": len(data), "verdict": verdict, "evicted": list(evicted),
                          "book_bytes_after": book.bytes})
    now = T0 + ESTABLISHED_MS + 1_500  # A (T0 + 1 s) is established, B (T0 + 2 s) is not
    return {
        "params": {"book_max_providers": params.book_max_providers,
                   "book_max_bytes": params.book_max_bytes,
                   "book_established_ms": params.book_established_ms,
                   "clock_skew_ms": params.clock_skew_ms},
        "scores": scores,
        "unknown_score": 0.5,
        "proven_wallets": sorted(proven),
        "steps": out_steps,
        "held": sorted(({"provider": e.provider.hex(), "seq": e.seq, "since_ms": e.since_ms,
                         "digest": e.digest.hex(), "wallet": e.wallet.hex()} for e in book),
                       key=lambda r: r["provider"]),
        "rank": {"now_ms": now, "query": "", "order": [e.provider.hex() for e in
                                                       book.query("", "rank", now_ms=now)]},
        "price": {"query": "", "order": [e.provider.hex() for e in book.query("", "price")]},
    }


def main() -> int:
    VECTOR.write_text(render(build()))
    print(f"wrote {VECTOR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
