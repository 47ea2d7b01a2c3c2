"""Offer book with N offers from N providers: insert throughput, memory, query latency.

    python tests/benchmarks/bench_offer_book.py [--offers 100000] [--queries 2000]

Offers are real signed offers ingested through `OfferBook.ingest_offer` (decode, validation,
ed25519 verification, insert). Making and verifying 100,000 wallet bindings would cost minutes
of ecrecover that `bench_offer_ingest` already reports as the cold per-provider cost, so here the
bindings are marked verified up front (`TrustedBindings`): the insert rate below EXCLUDES the
binding check. Prints a summary, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from protocol.identity import PeerKey  # noqa: E402
from protocol.messages import Binding  # noqa: E402
from protocol.offerbook import OfferBook  # noqa: E402
from protocol.params import Params  # noqa: E402
from protocol.samples import GPU_MODELS, REGIONS, make_offer  # noqa: E402
from protocol.validation import BindingCache  # noqa: E402

NOW = 1_800_000_000_000


class TrustedBindings(BindingCache):
    """Accepts every binding without ecrecover (benchmark only: see the module docstring)."""

    def verify(self, binding: Binding, verifier: object = None) -> None:
        return None


def make_offers(n: int, rng: random.Random) -> list[bytes]:
    wallet_sig = b"\x11" * 64 + b"\x1b"
    out = []
    for _ in range(n):
        peer = PeerKey(rng.randbytes(32))
        binding = Binding(peer.public, b"\x22" * 20, 31337, wallet_sig, b"\x00" * 64)
        out.append(make_offer(peer, binding, rng, NOW - rng.randrange(1_800_000)).encode())
    return out


def query_mix(rng: random.Random, n: int) -> list[tuple[str, str | None, int | None]]:
    tokens = ["RTX_4090", "RTX_3090", "A100_SXM4_40GB", "A100_SXM4_80GB"]
    mix = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:  # model + price, cheapest first, a page of results
            m = rng.randrange(4)
            low, high = GPU_MODELS[m].usd_per_hour
            price = f"{rng.uniform(low, high):.2f}"
            extra = rng.choice(["", " count>=2", " score>=0.8"])
            mix.append((f"gpu={tokens[m]} price<={price}{extra}", "price", 50))
        elif r < 0.8:  # vram + count
            mix.append((f"vram>={rng.choice([24, 40, 80])} count>={rng.choice([1, 2, 4, 8])}",
                        rng.choice(["price", "-vram"]), 50))
        elif r < 0.9:  # region glob
            region = rng.choice(["eu-*", "us-*", "jp-*", rng.choice(REGIONS)])
            mix.append((f"region={region} gpu={rng.choice(tokens[:2])},A100*", "price", 50))
        else:  # broad, sorted, top 20
            mix.append((rng.choice(["", "cuda>=12.2", "score>=0.5", "count>=4"]),
                        rng.choice(["-score", "price", "-price", "-count"]), 20))
    return mix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offers", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t = time.perf_counter()
    offers = make_offers(args.offers, rng)
    print(f"made {len(offers)} signed offers in {time.perf_counter() - t:.1f} s")
    scores = {}
    score_rng = random.Random(args.seed + 1)
    params = Params()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = OfferBook(params, bindings=TrustedBindings(1),
                     score_of=lambda p: scores.setdefault(p, round(score_rng.random(), 2)))
    t = time.perf_counter()
    for d in offers:
        book.ingest_offer(d, NOW)
    insert_s = time.perf_counter() - t
    mem = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    wire = sum(map(len, offers))

    mix = query_mix(random.Random(args.seed + 2), args.queries)
    lat = []
    hits = 0
    for q, s, lim in mix:
        t = time.perf_counter()
        hits += len(book.query(q, s, lim))
        lat.append((time.perf_counter() - t) * 1e3)
    lat_sorted = sorted(lat)
    p50 = statistics.median(lat)
    p99 = lat_sorted[int(len(lat) * 0.99) - 1]

    # The renter's default order, `rank`, over the same queries: first with no proven wallet
    # (every offer unknown and new: a fresh renter), then with the wallet all these offers
    # share marked proven (its one proven offer in tier 1; `restand` scans the book once).
    def timed(mix_):
        out = []
        for q, _s, lim in mix_:
            t0 = time.perf_counter()
            book.query(q, "rank", lim, now_ms=NOW)
            out.append((time.perf_counter() - t0) * 1e3)
        out.sort()
        return round(statistics.median(out), 3), round(out[int(len(out) * 0.99) - 1], 3)

    rank_mix = mix[: max(1, len(mix) // 4)]
    rank_none = timed(rank_mix)
    proven = {b"\x22" * 20}
    book.proven_of = lambda w: w in proven
    t = time.perf_counter()
    book.restand(proven)
    restand_ms = (time.perf_counter() - t) * 1e3
    rank_proven = timed(rank_mix)
    print(f"rank queries ({len(rank_mix)}): no proven wallet p50 {rank_none[0]} ms p99 "
          f"{rank_none[1]} ms; restand of one wallet with {len(book)} offers {restand_ms:.1f} ms; "
          f"that wallet proven p50 {rank_proven[0]} ms p99 {rank_proven[1]} ms")
    worst = max(range(len(lat)), key=lat.__getitem__)
    print(f"book: {len(book)} offers, {len(book._buckets)} buckets")
    print(f"insert (ingest without binding ecrecover): {len(offers) / insert_s:,.0f}/s "
          f"({insert_s / len(offers) * 1e6:.0f} us each)")
    print(f"memory (tracemalloc, book incl. wire bytes): {mem / 2**20:.0f} MiB "
          f"({mem / len(book):.0f} B/offer; wire bytes {wire / len(book):.0f} B/offer)")
    print(f"queries: {len(lat)}, mean hits {hits / len(lat):.1f}, p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms (target < 10), max {lat[worst]:.2f} ms for {mix[worst]}")
    print(json.dumps({
        "bench": "offer_book", "offers": len(book), "queries": len(lat),
        "insert_per_s": round(len(offers) / insert_s), "memory_mib": round(mem / 2**20, 1),
        "bytes_per_offer": round(mem / len(book)), "query_p50_ms": round(p50, 3),
        "query_p99_ms": round(p99, 3), "query_max_ms": round(lat[worst], 3),
        "binding_check": "excluded",
        "rank_p50_ms": rank_none[0], "rank_p99_ms": rank_none[1],
        "restand_ms": round(restand_ms, 1),
        "rank_proven_p50_ms": rank_proven[0], "rank_proven_p99_ms": rank_proven[1],
    }))


if __name__ == "__main__":
    main()
