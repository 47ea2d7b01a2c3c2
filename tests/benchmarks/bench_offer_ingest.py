"""Offer ingest throughput (decode + validate + verify + insert into the book) against raw
ed25519 verification of the same signed bytes, in the same run.

    python tests/benchmarks/bench_offer_ingest.py [--providers 300] [--rounds 3]

Prints a readable summary, then one JSON object on the last line.

Target: ingest >= 0.70 x raw verify, i.e. everything but the signature check within ~43% of
one verify (~47 us when a verify takes ~110 us). Not reached in pure Python on the 2-core dev
machine. Measured there (shared, 5 interleaved runs each, same session): ratio 0.486-0.495 at
9eea432 -> 0.526-0.533 now (one loaded outlier each: 0.373 / 0.395); ingest ~206 us vs raw
verify ~109 us. Where the ~86 us of non-verify time per offer goes, timed inside the ingest
loop (mean 3.3 GPUs per offer; timing each stage in isolation gives ~40% less, the crypto
evicts the interpreter's caches):

    msgpack unpack + canonical re-pack        16 us   (C; the re-pack is the canonical proof)
    generated field checks + dataclasses      27 us   (~2-3 us per GPU, ~8 us the rest)
    sha256 digest + clock/duplicate checks     5 us
    check_offer_static                         4 us
    unsigned bytes sliced from the wire        4 us
    binding cache lookup                       3 us
    book Entry (derived facts)                 9 us
    book remove held + insert (2 sorted lists, dicts, expiry heap)   18 us

Decode alone (43 us) is near the budget: reaching 0.70 needs decoding in C (or skipping
dataclass construction), not further Python tuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import nacl.bindings  # noqa: E402

from protocol.encoding import decode  # noqa: E402
from protocol.messages import Offer, _unsigned_from_wire  # noqa: E402
from protocol.offerbook import OfferBook  # noqa: E402
from protocol.params import Params  # noqa: E402
from protocol.samples import make_offer, make_provider  # noqa: E402
from protocol.validation import BindingCache  # noqa: E402

NOW = 1_800_000_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="re-announcements per provider")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    providers = [make_provider(rng) for _ in range(args.providers)]
    # Round 0 announces; rounds 1.. re-announce with a higher seq (what the book sees all day).
    rounds = []
    for r in range(args.rounds + 1):
        rounds.append([make_offer(p, b, rng, NOW, seq=r + 1).encode() for p, _, b in providers])
    warm = [d for rnd in rounds[1:] for d in rnd]
    gpus: dict[int, int] = {}
    for d in warm:
        n = len(decode(d, Offer).gpus)  # type: ignore[attr-defined]
        gpus[n] = gpus.get(n, 0) + 1

    params = Params()
    book = OfferBook(params, bindings=BindingCache(params.binding_cache_size))
    # Cold: a provider's first offer pays for the binding's ecrecover (cached afterwards).
    t0 = time.perf_counter()
    for d in rounds[0]:
        book.ingest_offer(d, NOW)
    cold_us = (time.perf_counter() - t0) / len(rounds[0]) * 1e6

    # Raw verification input: the exact signed message pynacl opens (sig || domain || unsigned).
    signed = []
    for d in warm:
        sig = d[-64:]
        unsigned = _unsigned_from_wire(d, len(dataclasses.fields(Offer)))
        signed.append((sig + Offer.DOMAIN + unsigned, d[5:37]))

    def run_raw() -> float:
        t = time.perf_counter()
        for sm, pk in signed:
            nacl.bindings.crypto_sign_open(sm, pk)
        return len(signed) / (time.perf_counter() - t)

    def run_ingest() -> float:
        b = OfferBook(params, bindings=book.bindings)
        for d in rounds[0]:
            b.ingest_offer(d, NOW)  # bindings are warm: this seeds the book's seqs
        t = time.perf_counter()
        for d in warm:
            b.ingest_offer(d, NOW)
        return len(warm) / (time.perf_counter() - t)

    raw, ingest = [], []
    for _ in range(5):  # interleaved, best of 5: the machine is shared
        raw.append(run_raw())
        ingest.append(run_ingest())
    raw_rate, ingest_rate = max(raw), max(ingest)
    ratio = ingest_rate / raw_rate
    size = sum(map(len, warm)) / len(warm)
    print(f"offers: {len(warm)} warm re-announcements from {args.providers} providers, "
          f"mean {size:.0f} bytes, GPU mix {dict(sorted(gpus.items())) or 'n/a'}")
    print(f"raw ed25519 verify (crypto_sign_open): {raw_rate:,.0f}/s ({1e6 / raw_rate:.1f} us)")
    print(f"ingest (decode+validate+verify+insert): {ingest_rate:,.0f}/s "
          f"({1e6 / ingest_rate:.1f} us)  ratio {ratio:.2f} (target >= 0.70)")
    print(f"cold first offer of a new provider (incl. binding ecrecover): {cold_us:.0f} us")
    print(json.dumps({
        "bench": "offer_ingest", "offers": len(warm), "providers": args.providers,
        "mean_offer_bytes": round(size), "raw_verify_per_s": round(raw_rate),
        "ingest_per_s": round(ingest_rate), "ratio": round(ratio, 3),
        "ingest_us": round(1e6 / ingest_rate, 1), "raw_verify_us": round(1e6 / raw_rate, 1),
        "cold_new_provider_us": round(cold_us),
    }))


if __name__ == "__main__":
    main()
