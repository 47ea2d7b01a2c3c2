"""`class` and `notice` query terms (specs/offerbook.md): a query with either picks one class of
an offer (its on-demand GPUs, or one interruptible set) that satisfies every class, notice and
price term together, and `price` is that class's price; without them `price` is the on-demand
price. An on-demand class has no notice: it never matches a notice term. Every plan of the book
agrees with the reference predicate."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.messages import InterruptibleGpus
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.query import QueryError, parse_query
from protocol.validation import BindingCache

from tests.protocol.book_helpers import NOW, offer, provider


def spot(i, sets, count=2, **kw):
    o = offer(i, count=count, **kw)
    g = [x.uuid_digest for x in o.gpus]
    made = tuple(InterruptibleGpus(tuple(g[a:b]), notice, 50) for a, b, notice in sets)
    return dataclasses.replace(o, interruptible=made).sign(provider(i)[0])


@pytest.fixture(scope="module")
def book():
    b = OfferBook(Params(), bindings=BindingCache(64))
    offers = {
        "on_demand": offer(1, count=2),
        "half_60": spot(2, [(1, 2, 60)]),
        "all_30": spot(3, [(0, 2, 30)]),
        "two_sets": spot(4, [(0, 1, 30), (1, 2, 300)]),
    }
    names = {}
    for name, o in offers.items():
        names[b.ingest_offer(o.encode(), NOW).digest] = name
    return b, names


@pytest.mark.parametrize("query, expected", [
    ("class=interruptible", {"half_60", "all_30", "two_sets"}),
    ("class=on-demand", {"on_demand", "half_60"}),
    ("class!=interruptible", {"on_demand", "half_60"}),  # a class other than interruptible
    ("class=interruptible notice>=60", {"half_60", "two_sets"}),
    ("notice>=60", {"half_60", "two_sets"}),
    ("notice<60", {"all_30", "two_sets"}),  # two_sets' 30 s set
    ("notice=300 count=2", {"two_sets"}),
])
def test_query__class_and_notice_terms(book, query, expected):
    b, names = book
    got = {names[e.digest] for e in b.query(query)}
    assert got == expected
    assert got == {names[e.digest] for e in b.query("") if parse_query(query).matches(e)}
    assert {names[e.digest] for e in b.query(query, limit=10)} == expected


def test_query__notice_needs_a_whole_number():
    with pytest.raises(QueryError) as err:
        parse_query("class=interruptible notice>=1.5")
    assert "notice" in str(err.value)


def priced(i, sets, count, price):
    """An offer at `price` units/s on demand whose sets (first, last, notice, price) sell some
    of its GPUs as interruptible at their own prices."""
    o = offer(i, count=count, price_per_gpu_second=price)
    g = [x.uuid_digest for x in o.gpus]
    made = tuple(InterruptibleGpus(tuple(g[a:b]), notice, p) for a, b, notice, p in sets)
    return dataclasses.replace(o, interruptible=made).sign(provider(i)[0])


@pytest.fixture(scope="module")
def priced_book():
    # 6-decimal token: 100 units/s = 0.36 per GPU-hour, 50 = 0.18, 40 = 0.144, 90 = 0.324.
    b = OfferBook(Params(), bindings=BindingCache(64))
    offers = {
        "od": offer(11, count=1, price_per_gpu_second=99),  # 0.3564
        "spot_cheap": priced(12, [(1, 2, 60, 50)], 2, 100),
        "spot_two": priced(13, [(0, 1, 30, 40), (1, 2, 600, 90)], 3, 120),
        "all_spot": priced(14, [(0, 2, 120, 60)], 2, 110),
    }
    names = {}
    for name, o in offers.items():
        names[b.ingest_offer(o.encode(), NOW).digest] = name
    return b, names


@pytest.mark.parametrize("query, sort, expected", [
    ("price<=0.2", "price", []),  # no class term: the on-demand price (all >= 0.36)
    ("price<=0.4", "price", ["od", "spot_cheap", "all_spot"]),  # 0.3564, 0.36, 0.396
    ("class=interruptible price<=0.2", "price", ["spot_two", "spot_cheap"]),  # 0.144, 0.18
    ("class=interruptible notice>=60 price<=0.2", "price", ["spot_cheap"]),  # one set does both
    ("notice>=100 price<=0.3", "price", ["all_spot"]),  # 120 s at 0.216; 600 s costs 0.324
    ("notice>=100", "price", ["all_spot", "spot_two"]),  # 0.216, then 600 s at 0.324
    ("class=on-demand price<=0.4", "price", ["od", "spot_cheap"]),  # all_spot has no on-demand GPU
    ("class=on-demand,interruptible price<=0.2", "price", ["spot_two", "spot_cheap"]),
    ("class=interruptible", "-price", ["all_spot", "spot_cheap", "spot_two"]),  # cheapest set each
    ("class=interruptible price>0.3", "price", ["spot_two"]),  # its 600 s set at 0.324
    ("class=interruptible price=0.144", "price", ["spot_two"]),
    ("class=interruptible count>=3", "price", ["spot_two"]),
    ("class=on-demand class=interruptible", "price", []),  # no class is both
    ("class!=interruptible price<=0.4", "-price", ["spot_cheap", "od"]),  # via the price index
    ("class=on-demand notice>=30", "price", []),  # an on-demand class has no notice
])
def test_query__price_is_the_matching_class_price(priced_book, query, sort, expected):
    b, names = priced_book
    got = [names[e.digest] for e in b.query(query, sort)]
    assert got == expected
    q = parse_query(query)
    assert set(got) == {names[e.digest] for e in b.query("") if q.matches(e)}
    assert [names[e.digest] for e in b.query(query, sort, limit=1)] == got[:1]
    ranked = [names[e.digest] for e in b.query(query, "rank", now_ms=NOW)]
    assert sorted(ranked) == sorted(got)


def test_query__class_bound_query_forgets_a_set_the_provider_dropped():
    b = OfferBook(Params(), bindings=BindingCache(64))
    b.ingest_offer(priced(21, [(0, 1, 60, 50)], 2, 100).encode(), NOW)
    assert len(b.query("class=interruptible price<=0.2")) == 1
    o = offer(21, seq=2, count=2, price_per_gpu_second=100)  # no sets now
    b.ingest_offer(o.encode(), NOW + 1)
    assert b.query("class=interruptible") == [] and len(b.query("class=on-demand")) == 1
    assert b._spot == {}


def test_query__class_vectors_are_current_and_replay_from_the_wire():
    import json

    from tests.protocol import query_vectors

    assert query_vectors.VECTOR.read_text() == query_vectors.render(query_vectors.build()), (
        "specs/vectors/query_classes.json is stale: run python -m tests.protocol.query_vectors")
    doc = json.loads(query_vectors.VECTOR.read_text())
    b = OfferBook(Params())
    names = {}
    for name, o in doc["offers"].items():
        entry = b.ingest_offer(bytes.fromhex(o["wire_hex"]), doc["now_ms"])
        assert entry.digest.hex() == o["sha256"]
        names[entry.digest] = name
    for v in doc["queries"]:
        assert [names[e.digest] for e in b.query(v["query"], v["sort"])] == v["expect"], v
        q = parse_query(v["query"])
        assert {names[e.digest] for e in b.query("") if q.matches(e)} == set(v["expect"])


def test_query__random_class_bound_queries_agree_with_the_reference_and_sort_by_class_price(priced_book):
    import random

    b, names = priced_book
    rng = random.Random(18)
    pool = ["class=interruptible", "class=on-demand", "class!=interruptible", "class!=on-demand",
            "class=on-demand,interruptible", "notice>=30", "notice>=60", "notice<100", "notice=600",
            "price<=0.2", "price<0.36", "price>=0.18", "price>0.3", "price!=0.144", "count>=2",
            "count<3", "price<=0.5"]
    for _ in range(300):
        q = parse_query(" ".join(rng.sample(pool, rng.randint(1, 4))))
        sort = rng.choice(["price", "-price", "count", "rank"])
        got = b.query(q, sort, now_ms=NOW)
        expect = {e.digest for e in b.query("") if q.matches(e)}
        assert {e.digest for e in got} == expect, q.text
        if q.class_bound and sort in ("price", "-price") and got:
            prices = [q.class_price(e) for e in got]
            assert prices == sorted(prices, reverse=sort == "-price"), q.text
        assert [e.digest for e in b.query(q, sort, limit=2, now_ms=NOW)] == [e.digest for e in got[:2]], q.text
