"""Builds specs/vectors/query_classes.json (run: python -m tests.protocol.query_vectors).

Class-bound queries (specs/offerbook.md, "Classes"): offers with on-demand GPUs and
interruptible sets at their own prices and notices, and queries with the offers they return
in order. A second implementation ingests `offers` at `now_ms` into an empty book with default
parameters and runs each query (`query`, `sort`): the result is `expect` (offer names; the
name -> sha256 table is `offers`). Every key here is a fixed test key: never use them for real
funds.
"""

from __future__ import annotations

import dataclasses
import random
import sys

from protocol.messages import InterruptibleGpus
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.samples import GPU_MODELS, make_offer, make_provider
from tests.protocol.vectors import VECTORS_DIR, render

VECTOR = VECTORS_DIR / "query_classes.json"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _offer(name: str, count: int, price: int, sets: list[tuple[int, int, int, int]]):
    """`price` units/s on demand (6-decimal token: 100 = 0.36 per GPU-hour); `sets` as
    (first GPU, end, notice_s, price units/s)."""
    peer, _, binding = make_provider(random.Random(f"query-classes-{name}"))
    o = make_offer(peer, binding, random.Random(f"{name}-offer"), T0, model=GPU_MODELS[3],
                   gpu_count=count, region="eu-frankfurt", price_per_gpu_second=price,
                   lifetime_ms=3_600_000)
    g = [x.uuid_digest for x in o.gpus]
    made = tuple(InterruptibleGpus(tuple(g[a:b]), notice, p) for a, b, notice, p in sets)
    return dataclasses.replace(o, interruptible=made).sign(peer)


OFFERS = {
    "on_demand": (1, 99, []),  # 0.3564 per GPU-hour
    "spot_cheap": (2, 100, [(1, 2, 60, 50)]),  # on demand 0.36; 60 s set at 0.18
    "spot_two": (3, 120, [(0, 1, 30, 40), (1, 2, 600, 90)]),  # 0.432; 30 s at 0.144, 600 s at 0.324
    "all_spot": (2, 110, [(0, 2, 120, 60)]),  # no on-demand GPU; 120 s at 0.216
}
QUERIES = [
    ("price<=0.2", "price"),
    ("price<=0.4", "price"),
    ("class=interruptible price<=0.2", "price"),
    ("class=interruptible notice>=60 price<=0.2", "price"),
    ("notice>=100 price<=0.3", "price"),
    ("notice>=100", "price"),
    ("class=on-demand price<=0.4", "price"),
    ("class=on-demand,interruptible price<=0.2", "price"),
    ("class!=interruptible", "price"),
    ("class=interruptible", "-price"),
    ("class=interruptible price>0.3", "price"),
    ("notice<60", "price"),
]


def build() -> dict:
    offers = {name: _offer(name, *spec) for name, spec in OFFERS.items()}
    book = OfferBook(Params())
    names = {}
    for name, o in offers.items():
        names[book.ingest_offer(o.encode(), T0).digest] = name
    return {
        "warning": "test keys: never use them for real funds",
        "now_ms": T0,
        "offers": {name: {"wire_hex": o.encode().hex(),
                          "sha256": next(d for d, n in names.items() if n == name).hex()}
                   for name, o in offers.items()},
        "queries": [{"query": q, "sort": s, "expect": [names[e.digest] for e in book.query(q, s)]}
                    for q, s in QUERIES],
    }


def main() -> int:
    VECTOR.write_text(render(build()))
    print(f"wrote {VECTOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
