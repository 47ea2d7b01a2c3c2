"""The query language: parsing, errors pointing at columns, each field, sorting, and the indexed
query agreeing with a brute-force filter written independently here."""

from __future__ import annotations

import re
from decimal import Decimal
from fnmatch import fnmatchcase

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.book_helpers import NOW, offer, provider, provider_of_wallet
from protocol.encoding import decode
from protocol.messages import OfferWithdrawal
from protocol.errors import LocalProtocolError
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.query import QueryError, parse_query, parse_sort
from protocol.samples import GPU_MODELS
from protocol.validation import BindingCache

RTX4090, RTX3090, A100_40, A100_80 = GPU_MODELS
BINDINGS = BindingCache(1000)
REGIONS = ("eu-frankfurt", "eu-london", "us-dallas", "jp-tokyo")

# A pool of offers with varied facts; 0.60 USDC/GPU-h = 600000 units/h = 500/3 per second is not
# an integer, so boundary prices use 0.72 (200/s) and 0.36 (100/s).
POOL_SPECS = []
for i in range(48):
    POOL_SPECS.append(dict(
        model=GPU_MODELS[i % 4], count=(1, 2, 4, 8)[(i // 4) % 4], region=REGIONS[i % 3 + (i % 5 == 0)],
        price_per_gpu_second=(100, 200, 201, 150, 400, 99)[i % 6],
        symbol="WETH" if i % 7 == 0 else "USDC", decimals=18 if i % 7 == 0 else 6,
        cuda=(12020, 12040, 11080)[i % 3],
        mixed_with=RTX3090 if i % 11 == 0 else None,
    ))
POOL = [offer(100 + i, **spec).encode() for i, spec in enumerate(POOL_SPECS)]
SCORES = {}


def book_of(indices, scores=None):
    scores = scores or {}
    book = OfferBook(Params(), bindings=BINDINGS,
                     score_of=lambda p: scores.get(p, 0.5))
    for i in indices:
        book.ingest_offer(POOL[i], NOW)
    return book


# --------------------------------------------------------------------------------------------
# Brute force, independent of protocol/query.py


def brute_matches(entry, query: str) -> bool:
    for term in query.split():
        field, op, value = re.fullmatch(r"([a-z]+)(!=|<=|>=|=|<|>)(.*)", term).groups()
        if field in ("gpu", "region", "token"):
            have = {"gpu": entry.models, "region": (entry.region,),
                    "token": (entry.token_symbol,)}[field]
            # a gpu pattern also matches a model token's leading words (H100 -> H100_80GB_HBM3)
            pats = [p.upper() for p in value.split(",")]
            pats += [p + "_*" for p in pats] if field == "gpu" else []
            hit = any(fnmatchcase(h.upper(), p) for h in have for p in pats)
            ok = hit if op == "=" else not hit
        elif field == "chain":
            ok = (entry.chain_id in {int(v) for v in value.split(",")}) == (op == "=")
        else:
            if field == "price":
                have = Decimal(entry.price_per_gpu_hour) / Decimal(10) ** entry.token_decimals
                want = Decimal(value)
            elif field in ("cuda", "cc"):
                major, _, minor = value.partition(".")
                want = (int(major), int(minor or 0))
                if field == "cuda":
                    have = (entry.cuda_version // 1000, entry.cuda_version % 1000 // 10)
                else:
                    have = entry.cc
            else:
                have = {"vram": entry.vram_gib, "count": entry.gpu_count,
                        "score": Decimal(entry.score)}[field]
                want = Decimal(value)
            ok = {"=": have == want, "!=": have != want, "<": have < want, "<=": have <= want,
                  ">": have > want, ">=": have >= want}[op]
        if not ok:
            return False
    return True


def brute_sort_key(sort: str | None):
    desc = bool(sort) and sort.startswith("-")
    name = (sort or "price").lstrip("-")
    sign = -1 if desc else 1
    if name == "price":
        return lambda e: (sign * e.price_key, e.digest)
    attr = {"score": "score", "vram": "vram_gib", "count": "gpu_count"}[name]
    return lambda e: (sign * getattr(e, attr), e.price_key, e.digest)


def brute(book, query, sort, limit):
    found = sorted((e for e in book if brute_matches(e, query)), key=brute_sort_key(sort))
    return found if limit is None else found[:limit]


# --------------------------------------------------------------------------------------------
# Each field


@pytest.fixture(scope="module")
def full_book():
    return book_of(range(len(POOL)))


def ids(entries):
    return sorted(e.offer_id for e in entries)


@pytest.mark.parametrize("query", [
    "gpu=RTX_4090", "gpu=rtx_4090,a100_sxm4_80gb", "gpu=A100*", "gpu!=RTX_3090", "gpu=*3090",
    "vram>=40", "vram<24.5", "vram=80", "count>=2", "count=8", "count!=1",
    "price<=0.36", "price<0.36", "price>0.72", "price>=0.7236", "price=0.72", "price!=0.72",
    "price<=0.000000000000001", "price=0.72000000000000000000000000000000000001",
    "region=eu-*", "region!=eu-*", "region=us-dallas,jp-tokyo",
    "cuda>=12.2", "cuda<12", "cuda=11.8", "cc>=8.9", "cc=8.0", "cc<8.6",
    "token=usdc", "token!=USDC", "chain=31337", "chain!=1,31337", "chain=1",
    "gpu=RTX_4090 count>=2 price<=0.72 region=eu-*", "score>=0.5", "score<0.5",
])
def test_query__each_field_agrees_with_brute_force(full_book, query):
    assert ids(full_book.query(query)) == ids(brute(full_book, query, None, None))


def test_query__price_compares_exactly_in_whole_token_units(full_book):
    at_072 = {e.offer_id for e in full_book if e.price_per_gpu_hour == 200 * 3600
              and e.token_decimals == 6}
    assert at_072
    assert at_072 <= {e.offer_id for e in full_book.query("price<=0.72")}
    assert not at_072 & {e.offer_id for e in full_book.query("price<0.72")}
    assert not at_072 & {e.offer_id for e in full_book.query("price<=0.71999999")}
    # 18-decimal WETH offers cost 0.00000000000036 per GPU-hour or so: far below 0.36 USDC
    weth = full_book.query("token=WETH")
    assert weth and all(e.price_per_gpu_hour_tokens() < Decimal("0.000001") for e in weth)


@pytest.mark.parametrize("sort", ["price", "-price", "score", "-score", "vram", "-vram",
                                  "count", "-count"])
def test_query__sorts_by_each_field(sort):
    scores = {}
    book = book_of(range(len(POOL)), scores)
    for i, e in enumerate(book):
        scores[e.provider] = (i % 4) / 4
    book.rescore()
    assert book.query("", sort) == brute(book, "", sort, None)
    assert book.query("", sort, 5) == brute(book, "", sort, 5)
    book.score_walk_min_candidates = -10_000  # the score-index plan must give the same answer
    assert book.query("gpu=RTX_4090,A100*", sort, 5) == brute(book, "gpu=RTX_4090,A100*", sort, 5)


# Offers in one bucket (same model, count, region, ...) with repeated prices: the dearest-first
# plan walks a bucket's (price, digest) order backwards and must keep equal prices in digest
# order; the score and vram/count plans must keep the price-then-digest tie order too.
TIED = [offer(200 + i, price_per_gpu_second=(100, 150, 150, 150, 200, 200)[i % 6],
              count=(1, 2)[i % 2 == 0 and i > 8]).encode() for i in range(18)]


@pytest.mark.parametrize("plan", [None, "stream", "score_walk", "score_range", "collect"])
@pytest.mark.parametrize("sort", ["price", "-price", "score", "-score", "count", "-count"])
def test_query__ties_within_a_bucket_keep_the_total_order(plan, sort):
    # Three score levels, the lowest on the cheapest offers: a tie at the limit must be filled
    # from that score only.
    scores = {provider(200 + i)[0].public: (0.2, 0.8, 0.5, 0.5, 0.8, 0.5)[i % 6]
              for i in range(len(TIED))}
    book = OfferBook(Params(), bindings=BINDINGS, score_of=lambda p: scores[p])
    for data in TIED:
        book.ingest_offer(data, NOW)
    assert len(book._buckets) == 2
    book.force_plan = plan
    book.score_tie_min = -10_000 if plan == "score_walk" else 256
    for query in ("", "score>=0.8", "price<=0.54", "price!=0.54 score<0.8"):
        for limit in (None, 1, 3, 7, 9, 100):
            assert book.query(query, sort, limit) == brute(book, query, sort, limit), (query, limit)


def test_query__limit_cuts_after_sorting(full_book):
    cheapest = full_book.query("gpu=RTX_4090", "price", 3)
    assert len(cheapest) == 3
    assert cheapest == full_book.query("gpu=RTX_4090")[:3]
    assert full_book.query("", limit=0) == []
    with pytest.raises(LocalProtocolError):
        full_book.query("", limit=-1)


# --------------------------------------------------------------------------------------------
# Errors


def error_of(query: str) -> QueryError:
    with pytest.raises(QueryError) as exc:
        parse_query(query)
    return exc.value


def test_query__bad_value_points_at_column():
    err = error_of("price<=abc")
    assert err.reason == "bad value 'abc' for price at column 7: expected a number like 0.60"
    assert err.column == 7
    assert str(err).splitlines()[-2:] == ["  price<=abc", "         ^"]


def test_query__bad_value_in_later_term_points_at_that_term():
    err = error_of("gpu=RTX_4090 count>=two")
    assert err.column == 20 and "for count" in err.reason and "whole number" in err.reason
    err = error_of("gpu=RTX_4090,RTX 3090")  # the space starts a new term: "3090"
    assert err.column == 17 and "expected a field name" in err.reason


def test_query__unknown_field_suggests_nearest():
    err = error_of("vram>=24 prcie<=0.5")
    assert err.reason == "unknown field 'prcie' at column 9: did you mean 'price'?"
    assert "known fields" in error_of("colour=red").reason


def test_query__missing_or_disallowed_operator_points_at_it():
    err = error_of("count>=2 region")
    assert err.column == 15 and "expected an operator" in err.reason
    err = error_of("region<eu")
    assert err.column == 6 and "use = or !=" in err.reason


@pytest.mark.parametrize("query, column", [
    ("score>=1.5", 7), ("cuda>=twelve", 6), ("cc>=8.x", 4), ("chain=1,x", 8), ("vram>=", 6),
    ("price<=1e3", 7), ("price<=-1", 7), ("gpu=RTX_4090,", 13), ("price<=NaN", 7),
])
def test_query__malformed_values_point_at_the_value(query, column):
    assert error_of(query).column == column


def test_query__bad_sort_suggests_field():
    with pytest.raises(QueryError, match="did you mean 'price'"):
        parse_sort("-prize")
    assert parse_sort("-score").descending and parse_sort(None).field == "price"


def test_query__empty_query_matches_everything(full_book):
    assert len(full_book.query("   ")) == len(POOL)


# --------------------------------------------------------------------------------------------
# Property: indexed query == brute force


def term_strategy():
    num = st.sampled_from(["0", "0.36", "0.72", "0.7236", "1", "1.44", "24", "40", "80", "0.5",
                           "0.000000000000361", "0.7200000001", "2", "4", "8"])
    ops = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])
    eq = st.sampled_from(["=", "!="])
    return st.one_of(
        st.builds("{}{}{}".format, st.just("gpu"), eq, st.sampled_from(
            ["RTX_4090", "RTX_3090", "A100*", "*80GB", "RTX_4090,A100_SXM4_40GB", "H100"])),
        st.builds("{}{}{}".format, st.sampled_from(["vram", "price"]), ops, num),
        st.builds("{}{}{}".format, st.just("count"), ops, st.sampled_from(["1", "2", "3", "8"])),
        st.builds("{}{}{}".format, st.just("score"), ops,
                  st.sampled_from(["0", "0.25", "0.5", "0.8", "0.81", "1"])),
        st.builds("{}{}{}".format, st.just("region"), eq,
                  st.sampled_from(["eu-*", "us-dallas", "*o*", "jp-tokyo,eu-london"])),
        st.builds("{}{}{}".format, st.sampled_from(["cuda", "cc"]), ops,
                  st.sampled_from(["12.2", "12.4", "11.8", "8.0", "8.9", "8.6", "12"])),
        st.builds("{}{}{}".format, st.just("token"), eq, st.sampled_from(["USDC", "weth", "U*"])),
        st.builds("{}{}{}".format, st.just("chain"), eq, st.sampled_from(["31337", "1", "1,31337"])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    indices=st.lists(st.integers(0, len(POOL) - 1), unique=True, max_size=len(POOL)),
    score_values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.5, 0.8, 1.0]), min_size=len(POOL),
                          max_size=len(POOL)),
    terms=st.lists(term_strategy(), max_size=4),
    sort=st.sampled_from([None, "price", "-price", "score", "-score", "vram", "-vram", "count",
                          "-count"]),
    limit=st.one_of(st.none(), st.integers(1, 10)),
    walk_scores=st.booleans(),
    plan=st.sampled_from([None, "stream", "score_walk", "score_range", "collect"]),
    stream_ties=st.booleans(),
)
def test_query__random_queries_agree_with_brute_force(indices, score_values, terms, sort, limit,
                                                      walk_scores, plan, stream_ties):
    scores = {provider(100 + i)[0].public: score_values[i] for i in range(len(POOL))}
    book = book_of(indices, scores)
    if walk_scores:  # force the score-index plan even on a small book
        book.score_walk_min_candidates = -10_000
    if stream_ties:  # and its price-ordered handling of a tie at the limit
        book.score_tie_min = -10_000
    book.force_plan = plan  # every plan must give the brute-force answer
    query = " ".join(terms)
    got = book.query(query, sort, limit)
    assert got == brute(book, query, sort, limit), query


SCORE_VALUES = ["0", "1", "0.1", "0.3", "0.5", "0.81", "0.7", "0.2",
                "0.1000000000000000055511151231257827021181583404541015625",  # float 0.1 exactly
                "0.10000000000000001", "0.30000000000000004"]


def _near(x, ulps):
    import math

    for _ in range(abs(ulps)):
        x = math.nextafter(x, math.copysign(math.inf, ulps))
    return x


NEAR_SCORES = [0, 1] + [_near(float(v), u) for v in SCORE_VALUES for u in range(-2, 3)]


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
@pytest.mark.parametrize("value", SCORE_VALUES)
def test_query__score_residual_matches_the_exact_decimal_comparison(value, op):
    """The per-entry score check compares floats with precomputed float thresholds; it must
    agree with Term.test's exact Decimal comparison, also one ulp either side of the value."""
    from protocol.queryplan import _score_check

    term = parse_query(f"score{op}{value}").terms[0]
    check, _, threshold = _score_check(term)
    for score in NEAR_SCORES:
        assert check(score, threshold) == term.test(score), (score, op, value)


@settings(max_examples=300, deadline=None)
@given(score=st.floats(0, 1), value=st.sampled_from(SCORE_VALUES),
       op=st.sampled_from(["=", "!=", "<", "<=", ">", ">="]))
def test_query__score_residual_matches_decimal_for_any_float(score, value, op):
    from protocol.queryplan import _score_check

    term = parse_query(f"score{op}{value}").terms[0]
    check, _, threshold = _score_check(term)
    assert check(score, threshold) == term.test(score)


# --------------------------------------------------------------------------------------------
# The rank sort: known-good, established unknown, new unknown, known-bad; each by price


def brute_rank(book, query, limit, now, established_ms, proven_wallets=frozenset()):
    # specs/offerbook.md "Standing": each proven wallet's one offer is its held offer first
    # seen (since_ms), then the smallest provider key
    firsts = {}
    for e in book:
        if e.wallet in proven_wallets:
            k = (e.since_ms, e.provider)
            if e.wallet not in firsts or k < firsts[e.wallet]:
                firsts[e.wallet] = k
    proven = {k[1] for k in firsts.values()}

    def tier(e):
        if e.score > 0.5:
            return 0
        if e.score < 0.5:
            return 4
        if e.provider in proven:
            return 1
        return 2 if e.since_ms <= now - established_ms else 3

    found = sorted((e for e in book if brute_matches(e, query)),
                   key=lambda e: (tier(e), e.price_key, e.digest))
    return found if limit is None else found[:limit]


# Offers of 12 more provider keys bound to the wallets of POOL's first 6 providers (two keys
# per wallet besides the owner's): the proven tier takes one offer per wallet.
SHARED = [offer(300 + j, wallet_of=100 + j % 6, **POOL_SPECS[(j * 5) % len(POOL)]).encode()
          for j in range(12)]
RANK_POOL = POOL + SHARED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    indices=st.lists(st.integers(0, len(RANK_POOL) - 1), unique=True, max_size=len(RANK_POOL)),
    score_values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.5, 0.5, 0.8, 1.0]),
                          min_size=len(RANK_POOL), max_size=len(RANK_POOL)),
    arrivals=st.lists(st.sampled_from([0, 1000, 2000]), min_size=len(RANK_POOL),
                      max_size=len(RANK_POOL)),
    proven_owners=st.sets(st.integers(0, 9), max_size=6),
    restand_after=st.booleans(),
    drop=st.lists(st.integers(0, len(RANK_POOL) - 1), max_size=6),
    terms=st.lists(term_strategy(), max_size=3),
    limit=st.one_of(st.none(), st.integers(1, 10)),
    plan=st.sampled_from([None, "collect", "rank_scan", "rank_stream"]),
)
def test_query__rank_sort_agrees_with_brute_force(indices, score_values, arrivals, proven_owners,
                                                   restand_after, drop, terms, limit, plan):
    keys = [decode(d).provider for d in RANK_POOL]
    scores = {keys[i]: score_values[i] for i in range(len(RANK_POOL))}
    proven = {provider(100 + i)[2].wallet for i in proven_owners}
    known = set() if restand_after else proven
    params = Params().replace(book_established_ms=1500)
    book = OfferBook(params, bindings=BINDINGS, score_of=lambda p: scores.get(p, 0.5),
                     proven_of=lambda w: w in known)
    for i in sorted(indices, key=lambda i: arrivals[i]):
        book.ingest_offer(RANK_POOL[i], NOW + arrivals[i])
    if restand_after:  # the chain's standing arrives after the offers
        known = proven
        book.restand()
    for i in drop:  # a proven wallet's first offer leaves: the next one takes its place
        if book.held(keys[i]) is not None:
            book.ingest_withdrawal(withdrawal_of(RANK_POOL[i]), NOW + 2100)
    book.force_plan = plan
    query = " ".join(terms)
    now = NOW + 2500  # arrivals at 0 and 1000 are established (held >= 1500 ms), 2000 is new
    got = book.query(query, "rank", limit, now_ms=now)
    assert got == brute_rank(book, query, limit, now, 1500, proven), query
    assert sum(e.proven for e in book) == len({e.wallet for e in book if e.wallet in proven})


def withdrawal_of(data: bytes) -> bytes:
    o = decode(data)
    j = next(i for i in list(range(100, 148)) + list(range(300, 312))
             if _peer_of(i).public == o.provider)
    peer = _peer_of(j)
    return OfferWithdrawal(provider=peer.public, seq=o.seq, created_ms=NOW).sign(peer).encode()


def _peer_of(i: int):
    return provider(i)[0] if i < 300 else provider_of_wallet(i, 100 + (i - 300) % 6)[0]


def test_query__rank_keeps_known_and_established_providers_above_cheaper_fresh_sybils():
    # 10 honest H100-class offers at 0.72 USDC/GPU-h: 2 with a good record, 8 held for 2 h;
    # then 300 Sybil offers at a lower price from fresh keys. Sorted by price, the Sybils fill
    # the top 50; by rank, every honest offer comes first.
    from tests.protocol.book_helpers import offer as make

    good = {provider(5000 + i)[0].public for i in range(2)}
    book = OfferBook(Params(), bindings=BINDINGS,
                     score_of=lambda p: 0.9 if p in good else 0.5)
    t0 = NOW
    honest = [make(5000 + i, now=t0, model=A100_80, price_per_gpu_second=200, lifetime_ms=7_200_000)
              for i in range(10)]
    for o in honest:
        book.ingest_offer(o.encode(), t0)
    later = t0 + 2 * 3_600_000 - 60_000
    for n in range(300):
        book.ingest_offer(make(6000 + n, now=later, model=A100_80, price_per_gpu_second=99).encode(),
                          later)
    honest_keys = {o.provider for o in honest}
    by_price = book.query("gpu=A100*", "price", 50)
    assert not honest_keys & {e.provider for e in by_price}
    by_rank = book.query("gpu=A100*", "rank", 50, now_ms=later)
    assert {e.provider for e in by_rank[:10]} == honest_keys
    assert {e.provider for e in by_rank[:2]} == good  # a good record first
    # the score stays a visible filter: known-good only
    assert {e.provider for e in book.query("gpu=A100* score>0.5", "rank", 50, now_ms=later)} == good


def test_query__rank_sort_parses_and_needs_the_time():
    assert parse_sort("rank").field == "rank"
    with pytest.raises(QueryError):
        parse_sort("-rank")
    with pytest.raises(LocalProtocolError) as exc:
        book_of([0]).query("", "rank", 5)
    assert exc.value.code == "bad_argument"
