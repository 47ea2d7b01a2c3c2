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
  the weakest held offers by the keep order (score, then a proven wallet's one offer above the
  rest, then the provider first seen longest ago, then the later expiry) only if it outranks
  every one of them; otherwise it is IGNOREd with `book_full`. So at the cap the book keeps
  known-good providers (score above the unknown 0.5), then proven ones (paid on the escrow by
  several renters), then established, then new ones, and drops known-bad ones first: fresh
  identities, which cost an attacker nothing to make, push out none of them.

Indexes: entries are grouped in buckets by every low-cardinality fact a query can filter on
(model tokens, GPU count, VRAM, region, CUDA, compute capability, token, chain); a query decides
each bucket once, then takes a price range from the bucket, which is kept sorted by price. A
global index by the keep order (score, proven, -since, expiry) serves score filters and sorts, the
eviction policy and the `rank` sort's known-good and known-bad tiers. For each wallet that
`proven_of` says is proven on the escrow (protocol/standing.py), a list of its held offers by
(since, provider) marks the first as the wallet's one `proven` offer (the rank's tier 1).
"""

from __future__ import annotations

import functools
import heapq
import re
from collections.abc import Callable, Iterator
from decimal import Decimal

from .encoding import decode
from .errors import Ignore, LocalProtocolError
from .messages import SIG_TAIL, Offer, OfferWithdrawal, key_prefix
from .params import Params
from .query import INTERRUPTIBLE, ON_DEMAND, PRICE_SCALE, UNKNOWN_SCORE
from .queryplan import QueryPlanner
from .sortedlist import SortedList
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


_ON_DEMAND_ONLY = (ON_DEMAND,)
_INTERRUPTIBLE_ONLY = (INTERRUPTIBLE,)
_BOTH = (ON_DEMAND, INTERRUPTIBLE)


class Entry:
    """One live offer with the facts queries use, derived once at insertion. The decoded
    `Offer` is not kept (memory): `offer` decodes the held wire bytes again on demand."""

    __slots__ = (
        "data", "digest", "provider", "seq", "expires_ms", "models", "gpu_count",
        "vram_mib", "vram_gib", "region", "cuda_version", "cc", "token_symbol", "chain_id",
        "escrow", "token_decimals", "price_per_gpu_hour", "price_key", "score", "bucket", "_pkey", "_skey",
        "body_at", "since_ms", "images", "wallet", "proven", "classes", "spot",
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
        self.images = tuple(i.upper() for i in offer.images) if offer.images else ()
        self.cuda_version = cuda
        self.cc = cc
        self.token_symbol = terms.token_symbol
        self.chain_id = terms.chain_id
        self.escrow = terms.escrow
        decimals = self.token_decimals = terms.token_decimals
        price = self.price_per_gpu_hour = terms.price_per_gpu_second * 3600  # smallest unit
        # Comparable across tokens of different decimals (validation caps decimals at 36).
        scale = _PRICE_SCALES[decimals] if decimals <= PRICE_SCALE else 10 ** (PRICE_SCALE - decimals)
        self.price_key = price * scale
        self.score = score
        self.bucket: _Bucket | None = None
        # since_ms: when this book first held an offer of this provider (kept while it holds
        # one without a break); the keep order puts the longest-held first among equal scores.
        self.since_ms = since_ms
        self.wallet = offer.binding.wallet  # the provider's bound wallet (its escrow standing)
        self.proven = False  # the book's one offer of a proven wallet (set by the book)
        self._pkey = (self.price_key, digest)
        self._skey = (score, False, -since_ms, self.expires_ms, digest)  # see OfferBook._keep_key
        self.body_at = body_at  # where the body starts (see validation.offer_header)
        # Query facts of interruptible capacity (query.py `class`, `notice`: query.offer_classes).
        spot = offer.interruptible
        # (notice_s, price key) of each interruptible set: a class-bound query's classes
        self.spot = tuple((s.notice_s, s.price_per_gpu_second * 3600 * scale) for s in spot)
        if not spot:
            self.classes = _ON_DEMAND_ONLY
        else:
            on_demand = len({g for s in spot for g in s.gpus}) < len(gpus)
            self.classes = _BOTH if on_demand else _INTERRUPTIBLE_ONLY

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
        new.images = self.images
        new.cuda_version = self.cuda_version
        new.cc = self.cc
        new.token_symbol = self.token_symbol
        new.chain_id = self.chain_id
        new.escrow = self.escrow
        new.token_decimals = self.token_decimals
        new.price_per_gpu_hour = self.price_per_gpu_hour
        new.price_key = self.price_key
        new.classes, new.spot = self.classes, self.spot
        new.data = data
        new.digest = digest
        new.seq, _, new.expires_ms, new.body_at = header
        new.score = score
        new.bucket = None
        new.since_ms = self.since_ms
        new.wallet = self.wallet
        new.proven = False  # the book's ingest sets it as the held entry's
        new._pkey = (self.price_key, digest)
        new._skey = (score, False, -new.since_ms, new.expires_ms, digest)
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


class _Bucket:
    """Entries that share every bucket-level fact; sorted by (price_key, digest)."""

    __slots__ = ("key", "models", "gpu_count", "vram_gib", "region", "cuda_version", "cc",
                 "token_symbol", "chain_id", "entries")

    def __init__(self, key: tuple) -> None:
        self.key = key
        (self.models, self.gpu_count, self.vram_gib, self.region, self.cuda_version, self.cc,
         self.token_symbol, self.chain_id) = key
        self.entries = SortedList()


class OfferBook(QueryPlanner):
    """A renter's view of the market. Sans-I/O: callers pass `now_ms`; the node calls
    `expire(now)` at `next_deadline()`. Errors from validation propagate unchanged."""

    def __init__(
        self,
        params: Params,
        *,
        score_of: Callable[[bytes], float] | None = None,
        proven_of: Callable[[bytes], bool] | None = None,
        bindings: BindingCache | None = None,
        chain_ids: frozenset[int] | None = None,
        verifier: Verifier = VERIFIER,
    ) -> None:
        self.params = params
        self.verifier = verifier  # decodes and checks signatures of what is ingested
        self.score_of = score_of or (lambda _provider: UNKNOWN_SCORE)
        # Is this provider wallet proven on the escrow (protocol/standing.py)? The caller calls
        # `restand(wallets)` whenever the answer changes for some wallets.
        self.proven_of = proven_of or (lambda _wallet: False)
        self.bindings = bindings if bindings is not None else BindingCache(params.binding_cache_size)
        self.chain_ids = chain_ids
        self._by_provider: dict[bytes, Entry] = {}
        self._by_digest: dict[bytes, Entry] = {}
        self._buckets: dict[tuple, _Bucket] = {}
        self._by_score = SortedList()  # keep order (score, proven, -since_ms, expires_ms, digest)
        self._by_since = SortedList()  # (since_ms, provider) -> Entry: the rank sort's tiers
        self._spot: dict[bytes, Entry] = {}  # digest -> entry, offers with an interruptible set
        # proven wallet -> its held entries by (since_ms, provider); the first is `proven`
        self._proven: dict[bytes, SortedList] = {}
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
            self._set_proven(entry, held.proven, indexed=False)
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
        self._set_proven(entry, self._arrives_proven(entry, held), indexed=False)
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
        rank = newcomer._skey[:4]  # (score, proven, -since_ms, expires_ms): equal is no weaker
        for e in self._by_score.irange():  # weakest first; stops at the first equal or stronger
            if e is held:
                continue
            if e._skey[:4] >= rank:
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

    def _arrives_proven(self, entry: Entry, held: Entry | None) -> bool:
        """Whether `entry` (replacing `held`, if any) would be its wallet's one proven offer
        once inserted: the wallet is proven and no other held offer of it comes first by
        (since_ms, provider)."""
        ws = self._proven.get(entry.wallet)
        if ws is None:
            return bool(self.proven_of(entry.wallet))
        first = ws.first() if len(ws) else None
        return (first is None or first is held
                or (entry.since_ms, entry.provider) < (first.since_ms, first.provider))

    def _set_proven(self, e: Entry, flag: bool, *, indexed: bool = True) -> None:
        """Mark or unmark `e` as its wallet's proven offer; the flag is part of the keep order
        (score, proven, -since_ms, expires_ms, digest), so an indexed entry moves."""
        if e.proven == flag:
            return
        if indexed:
            self._by_score.remove(e._skey)
        e.proven = flag
        e._skey = (e.score, flag, -e.since_ms, e.expires_ms, e.digest)
        if indexed:
            self._by_score.add(e._skey, e)

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
        self._by_since.add((entry.since_ms, entry.provider), entry)
        if entry.spot:
            self._spot[entry.digest] = entry
        ws = self._proven.get(entry.wallet)
        if ws is None and self.proven_of(entry.wallet):
            ws = self._proven[entry.wallet] = SortedList()
        if ws is not None:
            self._proven_add(ws, entry)  # sets entry.proven (unindexed yet), demotes the first
        else:
            self._set_proven(entry, False, indexed=False)
        self._by_score.add(entry._skey, entry)
        self._push_expiry(entry)

    def _push_expiry(self, entry: Entry) -> None:
        heap = self._expiry
        heapq.heappush(heap, (entry.expires_ms + self.params.clock_skew_ms + 1, entry.digest, entry))
        if len(heap) > 2 * len(self._by_digest) + 1024:  # replaced offers pile up: compact
            self._expiry = [x for x in heap if self._by_digest.get(x[1]) is x[2]]
            heapq.heapify(self._expiry)

    def _replace(self, held: Entry, entry: Entry) -> None:
        """_remove(held) + _insert(entry) for an entry with held's provider and bucket."""
        # held's flag may have moved since ingest (_make_room evicted its wallet's first offer)
        self._set_proven(entry, held.proven, indexed=False)
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
        if self._spot.pop(held.digest, None) is not None:  # the same body: the same sets
            self._spot[entry.digest] = entry
        ws = self._proven.get(entry.wallet)  # the same wallet: the body is the same
        if ws is not None:
            ws.replace(since_key, since_key, entry)
        self._set_proven(held, False, indexed=False)  # entry's flag was set from held's
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
        self._spot.pop(entry.digest, None)
        ws = self._proven.get(entry.wallet)
        if ws is not None:
            ws.remove((entry.since_ms, entry.provider))
            if entry.proven:
                self._set_proven(entry, False, indexed=False)
                if len(ws):
                    self._set_proven(ws.first(), True)
        entry.bucket = None

    def _proven_add(self, ws: SortedList, entry: Entry) -> None:
        """Add an entry of a proven wallet; the wallet's first by (since_ms, provider) is the
        one `proven` offer."""
        first = ws.first() if len(ws) else None
        ws.add((entry.since_ms, entry.provider), entry)
        if first is None or (entry.since_ms, entry.provider) < (first.since_ms, first.provider):
            if first is not None:
                self._set_proven(first, False)
            self._set_proven(entry, True, indexed=False)
        else:
            self._set_proven(entry, False, indexed=False)

    def restand(self, wallets: set[bytes] | None = None) -> None:
        """Read again from `proven_of` whether these wallets (default: every wallet held or
        proven) are proven, and mark each proven wallet's one offer (specs/offerbook.md,
        "Standing"). One pass over the book when some wallet became proven."""
        if wallets is None:
            wallets = set(self._proven) | {e.wallet for e in self._by_provider.values()}
        became: set[bytes] = set()
        for w in wallets:
            now = bool(self.proven_of(w))
            if now and w not in self._proven:
                became.add(w)
            elif not now and w in self._proven:
                for e in self._proven.pop(w).irange():
                    self._set_proven(e, False)
        if became:
            found: dict[bytes, list[Entry]] = {w: [] for w in became}
            for e in self._by_provider.values():
                mine = found.get(e.wallet)
                if mine is not None:
                    mine.append(e)
            for w, mine in found.items():
                mine.sort(key=lambda e: (e.since_ms, e.provider))
                ws = self._proven[w] = SortedList()
                for e in mine:  # in key order: each add appends
                    ws.add((e.since_ms, e.provider), e)
                if mine:
                    self._set_proven(mine[0], True)

    def proven_entries(self) -> list[Entry]:
        """Each proven wallet's one offer (few: every proven wallet was paid on chain)."""
        return [ws.first() for ws in self._proven.values() if len(ws)]

    def rescore(self, provider: bytes | None = None) -> None:
        """Read scores again from `score_of` (all providers, or one)."""
        entries = list(self._by_provider.values()) if provider is None else [
            e for e in (self._by_provider.get(provider),) if e is not None]
        for e in entries:
            score = self.score_of(e.provider)
            if score != e.score:
                self._by_score.remove(e._skey)
                e.score = score
                e._skey = (score, e.proven, -e.since_ms, e.expires_ms, e.digest)
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
