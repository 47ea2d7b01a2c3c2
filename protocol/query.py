"""The renter's offer query language (specs/offerbook.md has the grammar and the field table).

    gpu=RTX_4090,RTX_3090 vram>=24 count>=2 price<=0.60 region=eu-* cuda>=12.2 score>=0.8

A query is terms separated by spaces, all of which must hold. A term is `field op value`.
Sorting (`parse_sort`) and the result limit are separate arguments of `OfferBook.query`.

Prices are in whole token units per GPU-hour and compared exactly (Decimal against the offer's
integer price in its smallest unit); no float ever touches a price. Columns in error messages
count from 0, like Python string indices, and a caret line points at the bad spot.

Pure parsing and a reference predicate (`Query.matches`): the indexed evaluation lives in
offerbook.py and is tested against `matches`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fnmatch import fnmatchcase
from typing import Any, Callable

from .errors import LocalProtocolError

PRICE_SCALE = 36  # prices are compared as integers scaled to 10**36 per whole token unit

OPS = ("!=", "<=", ">=", "=", "<", ">")
_TERM = re.compile(r"([A-Za-z_]*)(!=|<=|>=|==|=|<|>)?(.*)", re.S)
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?|\.[0-9]+")
_INTEGER = re.compile(r"[0-9]+")
_VERSION = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
_GLOB = re.compile(r"[A-Za-z0-9_.*?\-\[\]]+")
_IMAGE_GLOB = re.compile(r"[A-Za-z0-9_.*?\-\[\]:/@]+")  # image references: repo/name:tag@digest


class QueryError(LocalProtocolError):
    """A malformed query or sort: `reason` says what is wrong, `column` where (0-based), and the
    message repeats the query with a caret under the bad spot."""

    def __init__(self, reason: str, text: str, column: int) -> None:
        self.reason = reason
        self.text = text
        self.column = column
        super().__init__("bad_query", f"{reason}\n  {text}\n  {' ' * column}^")


# --------------------------------------------------------------------------------------------
# Fields


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "number", "integer", "version", "glob"
    attr: str  # attribute of an offer-book entry the term compares
    unit: str
    example: str
    ops: tuple[str, ...] = OPS


STRING_OPS = ("=", "!=")
FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("gpu", "glob", "models", "model token", "RTX_4090", STRING_OPS),
    Field("vram", "number", "vram_gib", "GiB per GPU (the smallest GPU)", "24"),
    Field("count", "integer", "gpu_count", "GPUs in the offer", "2"),
    Field("price", "number", "price_key", "token units per GPU-hour", "0.60"),
    Field("region", "glob", "region", "region as reported", "eu-*", STRING_OPS),
    Field("cuda", "version", "cuda_version", "CUDA major.minor", "12.2"),
    Field("score", "number", "score", "provider score 0..1", "0.8"),
    Field("cc", "version", "cc", "compute capability major.minor", "8.9"),
    Field("token", "glob", "token_symbol", "payment token symbol", "USDC", STRING_OPS),
    Field("chain", "integer", "chain_id", "EVM chain id", "8453", ("=", "!=")),
    Field("image", "glob", "images", "container image offered", "pytorch/pytorch:*", STRING_OPS),
    # Interruptible capacity: a query with a `class` or `notice` term picks one class of the
    # offer (its on-demand GPUs, or one interruptible set) that satisfies every class, notice
    # and price term together; `price` is then that class's price (specs/offerbook.md). Their
    # terms are tested by Term.test_class against query.offer_classes, never through `attr`.
    Field("class", "glob", "classes", "on-demand or interruptible", "interruptible", STRING_OPS),
    Field("notice", "integer", "notice_s", "seconds of preemption notice", "60"),
)}

# Terms whose presence binds a query to one class of an offer, and the terms then checked
# against that class rather than the offer.
CLASS_FIELDS = frozenset({"class", "notice"})
CLASS_BOUND_FIELDS = frozenset({"class", "notice", "price"})
ON_DEMAND, INTERRUPTIBLE = "ON-DEMAND", "INTERRUPTIBLE"

_EXPECTED = {
    "number": "a number like {example}",
    "integer": "a whole number like {example}",
    "version": "major.minor like {example}",
    "glob": "a name or a glob like {example} (comma-separated for any of)",
}

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


@dataclass(frozen=True)
class Term:
    """One parsed term. `value` is already in the entry attribute's unit: price as an exact
    Decimal scaled by 10**PRICE_SCALE, vram/score as Decimal, cuda as NVML's integer
    (major * 1000 + minor * 10), cc as a (major, minor) tuple, globs as upper-case patterns."""

    field: str
    op: str
    value: Any
    column: int

    @property
    def attr(self) -> str:
        return FIELDS[self.field].attr

    def test(self, value: Any) -> bool:
        """Does an entry's attribute value satisfy this term?"""
        if self.field == "gpu":  # an offer matches if any of its model tokens matches
            hit = any(_model_match(self.value, m) for m in value)
            return hit if self.op == "=" else not hit
        if self.field in ("image", "class"):  # an offer matches if any of its values matches
            hit = any(_glob_any(self.value, m) for m in value)
            return hit if self.op == "=" else not hit
        if FIELDS[self.field].kind == "glob":
            hit = _glob_any(self.value, value.upper())
            return hit if self.op == "=" else not hit
        if self.field == "chain":
            return (value in self.value) == (self.op == "=")
        if self.field == "notice" and value is None:  # no interruptible set: no notice at all
            return False
        if self.field == "score":  # scores are floats from the reputation module
            return _COMPARE[self.op](Decimal(value), self.value)
        return _COMPARE[self.op](value, self.value)


    def test_class(self, cls: str, notice_s: int | None, price_key: int) -> bool:
        """A class, notice or price term against one class of an offer: `cls` (ON_DEMAND or
        INTERRUPTIBLE), its notice (None on demand: no notice term holds) and its price key."""
        if self.field == "class":
            hit = _glob_any(self.value, cls)
            return hit if self.op == "=" else not hit
        if self.field == "notice":
            return notice_s is not None and _COMPARE[self.op](notice_s, self.value)
        return _COMPARE[self.op](price_key, self.value)


def offer_classes(entry: Any) -> list[tuple[str, int | None, int]]:
    """(class, notice_s or None, price key) of each class an entry sells: its on-demand GPUs
    (when it has any) at the offer's price, then each interruptible set at its own price."""
    out: list[tuple[str, int | None, int]] = []
    if ON_DEMAND in entry.classes:
        out.append((ON_DEMAND, None, entry.price_key))
    out.extend((INTERRUPTIBLE, notice, price) for notice, price in entry.spot)
    return out


def _glob_any(patterns: tuple[str, ...], value: str) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


def _model_match(patterns: tuple[str, ...], token: str) -> bool:
    """A gpu pattern matches a model token, or its leading words: `H100` finds `H100_80GB_HBM3`
    (as `H100_*` would), `RTX_4090` finds `RTX_4090_D`, but `H10` finds nothing."""
    return any(fnmatchcase(token, p) or fnmatchcase(token, p + "_*") for p in patterns)


@dataclass(frozen=True)
class Query:
    text: str
    terms: tuple[Term, ...]

    @property
    def class_bound(self) -> bool:
        """A `class` or `notice` term binds the query to one class of an offer."""
        return any(t.field in CLASS_FIELDS for t in self.terms)

    @cached_property
    def _bound(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.field in CLASS_BOUND_FIELDS)

    def class_price(self, entry: Any) -> int | None:
        """A class-bound query: the lowest price key among the entry's classes that satisfy
        every class, notice and price term; None when none does."""
        bound = self._bound
        best = None
        for c, n, p in offer_classes(entry):
            if (best is None or p < best) and all(t.test_class(c, n, p) for t in bound):
                best = p
        return best

    def only_on_demand(self) -> bool:
        """Only an offer's on-demand GPUs can satisfy the class terms (no notice term, and a
        class term refuses interruptible): price is then the on-demand price, as unbound."""
        return not any(t.field == "notice" for t in self.terms) and any(
            t.field == "class" and not t.test_class(INTERRUPTIBLE, 0, 0) for t in self.terms)

    def accepts_on_demand(self) -> bool:
        """Every class term holds for an on-demand class (and no notice term asks for one)."""
        return all(t.test_class(ON_DEMAND, None, 0) for t in self.terms if t.field in CLASS_FIELDS)

    def without_class_terms(self) -> "Query":
        return Query(self.text, tuple(t for t in self.terms if t.field not in CLASS_FIELDS))

    def needs_interruptible(self) -> bool:
        """Only an interruptible set can satisfy the class terms (a notice term, or a class
        term that refuses on-demand): the book then looks at offers with a set only."""
        return any(t.field == "notice" or (t.field == "class" and not t.test_class(ON_DEMAND, None, 0))
                   for t in self.terms)

    def matches(self, entry: Any) -> bool:
        """Reference semantics: every term holds for the entry (a plain scan; the book's indexed
        query must agree with it). Class-bound: the offer-level terms hold, and one class of
        the offer satisfies the class, notice and price terms together."""
        if not self.class_bound:
            return all(t.test(getattr(entry, t.attr)) for t in self.terms)
        return (all(t.test(getattr(entry, t.attr)) for t in self.terms
                    if t.field not in CLASS_BOUND_FIELDS)
                and self.class_price(entry) is not None)


def parse_query(text: str) -> Query:
    """Parse a query string. Raises QueryError pointing at the first bad term."""
    if not isinstance(text, str):
        raise LocalProtocolError("bad_argument", "a query is a str")
    terms = []
    for m in re.finditer(r"\S+", text):
        terms.append(_parse_term(m.group(), m.start(), text))
    return Query(text, tuple(terms))


def _parse_term(raw: str, col: int, text: str) -> Term:
    m = _TERM.fullmatch(raw)
    assert m is not None  # the pattern matches any string
    name, op, value = m.group(1), m.group(2), m.group(3)
    if not name:
        raise QueryError(f"expected a field name at column {col}, got {raw!r}", text, col)
    key = name.lower()
    field = FIELDS.get(key)
    if field is None:
        near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
        hint = f"did you mean '{near[0]}'?" if near else "known fields: " + ", ".join(FIELDS)
        raise QueryError(f"unknown field '{name}' at column {col}: {hint}", text, col)
    op_col = col + len(name)
    if op is None:
        raise QueryError(
            f"expected an operator ({' '.join(OPS)}) after '{key}' at column {op_col}",
            text, op_col)
    if op == "==":
        op = "="
    if op not in field.ops:
        raise QueryError(
            f"operator '{op}' is not allowed for {key} at column {op_col}: use "
            + " or ".join(field.ops), text, op_col)
    vcol = op_col + len(m.group(2))
    return Term(key, op, _parse_value(field, value, vcol, text), col)


def _bad(field: Field, value: str, col: int, text: str, extra: str = "") -> QueryError:
    expected = _EXPECTED[field.kind].format(example=field.example)
    shown = f"'{value}'" if value else "an empty value"
    why = extra or f"expected {expected}"
    return QueryError(f"bad value {shown} for {field.name} at column {col}: {why}", text, col)


def _parse_value(field: Field, value: str, col: int, text: str) -> Any:
    if field.kind == "glob":
        parts = value.split(",")
        pos = col
        for p in parts:
            if not (_IMAGE_GLOB if field.name == "image" else _GLOB).fullmatch(p):
                raise _bad(field, p, pos, text)
            pos += len(p) + 1
        return tuple(p.upper() for p in parts)
    if field.name == "chain":
        parts = value.split(",")
        pos = col
        for p in parts:
            if not _INTEGER.fullmatch(p):
                raise _bad(field, p, pos, text)
            pos += len(p) + 1
        return frozenset(int(p) for p in parts)
    if field.kind == "integer":
        if not _INTEGER.fullmatch(value):
            raise _bad(field, value, col, text)
        return int(value)
    if field.kind == "version":
        vm = _VERSION.fullmatch(value)
        if not vm:
            raise _bad(field, value, col, text)
        major, minor = int(vm.group(1)), int(vm.group(2) or 0)
        if field.name == "cuda":
            return major * 1000 + minor * 10
        return (major, minor)
    # number
    if not _NUMBER.fullmatch(value):
        raise _bad(field, value, col, text)
    number = Decimal(value)
    if field.name == "score" and number > 1:
        raise _bad(field, value, col, text, "a score is between 0 and 1")
    if field.name == "price":
        return number.scaleb(PRICE_SCALE)
    return number


# --------------------------------------------------------------------------------------------
# Sorting


UNKNOWN_SCORE = 0.5  # the reputation module's score of a provider with no history

# Tiers of the `rank` sort, best first (specs/offerbook.md, "Ranking").
TIER_KNOWN_GOOD, TIER_PROVEN, TIER_ESTABLISHED, TIER_NEW, TIER_KNOWN_BAD = 0, 1, 2, 3, 4


def rank_tier(score: float, since_ms: int, established_before_ms: int,
              proven: bool = False) -> int:
    """The `rank` tier of an offer: a provider with a good record (score above unknown) first,
    then unknown providers whose wallet is proven on the escrow (`proven`: the book's one
    offer for that wallet, specs/offerbook.md "Standing"), then unknown providers the book has
    held since `established_before_ms` or earlier, then newer unknown ones, then providers
    with a bad record."""
    if score > UNKNOWN_SCORE:
        return TIER_KNOWN_GOOD
    if score < UNKNOWN_SCORE:
        return TIER_KNOWN_BAD
    if proven:
        return TIER_PROVEN
    return TIER_ESTABLISHED if since_ms <= established_before_ms else TIER_NEW


@dataclass(frozen=True)
class Sort:
    field: str  # "price", "score", "vram", "count", "rank"
    descending: bool

    def class_key(self, price_of: Callable[[Any], int],
                  established_before_ms: int | None = None) -> Callable[[Any], tuple]:
        """`key` with `price_of(entry)` (a class-bound query's class price) in place of the
        offer's price, in the field and in the tie order."""
        if self.field == "rank":
            if established_before_ms is None:
                raise LocalProtocolError("bad_argument", "a rank sort needs the current time")
            cut = established_before_ms
            return lambda e: (rank_tier(e.score, e.since_ms, cut, e.proven), price_of(e), e.digest)
        if self.field == "price":
            sign = -1 if self.descending else 1
            return lambda e: (sign * price_of(e), e.digest)
        attr = SORT_FIELDS[self.field]
        if self.descending:
            return lambda e: (-getattr(e, attr), price_of(e), e.digest)
        return lambda e: (getattr(e, attr), price_of(e), e.digest)

    def key(self, established_before_ms: int | None = None) -> Callable[[Any], tuple]:
        """Total order: the field (in the asked direction), then price ascending, then digest.
        `rank` needs `established_before_ms` (now - book_established_ms)."""
        if self.field == "rank":
            if established_before_ms is None:
                raise LocalProtocolError("bad_argument", "a rank sort needs the current time")
            cut = established_before_ms
            return lambda e: (rank_tier(e.score, e.since_ms, cut, e.proven), e.price_key,
                              e.digest)
        attr = SORT_FIELDS[self.field]
        if self.field == "price":
            if self.descending:
                return lambda e: (-e.price_key, e.digest)
            return lambda e: (e.price_key, e.digest)
        if self.descending:
            return lambda e: (-getattr(e, attr), e.price_key, e.digest)
        return lambda e: (getattr(e, attr), e.price_key, e.digest)


SORT_FIELDS = {"price": "price_key", "score": "score", "vram": "vram_gib", "count": "gpu_count"}
SORT_NAMES = (*SORT_FIELDS, "rank")
DEFAULT_SORT = Sort("price", False)
RANK_SORT = Sort("rank", False)  # the default of a renter's search (node/control.py)


def parse_sort(text: str | None) -> Sort:
    """`price`, `-price`, `score`, `-score`, `vram`, `-vram`, `count`, `-count` (`-`: descending),
    or `rank` (one direction only). None or empty: price ascending."""
    if not text:
        return DEFAULT_SORT
    descending = text.startswith("-")
    name = text[1:] if descending else text.lstrip("+")
    col = len(text) - len(name)
    if name.lower() == "rank":
        if descending:
            raise QueryError("'rank' sorts best first only: drop the '-'", text, 0)
        return RANK_SORT
    if name.lower() not in SORT_FIELDS:
        near = difflib.get_close_matches(name.lower(), SORT_NAMES, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else "sort by " + ", ".join(SORT_NAMES)
        raise QueryError(f"cannot sort by '{name}' at column {col}: {hint}", text, col)
    return Sort(name.lower(), descending)


# --------------------------------------------------------------------------------------------
# Price bounds as integers (used by the index; exact)


def price_bounds(terms: tuple[Term, ...]) -> tuple[int | None, int | None]:
    """The integer range [lo, hi) of scaled prices that every price term except `!=` allows;
    None for an open end. An empty range comes back as lo >= hi."""
    lo: int | None = None
    hi: int | None = None
    for t in terms:
        if t.field != "price" or t.op == "!=":
            continue
        v: Decimal = t.value
        floor_v = int(v.to_integral_value(rounding=ROUND_FLOOR))
        ceil_v = int(v.to_integral_value(rounding=ROUND_CEILING))
        new_lo = new_hi = None
        if t.op == "<=":
            new_hi = floor_v + 1
        elif t.op == "<":
            new_hi = ceil_v
        elif t.op == ">=":
            new_lo = ceil_v
        elif t.op == ">":
            new_lo = floor_v + 1
        else:  # "="
            if floor_v != ceil_v:
                return 0, 0  # a price with more decimals than any offer can have
            new_lo, new_hi = floor_v, floor_v + 1
        if new_lo is not None:
            lo = new_lo if lo is None else max(lo, new_lo)
        if new_hi is not None:
            hi = new_hi if hi is None else min(hi, new_hi)
    return lo, hi
