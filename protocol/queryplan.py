"""How the offer book answers a query: which buckets and index ranges it reads, in which order,
and where it stops (specs/offerbook.md, "Indexes"). `QueryPlanner` holds `OfferBook`'s query
methods; the book (protocol/offerbook.py) holds the indexes they read."""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from itertools import islice
from typing import TYPE_CHECKING, Any

from .errors import LocalProtocolError
from .query import (CLASS_BOUND_FIELDS, ON_DEMAND, RANK_SORT, SORT_FIELDS, UNKNOWN_SCORE, Query,
                    Sort, Term, parse_query, parse_sort, price_bounds)

if TYPE_CHECKING:
    from .offerbook import Entry, _Bucket
    from .params import Params
    from .sortedlist import SortedList

# Query fields that vary per offer, not per bucket: checked on each entry.
_ENTRY_ONLY_FIELDS = frozenset({"price", "score", "image", "class", "notice"})


class QueryPlanner:
    """`OfferBook.query` and its plans, over the book's indexes."""

    params: Params
    _buckets: dict[tuple, _Bucket]
    _by_score: SortedList
    _by_since: SortedList
    proven_entries: Callable[[], list[Entry]]

    # A score-sorted query with a limit walks the score index instead of sorting candidates
    # when there are more than this many candidates beyond 8 x limit (tests set 0 to force it).
    score_walk_min_candidates = 256
    # ... and takes a tie at the limit from the price order when the tie holds more than this
    # many offers beyond 8 x limit and that is cheaper than walking the tie (tests set it
    # negative to force it).
    score_tie_min = 256
    # Tests set a plan name ("stream", "score_walk", "score_range", "collect"; for the rank
    # sort "rank_scan", "rank_stream", "collect") to check every plan against the brute-force
    # filter on small books; a plan that cannot serve the query (e.g. "stream" for a score
    # sort, or any plan but "score_range" without a limit) falls back to collecting.
    force_plan: str | None = None


    def query(self, query: str | Query = "", sort: str | Sort | None = None,
              limit: int | None = None,
              where: Callable[[Entry], bool] | None = None, *,
              now_ms: int | None = None) -> list[Entry]:
        """Entries matching every term (and `where`, when given), in `sort` order (default:
        price ascending), at most `limit` of them. Raises QueryError for a malformed query or
        sort. The `rank` sort needs `now_ms` (its tiers depend on how long the book has held
        each provider).

        Plans (specs/offerbook.md, "Indexes"): with a limit, results are produced lazily in sort
        order and the query stops at the limit: cheapest/dearest-first merge the chosen buckets'
        price orders (forwards or backwards); vram/count sorts visit groups of buckets in that
        field's order and merge prices within a group; score sorts walk the score index. A
        score filter whose range holds few offers scans that range of the score index instead.
        Without a limit every candidate is collected and sorted."""
        q = parse_query(query) if isinstance(query, str) else query
        s = sort if isinstance(sort, Sort) else parse_sort(sort)
        if limit is not None and limit < 0:
            raise LocalProtocolError("bad_argument", "limit must be >= 0")
        if limit == 0:
            return []
        bucket_terms = [t for t in q.terms if t.field not in _ENTRY_ONLY_FIELDS]
        if q.class_bound and q.only_on_demand():
            # The on-demand class only: its price is the offer's, so the price index serves;
            # the class is a per-entry check (the offer has GPUs in no interruptible set).
            if not q.accepts_on_demand():
                return []  # e.g. class=on-demand class=interruptible: no class is both
            return self.query(q.without_class_terms(), s, limit,
                              _has_on_demand if where is None else _both(_has_on_demand, where),
                              now_ms=now_ms)
        if q.class_bound:
            return self._query_classes(q, _choose_buckets(self._buckets.values(), bucket_terms),
                                       s, limit, where, now_ms)
        price_ne = [t for t in q.terms if t.field == "price" and t.op == "!="]
        score_terms = [t for t in q.terms if t.field == "score"]
        lo, hi = price_bounds(q.terms)
        if lo is not None and hi is not None and lo >= hi:
            return []
        lo_key = None if lo is None else (lo,)
        hi_key = None if hi is None else (hi,)

        buckets = _choose_buckets(self._buckets.values(), bucket_terms)
        residual = _residual(price_ne + score_terms)
        for t in (t for t in q.terms if t.field == "image"):  # few offers name images: per entry
            residual = _both(residual, _image_check(t)) if residual is not None else _image_check(t)
        if where is not None:
            residual = where if residual is None else _both(residual, where)
        if s.field == "rank":
            return self._query_rank(buckets, lo, hi, residual, limit, self._rank_cutoff(now_ms))

        def count_candidates() -> int:
            return sum(b.entries.count(lo_key, hi_key) for b in buckets)

        plan = self.force_plan
        s_lo, s_hi = _score_keys(score_terms)
        n_candidates = 0
        if plan is None and score_terms and (s_lo is not None or s_hi is not None):
            # A score range with few offers in it: scanning that range beats streaming the
            # buckets, which would pass over about limit * len / n_score offers to find limit
            # (and over every candidate without a limit).
            n_score = self._by_score.count(s_lo, s_hi)
            stream_cost = None if limit is None else limit * len(self) // max(n_score, 1)
            if stream_cost is None or n_score < stream_cost:
                n_candidates = count_candidates()
                if n_score < (n_candidates if stream_cost is None
                              else min(n_candidates, stream_cost)):
                    plan = "score_range"
        if plan is None and limit is not None:
            if s.field == "score":
                n_candidates = n_candidates or count_candidates()
                if n_candidates > 8 * limit + self.score_walk_min_candidates:
                    plan = "score_walk"
            else:
                plan = "stream"
        if plan == "score_range":
            return self._query_score_range(buckets, lo, hi, residual, s, limit, s_lo, s_hi)
        if plan == "score_walk" and s.field == "score" and limit is not None:
            return self._query_by_score(buckets, lo, hi, residual, s, limit, s_lo, s_hi)
        if plan == "stream" and s.field != "score" and limit is not None:
            return self._query_stream(buckets, lo_key, hi_key, residual, s, limit)
        out: list[Entry] = []
        for b in buckets:
            for sl in b.entries.slices(lo_key, hi_key):
                out.extend(sl if residual is None else filter(residual, sl))
        return _in_order(out, s, limit)

    def _rank_cutoff(self, now_ms: int | None) -> int:
        """A rank sort's `established_before_ms`: providers first held before it are established."""
        if now_ms is None:
            raise LocalProtocolError("bad_argument", "a rank sort needs now_ms")
        return now_ms - self.params.book_established_ms

    def _query_classes(self, q: Query, buckets: list[_Bucket], s: Sort, limit: int | None,
                       where: Callable[[Entry], bool] | None, now_ms: int | None) -> list[Entry]:
        # A class-bound query (a `class` or `notice` term): price is the matching class's, so
        # the price index (the on-demand price) cannot bound it. The candidates are the chosen
        # buckets' entries, or only the book's offers with an interruptible set when no
        # on-demand class can match; each is checked and sorted by its class price.
        chosen = set(buckets)
        if q.needs_interruptible():
            pool: Iterable[Entry] = (e for e in self._spot.values() if e.bucket in chosen)
        else:
            pool = (e for b in buckets for sl in b.entries.slices(None, None) for e in sl)
        others = [t for t in q.terms if t.field not in CLASS_BOUND_FIELDS
                  and t.field not in _BUCKET_ATTR]
        found: dict[bytes, int] = {}
        out = []
        for e in pool:
            if not all(t.test(getattr(e, t.attr)) for t in others):
                continue
            if where is not None and not where(e):
                continue
            price = q.class_price(e)
            if price is not None:
                found[e.digest] = price
                out.append(e)
        cutoff = self._rank_cutoff(now_ms) if s.field == "rank" else None
        out.sort(key=s.class_key(lambda e: found[e.digest], cutoff))
        return out if limit is None else out[:limit]

    def _query_stream(self, buckets: list[_Bucket], lo_key: tuple | None, hi_key: tuple | None,
                      residual: Callable[[Entry], bool] | None, s: Sort,
                      limit: int) -> list[Entry]:
        # Results in sort order, lazily; stop after `limit`. Buckets are sorted by
        # (price_key, digest), which is the tie order of every sort.
        if s.field == "price":
            if s.descending:
                streams = [_desc_price(b.entries.slices(lo_key, hi_key)) for b in buckets]
                merged: Iterator[Entry] = heapq.merge(*streams, key=_neg_pkey)
            else:
                streams = [b.entries.irange(lo_key, hi_key) for b in buckets]
                merged = heapq.merge(*streams, key=_pkey)
            if residual is not None:
                merged = filter(residual, merged)
            return list(islice(merged, limit))
        # vram or count: constant within a bucket; visit groups of equal value in order.
        attr = SORT_FIELDS[s.field]
        groups: dict[Any, list[_Bucket]] = {}
        for b in buckets:
            groups.setdefault(getattr(b, attr), []).append(b)
        out: list[Entry] = []
        for value in sorted(groups, reverse=s.descending):
            streams = [b.entries.irange(lo_key, hi_key) for b in groups[value]]
            merged = heapq.merge(*streams, key=_pkey)
            if residual is not None:
                merged = filter(residual, merged)
            out.extend(islice(merged, limit - len(out)))
            if len(out) >= limit:
                break
        return out

    def _query_rank(self, buckets: list[_Bucket], lo: int | None, hi: int | None,
                    residual: Callable[[Entry], bool] | None, limit: int | None,
                    cutoff: int) -> list[Entry]:
        # Tier by tier (query.rank_tier), each in price order. Known-good and known-bad
        # providers are ranges of the score index (few: only providers this node rented
        # from); proven wallets' offers are the book's list of them. Other unknown ones: when established providers are few, scan them in the since
        # index, then stream new ones from the buckets' price order; otherwise stream both,
        # established ones taken as they come and new ones kept aside until enough are found.
        key = RANK_SORT.key(cutoff)
        lo_key = None if lo is None else (lo,)
        hi_key = None if hi is None else (hi,)
        if limit is None or self.force_plan == "collect":
            out = [e for b in buckets for sl in b.entries.slices(lo_key, hi_key)
                   for e in (sl if residual is None else filter(residual, sl))]
            return _in_order(out, RANK_SORT, limit, key)
        chosen = set(buckets)

        def score_range(s_lo: tuple | None, s_hi: tuple | None) -> list[Entry]:
            found = [e for sl in self._by_score.slices(s_lo, s_hi) for e in sl
                     if e.bucket in chosen
                     and (lo is None or e.price_key >= lo) and (hi is None or e.price_key < hi)
                     and (residual is None or residual(e))]
            found.sort(key=_pkey)
            return found

        above = (math.nextafter(UNKNOWN_SCORE, math.inf),)
        out = score_range(above, None)[:limit]
        need = limit - len(out)
        if need:
            # Proven wallets' offers (tier 1): one per proven wallet, few (each proven wallet
            # was paid on the escrow by several renters).
            proven = [e for e in self.proven_entries()
                      if e.score == UNKNOWN_SCORE and e.bucket in chosen
                      and (lo is None or e.price_key >= lo) and (hi is None or e.price_key < hi)
                      and (residual is None or residual(e))]
            proven.sort(key=_pkey)
            out += proven[:need]
            need = limit - len(out)
        est_hi = (cutoff + 1,)  # (since_ms, provider) keys with since_ms <= cutoff lie below
        n_est = self._by_since.count(None, est_hi)
        scan = n_est * n_est < need * len(self)
        if self.force_plan in ("rank_scan", "rank_stream"):
            scan = self.force_plan == "rank_scan"
        if need and scan:
            # Few established providers (a flood of new ones, or a node that just started):
            # scan them, then stream the new ones, which are then most of the unknown offers.
            # Streaming for the established ones would pass over about need * len / n_est.
            est = [e for sl in self._by_since.slices(None, est_hi) for e in sl
                   if e.score == UNKNOWN_SCORE and not e.proven and e.bucket in chosen
                   and (lo is None or e.price_key >= lo) and (hi is None or e.price_key < hi)
                   and (residual is None or residual(e))]
            est.sort(key=_pkey)
            out += est[:need]
            need = limit - len(out)
            if need:
                merged = heapq.merge(*[b.entries.irange(lo_key, hi_key) for b in buckets],
                                     key=_pkey)
                newer = filter(lambda e: e.score == UNKNOWN_SCORE and e.since_ms > cutoff
                               and not e.proven and (residual is None or residual(e)), merged)
                out += islice(newer, need)
        elif need:
            established: list[Entry] = []
            newer_kept: list[Entry] = []
            merged = heapq.merge(*[b.entries.irange(lo_key, hi_key) for b in buckets], key=_pkey)
            for e in merged:
                if (e.score != UNKNOWN_SCORE or e.proven
                        or (residual is not None and not residual(e))):
                    continue
                if e.since_ms <= cutoff:
                    established.append(e)
                    if len(established) == need:
                        break
                elif len(newer_kept) < need:
                    newer_kept.append(e)
            out += established
            out += newer_kept[:limit - len(out)]
        if len(out) < limit:
            out += score_range(None, (UNKNOWN_SCORE,))[:limit - len(out)]
        return out

    def _query_score_range(self, buckets: list[_Bucket], lo: int | None, hi: int | None,
                           residual: Callable[[Entry], bool] | None, s: Sort,
                           limit: int | None, s_lo: tuple | None,
                           s_hi: tuple | None) -> list[Entry]:
        # Every offer whose score may satisfy the score terms (a slightly wider float range;
        # `residual` decides exactly), filtered by bucket and price, then sorted.
        chosen = set(buckets)
        out = []
        for sl in self._by_score.slices(s_lo, s_hi):
            for e in sl:
                if e.bucket not in chosen:
                    continue
                if (lo is not None and e.price_key < lo) or (hi is not None and e.price_key >= hi):
                    continue
                if residual is not None and not residual(e):
                    continue
                out.append(e)
        return _in_order(out, s, limit)

    def _query_by_score(self, buckets: list[_Bucket], lo: int | None, hi: int | None,
                        residual: Callable[[Entry], bool] | None, s: Sort,
                        limit: int, s_lo: tuple | None = None,
                        s_hi: tuple | None = None) -> list[Entry]:
        # Walk the score index in the asked direction (within the score terms' range); stop once
        # `limit` matches are found and the score has moved past the last of them (ties are
        # then ordered by the sort key). The index orders a tie by expiry, not price, so the
        # walk would pass over the whole tie group; when that group is large (a book where
        # most providers still have the unknown score 0.5), the tie's share of the result is
        # taken from the buckets' price order instead, filtered to that score.
        chosen = set(buckets)
        slices = self._by_score.slices(s_lo, s_hi)
        walk = _chain_reversed(slices) if s.descending else _chain(slices)
        found: list[Entry] = []
        key = s.key()
        for e in walk:
            if len(found) >= limit and e.score != found[-1].score:
                break
            if e.bucket not in chosen:
                continue
            if (lo is not None and e.price_key < lo) or (hi is not None and e.price_key >= hi):
                continue
            if residual is not None and not residual(e):
                continue
            found.append(e)
            if len(found) == limit:
                tie = e.score
                t_lo = (math.nextafter(tie, -math.inf),)
                t_hi = (math.nextafter(tie, math.inf),)
                n_tie = self._by_score.count(t_lo, t_hi)
                # Walking the rest of the tie costs up to n_tie; the price order passes over
                # about limit * len / n_tie offers to find the tie's share. Scores spread over
                # many values (ties of ~1,000 in 100,000) walk; a dominant score streams.
                if n_tie > 8 * limit + self.score_tie_min and (
                        self.score_tie_min < 0 or 4 * limit * len(self) < n_tie * n_tie):
                    keep = sorted((f for f in found if f.score != tie), key=key)
                    lo_key = None if lo is None else (lo,)
                    hi_key = None if hi is None else (hi,)
                    streams = [b.entries.irange(lo_key, hi_key) for b in buckets]
                    merged = heapq.merge(*streams, key=_pkey)
                    same = filter(lambda x: x.score == tie and (residual is None or residual(x)),
                                  merged)
                    return keep + list(islice(same, limit - len(keep)))
        found.sort(key=key)
        return found[:limit]


def _in_order(out: list[Entry], s: Sort, limit: int | None,
              key: Callable[[Entry], tuple] | None = None) -> list[Entry]:
    """`out` sorted by `s` (or `key`), cut at `limit`; a partial selection when only a few are
    wanted."""
    key = key or s.key()
    if limit is not None and len(out) > 4 * limit:
        return heapq.nsmallest(limit, out, key=key)
    out.sort(key=key)
    return out if limit is None else out[:limit]


def _pkey(e: Entry) -> tuple:
    return e._pkey


def _neg_pkey(e: Entry) -> tuple:
    return (-e.price_key, e.digest)


def _chain(slices: list[list]) -> Iterator[Entry]:
    for sl in slices:
        yield from sl


def _chain_reversed(slices: list[list]) -> Iterator[Entry]:
    for sl in reversed(slices):
        yield from reversed(sl)


def _desc_price(slices: list[list]) -> Iterator[Entry]:
    """A bucket's entries by (-price_key, digest): its (price_key, digest) order backwards,
    with each run of equal prices turned back to ascending digests."""
    run: list[Entry] = []
    run_price = None
    for e in _chain_reversed(slices):
        if e.price_key != run_price:
            if run:
                yield from reversed(run)
            run = [e]
            run_price = e.price_key
        else:
            run.append(e)
    yield from reversed(run)


def _score_keys(terms: list[Term]) -> tuple[tuple | None, tuple | None]:
    """Bounds [lo, hi) on the score index's keys that contain every offer whose score may
    satisfy the score terms. Scores are floats and terms exact Decimals, so the float bounds
    are widened by an ulp; the terms themselves are still checked per offer."""
    lo: float | None = None
    hi: float | None = None
    for t in terms:
        if t.op == "!=":
            continue
        f = float(t.value)
        if t.op in (">", ">=", "="):
            b = math.nextafter(f, -math.inf)
            lo = b if lo is None else max(lo, b)
        if t.op in ("<", "<=", "="):
            b = math.nextafter(math.nextafter(f, math.inf), math.inf)
            hi = b if hi is None else min(hi, b)
    return (None if lo is None else (lo,)), (None if hi is None else (hi,))


_BUCKET_ATTR = {"gpu": "models", "count": "gpu_count", "vram": "vram_gib", "region": "region",
                "cuda": "cuda_version", "cc": "cc", "token": "token_symbol", "chain": "chain_id"}


def _choose_buckets(buckets: Iterable[_Bucket], terms: list[Term]) -> list[_Bucket]:
    """The buckets every term accepts. Buckets share few distinct values per field (a handful
    of models, counts, regions), so each term is tested once per distinct value."""
    checks = [(t.test, _BUCKET_ATTR[t.field], {}) for t in terms]
    out = []
    for b in buckets:
        for test, attr, memo in checks:
            value = getattr(b, attr)
            ok = memo.get(value)
            if ok is None:
                ok = memo[value] = test(value)
            if not ok:
                break
        else:
            out.append(b)
    return out


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge}


def _never(_a: Any, _b: Any) -> bool:
    return False


def _always(_a: Any, _b: Any) -> bool:
    return True


def _score_check(t: Term) -> tuple[Callable[[Any, Any], bool], str, Any]:
    """A score term as one float comparison, exactly equivalent to comparing Decimal(score)
    with the term's Decimal (a float-Decimal comparison costs ~1 us, a float one ~30 ns):
    Decimal(x) >= v iff x >= the smallest float >= v, Decimal(x) <= v iff x <= the largest
    float <= v, and = holds only where v is itself a float."""
    v: Decimal = t.value
    f = float(v)
    exact = Decimal(f) == v
    ge = f if Decimal(f) >= v else math.nextafter(f, math.inf)  # smallest float >= v
    le = f if Decimal(f) <= v else math.nextafter(f, -math.inf)  # largest float <= v
    op = t.op
    if op == ">=":
        return operator.ge, "score", ge
    if op == "<":
        return operator.lt, "score", ge
    if op == "<=":
        return operator.le, "score", le
    if op == ">":
        return operator.gt, "score", le
    if op == "=":
        return (operator.eq if exact else _never), "score", f
    return (operator.ne if exact else _always), "score", f


def _both(first: Callable[[Entry], bool], second: Callable[[Entry], bool]) -> Callable[[Entry], bool]:
    return lambda e: first(e) and second(e)


def _has_on_demand(e: Entry) -> bool:
    return ON_DEMAND in e.classes


def _image_check(t: Term) -> Callable[[Entry], bool]:
    return lambda e: t.test(e.images)
def _residual(terms: list[Term]) -> Callable[[Entry], bool] | None:
    """The per-entry check of `price!=` and `score` terms: the same comparisons as
    `Term.test`, made directly (a float or int compares exactly with a Decimal)."""
    if not terms:
        return None
    checks = [_score_check(t) if t.field == "score" else (_OPS[t.op], t.attr, t.value)
              for t in terms]
    if len(checks) == 1:
        (op, attr, value), = checks
        getter = operator.attrgetter(attr)
        return lambda e: op(getter(e), value)

    def ok(e: Entry) -> bool:
        for op, attr, value in checks:
            if not op(getattr(e, attr), value):
                return False
        return True

    return ok
