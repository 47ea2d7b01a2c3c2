"""`class` and `notice` query terms (specs/offerbook.md): an offer matches `class=X` when it has
GPUs of that class; `notice` is the longest notice of its interruptible sets, and an offer with
none never matches a notice term. Every plan of the book agrees with the reference predicate."""

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
    ("class!=interruptible", {"on_demand"}),
    ("class=interruptible notice>=60", {"half_60", "two_sets"}),
    ("notice>=60", {"half_60", "two_sets"}),
    ("notice<60", {"all_30"}),
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
