"""The offer book a renter keeps: one live offer per provider, indexed for queries.

Rules (specs/offerbook.md is the prose twin):

- Replacement: the highest sequence number wins. An offer is validated by `validate_offer`
  with the provider's held seq/digest and withdrawal watermark, so a lower seq is IGNOREd
  (`stale_seq`), a second different offer under the held seq is REJECTed (`equivocation`).
- Withdrawal: removes the held offer if its seq <= the withdrawal's, and leaves a watermark
  that blocks every seq <= it until no offer signed before the withdrawal can still be live
  (withdrawal created_ms + offer_max_lifetime_ms + clock_skew_ms).
- Expiry: an offer leaves the book once `now_ms > expires_ms + clock_skew_ms`, exactly when
  `validate_offer` would start ignoring it as expired. A heap by deadline, cleaned lazily;
  `next_deadline()` says when to call `expire` next.
- Caps: at most `params.book_max_providers` offers and as many withdrawal watermarks, and at
  most `params.book_max_bytes` wire bytes of live offers. An offer that does not fit displaces
  the weakest held offers by the keep order (score, then the provider first seen longest ago,
  then the later expiry) only if it outranks every one of them; otherwise it is IGNOREd with
  `book_full`. Providers with a track record (score above the unknown 0.5) are never pushed out
  by fresh identities, which cost an attacker nothing to make, and among unknown providers the
  ones the book has held longest stay.

Indexes: entries are grouped in buckets by every low-cardinality fact a query can filter on
(model tokens, GPU count, VRAM, region, CUDA, compute capability, token, chain); a query decides
each bucket once, then takes a price range from the bucket, which is kept sorted by price. A
global index by the keep order (score, -since, expiry) serves score filters and sorts, the
eviction policy and the `rank` sort's known-good and known-bad tiers.
"""

from __future__ import annotations

import functools
import heapq
import math
import operator
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from itertools import chain, islice
from typing import Any

from .encoding import decode
from .errors import Ignore, LocalProtocolError
from .messages import SIG_TAIL, Offer, OfferWithdrawal, key_prefix
from .params import Params
from .query import (PRICE_SCALE, RANK_SORT, SORT_FIELDS, UNKNOWN_SCORE, Query, Sort, Term,
                    parse_query, parse_sort, price_bounds)
from .validation import (BindingCache, offer_header, validate_offer, validate_reannouncement,
                         validate_withdrawal)
from .verifier import VERIFIER, Verifier

OFFER_ID_LEN = 12


_OFFER_PREFIX = key_prefix(Offer)
_WITHDRAWAL_PREFIX = key_prefix(OfferWithdrawal)
_VENDOR_WORDS = frozenset({"NVIDIA", "AMD", "INTEL", "GEFORCE", "TESLA", "QUADRO"})
_NON_ALNUM = re.compile(r"[^A-Z0-9]+")


@functools.lru_cache(maxsize=4096)  # few distinct names; bounded against made-up ones
def model_token(name: str) -> str:
    """Normalise an NVML model name to a query token: upper-case, every run of characters other
    than A-Z and 0-9 becomes one `_`, leading vendor/brand words (NVIDIA, AMD, INTEL, GEFORCE,
    TESLA, QUADRO) are dropped. "NVIDIA GeForce RTX 4090" -> "RTX_4090",
    "NVIDIA A100-SXM4-80GB" -> "A100_SXM4_80GB". A name of only vendor words keeps them."""
    words = [w for w in _NON_ALNUM.split(name.upper()) if w]
    i = 0
    while i < len(words) - 1 and words[i] in _VENDOR_WORDS:
        i += 1
    return "_".join(words[i:]) or "UNKNOWN"


@functools.lru_cache(maxsize=4096)
def _models_of(names: tuple[str, ...]) -> tuple[str, ...]:
    """An offer's model tokens, sorted, from its distinct NVML names."""
    return tuple(sorted({model_token(n) for n in names}))


_PRICE_SCALES = tuple(10 ** (PRICE_SCALE - d) for d in range(PRICE_SCALE + 1))


def vram_gib(vram_mib: int) -> int:
    """VRAM in whole GiB, rounded half up: NVML's 24564 MiB for an RTX 4090 is 24 GiB."""
    return (vram_mib + 512) // 1024


class Entry:
    """One live offer with the facts queries use, derived once at insertion. The decoded
    `Offer` is not kept (memory): `offer` decodes the held wire bytes again on demand."""

    __slots__ = (
        "data", "digest", "provider", "seq", "expires_ms", "models", "gpu_count",
        "vram_mib", "vram_gib", "region", "cuda_version", "cc", "token_symbol", "chain_id",
        "escrow", "token_decimals", "price_per_gpu_hour", "price_key", "score", "bucket", "_pkey", "_skey",
        "body_at", "since_ms",
    )

    def __init__(self, offer: Offer, data: bytes, digest: bytes, score: float,
                 body_at: int, since_ms: int = 0) -> None:
        # Runs once per ingested offer: kept cheap (single-GPU offers skip the loops, model
        # tokens are cached per set of names, the price scale per token decimals).
        gpus = offer.gpus
        terms = offer.terms
        self.data = data
        self.digest = digest
        self.provider = offer.provider
        self.seq = offer.seq
        self.expires_ms = offer.expires_ms
        g0 = gpus[0]
        if len(gpus) == 1:
            self.models = _models_of((g0.model,))
            vram, cuda, cc = g0.vram_mib, g0.cuda_version, (g0.cc_major, g0.cc_minor)
        else:
            self.models = _models_of(tuple({g.model: None for g in gpus}))
            vram = min([g.vram_mib for g in gpus])
            cuda = min([g.cuda_version for g in gpus])
            cc = min([(g.cc_major, g.cc_minor) for g in gpus])
        self.gpu_count = len(gpus)
        self.vram_mib = vram
        self.vram_gib = (vram + 512) // 1024  # vram_gib(vram)
        self.region = offer.host.region
        self.cuda_version = cuda
        self.cc = cc
        self.token_symbol = terms.token_symbol
        self.chain_id = terms.chain_id
        self.escrow = terms.escrow
        decimals = self.token_decimals = terms.token_decimals
        price = self.price_per_gpu_hour = terms.price_per_gpu_second * 3600  # smallest unit
        # Comparable across tokens of different decimals (validation caps decimals at 36).
        self.price_key = price * (_PRICE_SCALES[decimals] if decimals <= PRICE_SCALE
                                  else 10 ** (PRICE_SCALE - decimals))
        self.score = score
        self.bucket: _Bucket | None = None
        # since_ms: when this book first held an offer of this provider (kept while it holds
        # one without a break); the keep order puts the longest-held first among equal scores.
        self.since_ms = since_ms
        self._pkey = (self.price_key, digest)
        self._skey = (score, -since_ms, self.expires_ms, digest)
        self.body_at = body_at  # where the body starts (see validation.offer_header)

    def reannounced(self, data: bytes, digest: bytes, header: tuple[int, int, int, int],
                    score: float) -> "Entry":
        """The entry of a re-announcement with this entry's body: every derived fact reads the
        body, so they carry over; only the header's facts are new."""
        new = Entry.__new__(Entry)
        new.provider = self.provider
        new.models = self.models
        new.gpu_count = self.gpu_count
        new.vram_mib = self.vram_mib
        new.vram_gib = self.vram_gib
        new.region = self.region
        new.cuda_version = self.cuda_version
        new.cc = self.cc
        new.token_symbol = self.token_symbol
        new.chain_id = self.chain_id
        new.escrow = self.escrow
        new.token_decimals = self.token_decimals
        new.price_per_gpu_hour = self.price_per_gpu_hour
        new.price_key = self.price_key
        new.data = data
        new.digest = digest
        new.seq, _, new.expires_ms, new.body_at = header
        new.score = score
        new.bucket = None
        new.since_ms = self.since_ms
        new._pkey = (self.price_key, digest)
        new._skey = (score, -new.since_ms, new.expires_ms, digest)
        return new

    def body(self) -> bytes:
        return self.data[self.body_at:-SIG_TAIL]

    @property
    def offer_id(self) -> str:
        """The display id: the digest's first OFFER_ID_LEN hex characters."""
        return self.digest[:OFFER_ID_LEN // 2].hex()

    @property
    def offer(self) -> Offer:
        offer = decode(self.data, Offer)
        assert isinstance(offer, Offer)
        return offer

    def price_per_gpu_hour_tokens(self) -> Decimal:
        """Price per GPU-hour in whole token units, exact."""
        return Decimal(self.price_per_gpu_hour).scaleb(-self.token_decimals)

    def bucket_key(self) -> tuple:
        return (self.models, self.gpu_count, self.vram_gib, self.region, self.cuda_version,
                self.cc, self.token_symbol, self.chain_id)

    def __repr__(self) -> str:
        return (f"Entry({self.offer_id} {'+'.join(self.models)} x{self.gpu_count} "
                f"{self.price_per_gpu_hour_tokens()} {self.token_symbol}/GPU-h {self.region})")


# Bucket-level facts, in bucket_key order, as (query field, entry attribute).
_BUCKET_FIELDS = ("gpu", "count", "vram", "region", "cuda", "cc", "token", "chain")
_ENTRY_ONLY_FIELDS = frozenset({"price", "score"})


class _SortedList:
    """A list of unique, totally ordered keys with a value each, kept sorted in chunks so an
    insertion moves at most a chunk (the idea of sortedcontainers.SortedList, cut down)."""

    __slots__ = ("_keys", "_vals", "_maxes", "_len")
    CHUNK = 512

    def __init__(self) -> None:
        self._keys: list[list] = []
        self._vals: list[list] = []
        self._maxes: list = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: Any, value: Any) -> None:
        maxes = self._maxes
        self._len += 1
        if not maxes:
            self._keys.append([key])
            self._vals.append([value])
            maxes.append(key)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            keys, vals = self._keys[i], self._vals[i]
            keys.append(key)
            vals.append(value)
            maxes[i] = key
        else:
            keys, vals = self._keys[i], self._vals[i]
            j = bisect_left(keys, key)
            keys.insert(j, key)
            vals.insert(j, value)
        if len(keys) > 2 * self.CHUNK:
            half = self.CHUNK
            self._keys[i:i + 1] = [keys[:half], keys[half:]]
            self._vals[i:i + 1] = [vals[:half], vals[half:]]
            maxes[i:i + 1] = [keys[half - 1], keys[-1]]

    def remove(self, key: Any) -> None:
        maxes = self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):
            raise KeyError(key)
        keys = self._keys[i]
        j = bisect_left(keys, key)
        if keys[j] != key:
            raise KeyError(key)
        del keys[j]
        del self._vals[i][j]
        self._len -= 1
        if not keys:
            del self._keys[i], self._vals[i], maxes[i]
        elif j == len(keys):
            maxes[i] = keys[-1]

    def replace(self, old: Any, new: Any, value: Any) -> None:
        """remove(old) then add(new, value); in place when `new` sorts into `old`'s slot (a
        re-announced offer whose price or score did not move: the usual case)."""
        maxes = self._maxes
        i = bisect_left(maxes, old)
        keys = self._keys[i] if i < len(maxes) else None
        j = bisect_left(keys, old) if keys else 0
        if (keys is not None and keys[j] == old
                and (keys[j - 1] < new if j else i == 0 or maxes[i - 1] < new)
                and (new < keys[j + 1] if j + 1 < len(keys)
                     else i + 1 == len(maxes) or new < self._keys[i + 1][0])):
            keys[j] = new
            self._vals[i][j] = value
            if j + 1 == len(keys):
                maxes[i] = new
            return
        self.remove(old)
        self.add(new, value)

    def first(self) -> Any:
        return self._vals[0][0]

    def _pos(self, key: Any) -> tuple[int, int]:
        """Chunk and index of the first key >= `key` (None: the start)."""
        if key is None:
            return 0, 0
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return i, 0
        return i, bisect_left(self._keys[i], key)

    def slices(self, lo: Any = None, hi: Any = None) -> list[list]:
        """The values with lo <= key < hi, as a list of lists in key order."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        vals = self._vals
        if (i, j) >= (k, m):
            return []
        if i == k:
            return [vals[i][j:m]]
        out = [vals[i][j:] if j else vals[i]]
        out.extend(vals[i + 1:k])
        if m:
            out.append(vals[k][:m])
        return out

    def count(self, lo: Any = None, hi: Any = None) -> int:
        """How many keys lie in lo <= key < hi (no copying)."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        if (i, j) >= (k, m):
            return 0
        if i == k:
            return m - j
        vals = self._vals
        return len(vals[i]) - j + sum(map(len, vals[i + 1:k])) + m

    def irange(self, lo: Any = None, hi: Any = None) -> Iterator[Any]:
        """The values with lo <= key < hi in key order, lazily (C-level iteration)."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        vals = self._vals
        if (i, j) >= (k, m):
            return iter(())
        if i == k:
            return islice(vals[i], j, m)
        parts: list[Iterable[Any]] = [islice(vals[i], j, None) if j else vals[i]]
        parts.extend(vals[i + 1:k])
        if m:
            parts.append(islice(vals[k], m))
        return chain.from_iterable(parts)


class _Bucket:
    """Entries that share every bucket-level fact; sorted by (price_key, digest)."""

    __slots__ = ("key", "models", "gpu_count", "vram_gib", "region", "cuda_version", "cc",
                 "token_symbol", "chain_id", "entries")

    def __init__(self, key: tuple) -> None:
        self.key = key
        (self.models, self.gpu_count, self.vram_gib, self.region, self.cuda_version, self.cc,
         self.token_symbol, self.chain_id) = key
        self.entries = _SortedList()


class OfferBook:
    """A renter's view of the market. Sans-I/O: callers pass `now_ms`; the node calls
    `expire(now)` at `next_deadline()`. Errors from validation propagate unchanged."""

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

    def __init__(
        self,
        params: Params,
        *,
        score_of: Callable[[bytes], float] | None = None,
        bindings: BindingCache | None = None,
        chain_ids: frozenset[int] | None = None,
        verifier: Verifier = VERIFIER,
    ) -> None:
        self.params = params
        self.verifier = verifier  # decodes and checks signatures of what is ingested
        self.score_of = score_of or (lambda _provider: UNKNOWN_SCORE)
        self.bindings = bindings if bindings is not None else BindingCache(params.binding_cache_size)
        self.chain_ids = chain_ids
        self._by_provider: dict[bytes, Entry] = {}
        self._by_digest: dict[bytes, Entry] = {}
        self._buckets: dict[tuple, _Bucket] = {}
        self._by_score = _SortedList()  # keep order (score, -since_ms, expires_ms, digest) -> Entry
        self._by_since = _SortedList()  # (since_ms, provider) -> Entry: the rank sort's tiers
        self._bytes = 0  # wire bytes of the live offers
        # Called with each entry the caps evict (not expiry, not replacement, not withdrawal):
        # the node deletes its stored copy.
        self.on_evict: Callable[[Entry], None] | None = None
        self._expiry: list[tuple[int, bytes, Entry]] = []  # (deadline, digest, entry), lazy
        self._withdrawn: dict[bytes, tuple[int, int]] = {}  # provider -> (seq, keep_until_ms)
        self._withdrawn_heap: list[tuple[int, bytes, int]] = []  # (keep_until, provider, seq)

    # ----------------------------------------------------------------------------------------
    # Ingest

    def ingest_offer(self, data: bytes, now_ms: int) -> Entry:
        """Validate a gossiped offer against what the book holds and insert it; return its
        entry. Raises the validation error unchanged, or Ignore("book_full") when the cap
        refuses it."""
        provider = data[5:37] if data[:5] == _OFFER_PREFIX else b""
        held = self._by_provider.get(provider)
        wd = self._withdrawn.get(provider)
        header = offer_header(data)
        if (held is not None and header is not None
                and data[header[3]:-SIG_TAIL] == held.body()):
            # A re-announcement of the held body: validated and indexed from the held entry
            # (equivalent to the full path below; see validation.validate_reannouncement).
            digest = validate_reannouncement(
                data, header, now_ms, self.params, known_seq=held.seq,
                known_digest=held.digest, known_chain_id=held.chain_id,
                withdrawn_seq=wd[0] if wd else -1, chain_ids=self.chain_ids,
                verifier=self.verifier,
            )
            entry = held.reannounced(data, digest, header, self.score_of(provider))
            self._make_room(entry, held)
            self._replace(held, entry)
            return entry
        offer, digest = validate_offer(
            data, now_ms, self.params, self.bindings,
            known_seq=held.seq if held else -1,
            known_digest=held.digest if held else None,
            withdrawn_seq=wd[0] if wd else -1,
            chain_ids=self.chain_ids,
            verifier=self.verifier,
        )
        if offer.provider != provider:  # unreachable for a canonical Offer; kept as a guard
            raise LocalProtocolError("offer_prefix", "offer layout differs from the peeked one")
        assert header is not None  # a canonical offer has the canonical shape
        entry = Entry(offer, data, digest, self.score_of(provider), header[3],
                      held.since_ms if held is not None else now_ms)
        self._make_room(entry, held)
        if held is not None:
            self._remove(held)
        self._insert(entry, now_ms)
        return entry

    def ingest_withdrawal(self, data: bytes, now_ms: int) -> OfferWithdrawal:
        """Validate a withdrawal, drop the provider's offer if it is covered, and keep a
        watermark against replays of the withdrawn offers."""
        provider = data[5:37] if data[:5] == _WITHDRAWAL_PREFIX else b""
        wd = self._withdrawn.get(provider)
        msg = validate_withdrawal(data, now_ms, self.params, withdrawn_seq=wd[0] if wd else -1,
                                  verifier=self.verifier)
        if msg.provider != provider:  # unreachable for a canonical withdrawal; kept as a guard
            raise LocalProtocolError("withdrawal_prefix", "layout differs from the peeked one")
        held = self._by_provider.get(msg.provider)
        if held is not None and held.seq <= msg.seq:
            self._remove(held)
        keep_until = msg.created_ms + self.params.offer_max_lifetime_ms + self.params.clock_skew_ms
        if msg.provider not in self._withdrawn:
            while len(self._withdrawn) >= self.params.book_max_providers:
                self._drop_oldest_watermark()
        self._withdrawn[msg.provider] = (msg.seq, keep_until)
        heapq.heappush(self._withdrawn_heap, (keep_until, msg.provider, msg.seq))
        return msg

    def _make_room(self, newcomer: Entry, held: Entry | None) -> None:
        """Evict what `newcomer` (replacing `held`, if any) needs under both caps, weakest first
        by the keep order, or raise Ignore("book_full") and change nothing if it does not
        outrank every offer it would displace."""
        params = self.params
        need_slot = held is None and len(self._by_provider) >= params.book_max_providers
        size = len(newcomer.data)
        over = self._bytes - (len(held.data) if held is not None else 0) + size - params.book_max_bytes
        if not need_slot and over <= 0:
            return
        if size > params.book_max_bytes or params.book_max_providers < 1:
            raise Ignore("book_full", f"an offer of {size} bytes exceeds the book's caps")
        victims: list[Entry] = []
        freed = 0
        rank = newcomer._skey[:3]  # (score, -since_ms, expires_ms): an equal one is no weaker
        for e in self._by_score.irange():  # weakest first; stops at the first equal or stronger
            if e is held:
                continue
            if e._skey[:3] >= rank:
                break
            victims.append(e)
            freed += len(e.data)
            if freed >= over:
                break
        if not victims or freed < over:
            raise Ignore("book_full", "offer book full and this offer does not outrank the "
                         "held offers it would displace")
        for e in victims:
            self._remove(e)
            if self.on_evict is not None:
                self.on_evict(e)

    def _drop_oldest_watermark(self) -> None:
        while True:
            until, provider, seq = heapq.heappop(self._withdrawn_heap)
            if self._withdrawn.get(provider) == (seq, until):
                del self._withdrawn[provider]
                return

    # ----------------------------------------------------------------------------------------
    # Time

    def expire(self, now_ms: int) -> list[Entry]:
        """Evict every offer with now_ms > expires_ms + clock_skew_ms and every watermark past
        its keep time. Returns the evicted entries."""
        out = []
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            _, digest, entry = heapq.heappop(heap)
            if self._by_digest.get(digest) is entry:
                self._remove(entry)
                out.append(entry)
        wheap = self._withdrawn_heap
        while wheap and wheap[0][0] < now_ms:
            until, provider, seq = heapq.heappop(wheap)
            if self._withdrawn.get(provider) == (seq, until):
                del self._withdrawn[provider]
        return out

    def next_deadline(self) -> int | None:
        """The earliest now_ms at which `expire` has something to do (None: nothing held)."""
        heap = self._expiry
        while heap and self._by_digest.get(heap[0][1]) is not heap[0][2]:
            heapq.heappop(heap)
        wheap = self._withdrawn_heap
        while wheap and self._withdrawn.get(wheap[0][1]) != (wheap[0][2], wheap[0][0]):
            heapq.heappop(wheap)
        times = []
        if heap:
            times.append(heap[0][0])
        if wheap:
            times.append(wheap[0][0] + 1)
        return min(times) if times else None

    # ----------------------------------------------------------------------------------------
    # Bookkeeping

    def _insert(self, entry: Entry, now_ms: int) -> None:
        self._bytes += len(entry.data)
        self._by_provider[entry.provider] = entry
        self._by_digest[entry.digest] = entry
        key = (entry.models, entry.gpu_count, entry.vram_gib, entry.region, entry.cuda_version,
               entry.cc, entry.token_symbol, entry.chain_id)  # entry.bucket_key()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key)
        entry.bucket = bucket
        bucket.entries.add(entry._pkey, entry)
        self._by_score.add(entry._skey, entry)
        self._by_since.add((entry.since_ms, entry.provider), entry)
        self._push_expiry(entry)

    def _push_expiry(self, entry: Entry) -> None:
        heap = self._expiry
        heapq.heappush(heap, (entry.expires_ms + self.params.clock_skew_ms + 1, entry.digest, entry))
        if len(heap) > 2 * len(self._by_digest) + 1024:  # replaced offers pile up: compact
            self._expiry = [x for x in heap if self._by_digest.get(x[1]) is x[2]]
            heapq.heapify(self._expiry)

    def _replace(self, held: Entry, entry: Entry) -> None:
        """_remove(held) + _insert(entry) for an entry with held's provider and bucket."""
        self._bytes += len(entry.data) - len(held.data)
        self._by_provider[entry.provider] = entry
        del self._by_digest[held.digest]
        self._by_digest[entry.digest] = entry
        bucket = entry.bucket = held.bucket
        held.bucket = None
        assert bucket is not None
        bucket.entries.replace(held._pkey, entry._pkey, entry)
        self._by_score.replace(held._skey, entry._skey, entry)
        since_key = (held.since_ms, held.provider)  # the same for both: in place
        self._by_since.replace(since_key, since_key, entry)
        self._push_expiry(entry)

    def _remove(self, entry: Entry) -> None:
        self._bytes -= len(entry.data)
        del self._by_provider[entry.provider]
        del self._by_digest[entry.digest]
        bucket = entry.bucket
        assert bucket is not None
        bucket.entries.remove(entry._pkey)
        if not len(bucket.entries):
            del self._buckets[bucket.key]
        self._by_score.remove(entry._skey)
        self._by_since.remove((entry.since_ms, entry.provider))
        entry.bucket = None

    def rescore(self, provider: bytes | None = None) -> None:
        """Read scores again from `score_of` (all providers, or one)."""
        entries = list(self._by_provider.values()) if provider is None else [
            e for e in (self._by_provider.get(provider),) if e is not None]
        for e in entries:
            score = self.score_of(e.provider)
            if score != e.score:
                self._by_score.remove(e._skey)
                e.score = score
                e._skey = (score, -e.since_ms, e.expires_ms, e.digest)
                self._by_score.add(e._skey, e)

    # ----------------------------------------------------------------------------------------
    # Reading

    def __len__(self) -> int:
        return len(self._by_provider)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._by_provider.values()))

    def watermarks(self) -> int:
        return len(self._withdrawn)

    def held(self, provider: bytes) -> Entry | None:
        return self._by_provider.get(provider)

    @property
    def bytes(self) -> int:
        """Wire bytes of the live offers (at most params.book_max_bytes)."""
        return self._bytes

    def snapshot(self) -> list[bytes]:
        """The wire bytes of every live offer, strongest first by the keep order."""
        return [e.data for e in self.snapshot_entries()]

    def snapshot_entries(self) -> list[Entry]:
        """References to every live entry, strongest first by the keep order (known-good
        providers, then the longest held): a sync response cut short by a byte budget carries
        the offers worth most. One list of references: no offer bytes are copied."""
        out: list[Entry] = []
        for sl in reversed(self._by_score.slices()):
            out.extend(reversed(sl))
        return out

    def get(self, offer_id: str) -> Entry:
        """Resolve a display id or any unique prefix of the digest in hex."""
        prefix = offer_id.strip().lower()
        if not prefix or not re.fullmatch(r"[0-9a-f]+", prefix):
            raise LocalProtocolError("bad_offer_id", f"offer id {offer_id!r} is not hex")
        if len(prefix) == 64:
            entry = self._by_digest.get(bytes.fromhex(prefix))
            found = [entry] if entry else []
        else:
            found = [e for e in self._by_digest.values() if e.digest.hex().startswith(prefix)]
        if not found:
            raise LocalProtocolError("unknown_offer", f"no offer with id {offer_id!r}")
        if len(found) > 1:
            ids = ", ".join(sorted(e.digest.hex()[:len(prefix) + 4] for e in found[:5]))
            raise LocalProtocolError(
                "ambiguous_offer", f"offer id {offer_id!r} matches {len(found)} offers ({ids}"
                f"{', ...' if len(found) > 5 else ''}): give more characters")
        return found[0]

    # ----------------------------------------------------------------------------------------
    # Queries

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
        price_ne = [t for t in q.terms if t.field == "price" and t.op == "!="]
        score_terms = [t for t in q.terms if t.field == "score"]
        lo, hi = price_bounds(q.terms)
        if lo is not None and hi is not None and lo >= hi:
            return []
        lo_key = None if lo is None else (lo,)
        hi_key = None if hi is None else (hi,)

        buckets = _choose_buckets(self._buckets.values(), bucket_terms)
        residual = _residual(price_ne + score_terms)
        if where is not None:
            residual = where if residual is None else _both(residual, where)
        if s.field == "rank":
            if now_ms is None:
                raise LocalProtocolError("bad_argument", "a rank sort needs now_ms")
            return self._query_rank(buckets, lo, hi, residual, limit,
                                    now_ms - self.params.book_established_ms)

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
        # from). Unknown ones: when established providers are few, scan them in the since
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
                   if e.score == UNKNOWN_SCORE and e.bucket in chosen
                   and (lo is None or e.price_key >= lo) and (hi is None or e.price_key < hi)
                   and (residual is None or residual(e))]
            est.sort(key=_pkey)
            out += est[:need]
            need = limit - len(out)
            if need:
                merged = heapq.merge(*[b.entries.irange(lo_key, hi_key) for b in buckets],
                                     key=_pkey)
                newer = filter(lambda e: e.score == UNKNOWN_SCORE and e.since_ms > cutoff
                               and (residual is None or residual(e)), merged)
                out += islice(newer, need)
        elif need:
            established: list[Entry] = []
            newer_kept: list[Entry] = []
            merged = heapq.merge(*[b.entries.irange(lo_key, hi_key) for b in buckets], key=_pkey)
            for e in merged:
                if e.score != UNKNOWN_SCORE or (residual is not None and not residual(e)):
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
