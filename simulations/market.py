"""What every node has heard of the offer topic, and the renters' offer books.

`GossipStore` keeps every gossiped message with its arrival time at every node: one int32 row
per message (ms since the run's start, NEVER = never), in chunks of `CHUNK` rows, with a few
per-row columns (provider, kind, seq, expiry, size) as numpy arrays. "What has reached node v by
t" is then a column gather plus a group-by, in numpy, instead of a Python loop over every
message (10,000 nodes x tens of thousands of messages).

`SharedBook` gives each shopping renter its own offer book without building it from scratch.

Why it is the renter's own book. A renter's book, built the old way, is: ingest with
`OfferBook.ingest_offer` / `ingest_withdrawal`, at the shopping time t, the latest offer and the
latest withdrawal of every provider that have reached the renter. With one live offer per
provider, no score (every provider is unknown, 0.5) and a cap far above the number of
providers, what that leaves for provider p depends only on those two messages and t: p's offer
is held iff it is valid at t, not expired at t, and not covered by the withdrawal (seq <= the
withdrawal's), in either ingest order; the book's indexes are sorted by keys of the entries
(price, digest; score, expiry, digest), so queries depend only on the set of held entries.

The world keeps one real `OfferBook` (the shared book) into which every valid message is
ingested once, when it is published: it holds the state every node reaches once it has the
newest message of every provider. For a renter shopping at t the store finds, with one column
gather, the providers whose newest offer or newest withdrawal has NOT reached the renter by t
(in flight, missed while offline, never synced). Two cases of those differ only by a withdrawal
watermark, which neither a query nor the book's size reads, and are not swapped: the renter has
the provider's newest offer but not an older withdrawal; or neither book holds an offer of the
provider (in each, its newest offer is missing or covered by a newer withdrawal; e.g. a renter
that joined after the provider withdrew). For exactly the other providers
the shared book's state is taken out and replaced by the renter's own: its latest offer and
withdrawal of that provider are ingested for real (`ingest_offer`/`ingest_withdrawal` at t,
which decode and validate). `shared_book.expire(t)` runs first: the book evicts an offer exactly
when `validate_offer` would start ignoring it as expired, and a withdrawal watermark exactly
when `validate_withdrawal` would. The renter's real `OfferBook.query` runs on that state; then
the swapped providers are put back. tests/simulations checks, for every shopping trip of two
scenarios (one with churn, spam and Sybils), that the query answer and the book size equal those
of a book built from scratch (`World(check_books=True)`).

The swap uses the book's private `_insert`/`_remove`/`_withdrawn` (protocol/offerbook.py): the
simulator borrows them, the protocol package is unchanged.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np

from protocol.errors import RemoteProtocolError
from protocol.offerbook import OfferBook

NEVER = np.iinfo(np.int32).max
OFFER, WITHDRAWAL = 0, 1
KINDS = {"offer": OFFER, "withdrawal": WITHDRAWAL}


class GossipStore:
    CHUNK_BITS = 10
    CHUNK = 1 << CHUNK_BITS

    def __init__(self, n_nodes: int) -> None:
        self.n = n_nodes
        self.chunks: list[np.ndarray | None] = []
        self.msgs: list[Any] = []  # row -> GossipMsg (None once pruned)
        self.rows = 0
        cap = 1024
        self.r_pid = np.zeros(cap, np.int64)
        self.r_kind = np.zeros(cap, np.int8)
        self.r_exp = np.zeros(cap, np.int64)
        self.r_size = np.zeros(cap, np.int64)
        self.r_alive = np.zeros(cap, bool)
        self.pids: dict[bytes, int] = {}
        self.providers: list[bytes] = []
        self.p_node: list[int] = []
        self.by_pid: list[list[int]] = []  # pid -> alive rows, publish order
        self.latest = np.full((64, 2), -1, np.int64)  # pid, kind -> newest alive row
        # rows whose arrival times are still being computed (World: the flood runs on another
        # thread while the run goes on): (row, result) with result() -> int32 row; every read
        # of arrival times settles them first, in publish order
        self._pending: list[tuple[int, Callable[[], np.ndarray]]] = []

    # -- adding --------------------------------------------------------------------------------

    def _grow(self) -> None:
        cap = 2 * len(self.r_pid)
        for name in ("r_pid", "r_kind", "r_exp", "r_size", "r_alive"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def pid(self, provider: bytes, node: int) -> int:
        p = self.pids.get(provider)
        if p is None:
            p = self.pids[provider] = len(self.providers)
            self.providers.append(provider)
            self.p_node.append(node)
            self.by_pid.append([])
            if p >= len(self.latest):
                lat = np.full((2 * len(self.latest), 2), -1, np.int64)
                lat[: len(self.latest)] = self.latest
                self.latest = lat
        return p

    def add(self, msg: Any, node: int, arrival_rel: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
        """Store `msg` (a GossipMsg) with its arrival row, or with a function that will give it
        (called when arrival times are next read); returns the stored row (a view)."""
        r = self.rows
        c, off = r >> self.CHUNK_BITS, r & (self.CHUNK - 1)
        if c == len(self.chunks):
            self.chunks.append(np.empty((self.CHUNK, self.n), np.int32))
        if r == len(self.r_pid):
            self._grow()
        row = self.chunks[c][off]
        if callable(arrival_rel):
            row[:] = NEVER
            self._pending.append((r, arrival_rel))
        else:
            row[:] = arrival_rel
        p = self.pid(msg.provider, node)
        k = KINDS[msg.kind]
        self.r_pid[r], self.r_kind[r], self.r_exp[r] = p, k, msg.expires_ms
        self.r_size[r], self.r_alive[r] = len(msg.data), True
        self.msgs.append(msg)
        self.by_pid[p].append(r)
        self.latest[p, k] = r  # a provider's seq grows with its publications
        self.rows = r + 1
        msg.row = r
        return row

    # -- reading -------------------------------------------------------------------------------

    def settle(self) -> None:
        """Write the arrival rows still being computed (waiting for them), oldest first."""
        pending, self._pending = self._pending, []
        for r, result in pending:
            self.chunks[r >> self.CHUNK_BITS][r & (self.CHUNK - 1)] = result()

    def col(self, rows: np.ndarray, node: int) -> np.ndarray:
        """Arrival times at `node` of the messages in `rows`."""
        if self._pending:
            self.settle()
        out = np.empty(len(rows), np.int32)
        if not len(rows):
            return out
        ch = rows >> self.CHUNK_BITS
        off = rows & (self.CHUNK - 1)
        lo, hi = int(ch.min()), int(ch.max())
        if lo == hi:
            out[:] = self.chunks[lo][off, node]
            return out
        for c in range(lo, hi + 1):
            sel = ch == c
            if sel.any():
                out[sel] = self.chunks[c][off[sel], node]
        return out

    def set_min(self, rows: np.ndarray, node: int, t: int) -> None:
        """Arrival at `node` of these messages: at the latest t (a book sync)."""
        if self._pending:
            self.settle()
        ch = rows >> self.CHUNK_BITS
        off = rows & (self.CHUNK - 1)
        for c in np.unique(ch):
            sel = ch == c
            a = self.chunks[c]
            o = off[sel]
            a[o, node] = np.minimum(a[o, node], t)

    def alive_rows(self) -> np.ndarray:
        return np.flatnonzero(self.r_alive[: self.rows])

    def view(self, node: int, at_rel: int) -> np.ndarray:
        """Rows of what has reached `node` by `at_rel`: the newest offer and the newest
        withdrawal of every provider (unordered)."""
        rows = self.alive_rows()
        got = rows[self.col(rows, node) <= at_rel]
        if not len(got):
            return got
        key = self.r_pid[got] * 2 + self.r_kind[got]
        best = np.full(2 * len(self.providers), -1, np.int64)
        np.maximum.at(best, key, got)
        return best[best >= 0]

    def held_offers(self, node: int, at_rel: int, now: int) -> np.ndarray:
        """Rows of the offers `node`'s book holds at `now` (what a book sync sends): of every
        provider, the newest offer that reached it by at_rel, unless the newest withdrawal that
        reached it is newer (a provider's rows are in publish order, so in seq order) or the
        offer has expired."""
        rows = self.view(node, at_rel)
        withdrawn = np.full(len(self.providers), -1, np.int64)
        wd = rows[self.r_kind[rows] == WITHDRAWAL]
        withdrawn[self.r_pid[wd]] = wd
        rows = rows[self.r_kind[rows] == OFFER]
        return rows[(withdrawn[self.r_pid[rows]] < rows) & (self.r_exp[rows] > now)]

    def behind(self, node: int, at_rel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The providers on which `node`'s book may differ from the shared book, with the newest
        offer row and the newest withdrawal row of each that reached `node` (-1: none).

        A provider is behind when its newest offer, or its newest withdrawal if that is newer,
        has not reached `node` by at_rel, except when neither book holds an offer of it (in
        both the newest offer is missing or covered by a newer withdrawal): the two then differ
        at most by a withdrawal watermark, which no query and no book size reads. (The same
        holds for a node that has a provider's newest offer but not an older withdrawal.)"""
        lat = self.latest[: len(self.providers)]
        need = lat.copy()
        need[lat[:, WITHDRAWAL] < lat[:, OFFER], WITHDRAWAL] = -1
        flat = need.ravel()
        has = flat >= 0
        missing = np.zeros(len(flat), bool)
        missing[has] = self.col(flat[has], node) > at_rel
        cand = np.flatnonzero(missing.reshape(-1, 2).any(axis=1))
        none = np.zeros(0, np.int64)
        if not len(cand):
            return cand, none, none
        rows = np.fromiter(itertools.chain.from_iterable(self.by_pid[p] for p in cand.tolist()), np.int64)
        got = rows[self.col(rows, node) <= at_rel]
        newest = np.full((len(self.providers), 2), -1, np.int64)
        np.maximum.at(newest, (self.r_pid[got], self.r_kind[got]), got)
        o, w = newest[cand, OFFER], newest[cand, WITHDRAWAL]
        node_holds = (o >= 0) & (w < o)
        shared_holds = lat[cand, WITHDRAWAL] < lat[cand, OFFER]
        keep = node_holds | shared_holds
        return cand[keep], o[keep], w[keep]

    def arrival(self, r: int) -> np.ndarray:
        if self._pending:
            self.settle()
        return self.chunks[r >> self.CHUNK_BITS][r & (self.CHUNK - 1)]

    # -- pruning -------------------------------------------------------------------------------

    def prune(self, keep_after: int) -> int:
        """Forget messages that expired before keep_after; returns how many."""
        self.settle()
        rows = self.alive_rows()
        dead = rows[self.r_exp[rows] < keep_after]
        if not len(dead):
            return 0
        self.r_alive[dead] = False
        for r in dead.tolist():
            self.msgs[r] = None
        for p in np.unique(self.r_pid[dead]).tolist():
            self.by_pid[p] = [r for r in self.by_pid[p] if self.r_alive[r]]
            for k in (OFFER, WITHDRAWAL):
                if self.latest[p, k] >= 0 and not self.r_alive[self.latest[p, k]]:
                    self.latest[p, k] = -1
        # free chunks whose rows are all gone
        for c in range(len(self.chunks)):
            lo = c * self.CHUNK
            if self.chunks[c] is not None and lo + self.CHUNK <= self.rows and not self.r_alive[lo:lo + self.CHUNK].any():
                self.chunks[c] = None
        return len(dead)


def ingest_message(book: OfferBook, msg: Any, now: int) -> str | None:
    """Ingest a gossiped offer or withdrawal (a GossipMsg) into `book`; the reason code if the
    book refused it, else None."""
    try:
        if msg.kind == "offer":
            book.ingest_offer(msg.data, now)
        else:
            book.ingest_withdrawal(msg.data, now)
    except RemoteProtocolError as exc:
        return exc.code
    return None


class SharedBook:
    """One real OfferBook holding the newest state of every provider, swapped per renter (see
    the module docstring)."""

    def __init__(self, book: OfferBook, store: GossipStore, count: Callable[..., None]) -> None:
        self.book = book
        self.store = store
        self.count = count

    def _ingest(self, book: OfferBook, msg: Any, now: int) -> None:
        refused = ingest_message(book, msg, now)
        if refused is not None:
            self.count("book_ingest." + refused)

    def publish(self, msg: Any, now: int) -> None:
        """A valid message was published: the shared book takes it (once, for every node)."""
        self._ingest(self.book, msg, now)

    def run_for(self, node: int, now: int, at_rel: int, fn: Callable[[OfferBook], Any]) -> Any:
        """fn(book) with the book in `node`'s state at `now`; the shared state is put back."""
        book, store = self.book, self.store
        if len(store.providers) >= book.params.book_max_providers:
            raise RuntimeError("SharedBook assumes fewer providers than the book's cap")
        book.expire(now)
        behind, own_offer, own_withdrawal = store.behind(node, at_rel)
        if not len(behind):
            return fn(book)
        self.count("shared_book.swapped", len(behind))
        # the expiry heaps stay as they are: what the swap pushes goes to throwaway heaps, so the
        # held entries' heap items are still theirs once they are back
        heaps = book._expiry, book._withdrawn_heap
        book._expiry, book._withdrawn_heap = [], []
        saved = []
        try:
            for p, o, w in zip(behind.tolist(), own_offer.tolist(), own_withdrawal.tolist()):
                prov = store.providers[p]
                entry = book._by_provider.get(prov)
                if entry is not None:
                    book._remove(entry)
                saved.append((prov, entry, book._withdrawn.pop(prov, None)))
                own = [store.msgs[r] for r in (o, w) if r >= 0]
                own.sort(key=lambda m: (int(store.arrival(m.row)[node]), m.seq))
                for m in own:
                    self._ingest(book, m, now)
            return fn(book)
        finally:
            book._expiry = []
            for prov, entry, wd in reversed(saved):
                mine = book._by_provider.get(prov)
                if mine is not None:
                    book._remove(mine)
                book._withdrawn.pop(prov, None)
                if entry is not None:
                    book._insert(entry, now)
                if wd is not None:
                    book._withdrawn[prov] = wd
            book._expiry, book._withdrawn_heap = heaps
