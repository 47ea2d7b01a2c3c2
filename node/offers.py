"""The market-data side of a node: the offer topic, the offer book and offer sync on join
(specs/node.md is the prose twin).

:class:`OfferService` (every node) validates what arrives on :data:`OFFER_TOPIC` with the
protocol core against its :class:`~protocol.offerbook.OfferBook`, inserts what is valid, persists
accepted offers to the store, counts every verdict by reason code, expires offers at the book's
deadline, and serves and fetches the current market over :data:`SYNC_PROTOCOL`.

The provider's publisher of its own offer is in node/publisher.py.

Offers are relayable: the ed25519 signature of the provider authenticates an offer, not the
libp2p origin (``from``) of the gossip message nor the peer that forwarded it. A renter that
re-publishes an offer it fetched by sync is a relay, and its message is accepted like the
provider's own. The only peer-related decision is whom to penalise: the forwarder of a REJECT.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.clock import now_ms
from node.host import GossipHost, Verdict
from node.libp2p_nat_patches import direct_peers
from node.ratelimit import RateLimitedLog
from node.reqresp import ReqRespError, read_frame, write_frame
from node.store import Store
from protocol.encoding import decode, unpack_canonical
from protocol.errors import IGNORE, DecodeError, Ignore, ProtocolError, Reject, RemoteProtocolError
from protocol.messages import Offer, OfferWithdrawal, key_prefix
from protocol.offerbook import Entry, OfferBook
from protocol.params import DEFAULT_PARAMS, Params

log = logging.getLogger(__name__)
# Lines a remote peer can trigger (a REJECT, a refused sync): a few per kind per minute, then a
# count, so a flood cannot fill the disk (issue 11).
peer_log = RateLimitedLog(log, burst=10, interval=60.0)

OFFER_TOPIC = "/gpumarket/offers/1"
SYNC_PROTOCOL = "/gpumarket/offer-sync/1"
SYNC_VERSION = 1
SYNC_MAX_REQUEST = 64  # bytes: [version, limit] is at most 7
SYNC_END = msgpack.packb([])  # the empty array closes a sync response

NowMs = Callable[[], int]


wall_clock_ms = now_ms  # (node/clock.py)


# ------------------------------------------------------------------------------------------
# Offer sync wire format (specs/node.md, "Offer sync")


def encode_sync_request(limit: int = 0) -> bytes:
    """``[version, limit]``; limit 0 asks for everything the server is willing to send."""
    return msgpack.packb([SYNC_VERSION, limit])


def decode_sync_request(data: bytes) -> int:
    """The requested limit (0: no limit); raises Reject for anything else."""
    value = unpack_canonical(data, SYNC_MAX_REQUEST)
    if (type(value) is not list or len(value) != 2 or type(value[0]) is not int
            or type(value[1]) is not int):
        raise Reject("bad_sync_request", "a sync request is [version, limit]")
    if value[0] != SYNC_VERSION:
        raise Reject("bad_sync_request", f"sync version {value[0]} not supported")
    if not 0 <= value[1] < 2**32:
        raise Reject("bad_sync_request", "limit out of range")
    return value[1]


def iter_frames(offers: Iterable[bytes], max_frame: int) -> Iterator[bytes]:
    """Pack raw offers into msgpack arrays of bin, each at most ``max_frame`` bytes, one frame
    at a time: a response is encoded as it is sent, never all at once."""
    batch: list[bytes] = []
    size = 5  # 5: the largest array header
    for raw in offers:
        item = len(raw) + (2 if len(raw) < 256 else 3 if len(raw) < 65536 else 5)
        if batch and size + item > max_frame:
            yield msgpack.packb(batch, use_bin_type=True)
            batch, size = [], 5
        batch.append(raw)
        size += item
    if batch:
        yield msgpack.packb(batch, use_bin_type=True)


def chunk_offers(offers: Sequence[bytes], max_frame: int) -> list[bytes]:
    """Every frame of :func:`iter_frames` (for tests and small batches)."""
    return list(iter_frames(offers, max_frame))


def decode_sync_frame(frame: bytes, max_frame: int) -> list[bytes]:
    value = unpack_canonical(frame, max_frame)
    if type(value) is not list or any(type(x) is not bytes for x in value):
        raise Reject("bad_sync_frame", "a sync response frame is an array of byte strings")
    return value


# ------------------------------------------------------------------------------------------
# The service every node runs


# Payload prefixes (type and version) of the messages the known-sender lane looks at.
_KNOWN_PREFIXES = frozenset({key_prefix(Offer), key_prefix(OfferWithdrawal)})


@dataclass(frozen=True)
class OfferServiceConfig:
    """Offer sync limits are in specs/node.md ("Offer sync", limits table)."""

    topic: str = OFFER_TOPIC
    sync_protocol: str = SYNC_PROTOCOL
    sync_max_frame: int = 256 * 1024
    sync_request_timeout_s: float = 1.0  # server: the request frame must arrive within this
    sync_serve_timeout_s: float = 30.0  # server: the whole response, a slow reader included
    sync_write_timeout_s: float = 5.0  # server: each frame must be taken by the reader within this
    sync_max_pending: int = 64  # server: streams waiting for their request, all peers
    sync_max_concurrent: int = 8  # server: responses being sent at once, all peers
    sync_max_per_peer: int = 2  # server: sync streams open from one peer (waiting or served)
    sync_peer_bytes_per_s: float = 1024 * 1024  # server: each peer's byte budget refills at this
    sync_peer_burst_bytes: int = 128 * 1024 * 1024  # ... up to this (a full book: book_max_bytes)
    sync_budget_peers: int = 10_000  # server: byte budgets remembered (full ones go first)
    sync_max_offers: int = 200_000  # server sends at most, client accepts at most this many
    sync_max_bytes: int = 136 * 1024 * 1024  # client: frame bytes accepted (a full book + framing)
    sync_peer_share: float = 1 / 3  # client: new offers taken from one peer, x book_max_bytes
    sync_peers: int = 3  # client: peers asked in parallel
    sync_timeout_s: float = 10.0  # client: deadline for the whole fetch from one peer
    sync_max_rejects: int = 16  # client: drop a sync peer after this many REJECTed offers
    flush_interval_s: float = 5.0  # counters and offers to the store
    prune_interval_s: float = 60.0  # expired and superseded offers out of the store


class ByteBudget:
    """A token bucket of bytes per peer: ``burst`` bytes, refilled at ``rate`` per second.
    Sans-I/O (the caller passes ``now``). At most ``max_peers`` buckets are kept: a new peer
    beyond that drops the buckets that have refilled (they hold no state worth keeping), else
    the least recently used one."""

    def __init__(self, rate: float, burst: int, max_peers: int) -> None:
        if rate <= 0 or burst < 1 or max_peers < 1:
            raise ValueError("a byte budget needs rate > 0, burst >= 1 and max_peers >= 1")
        self.rate, self.burst, self.max_peers = rate, burst, max_peers
        self._buckets: collections.OrderedDict[object, list[float]] = collections.OrderedDict()

    def available(self, peer: object, now: float) -> float:
        b = self._buckets.get(peer)
        if b is None:
            return float(self.burst)
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = max(b[1], now)
        self._buckets.move_to_end(peer)
        return b[0]

    def take(self, peer: object, n: int, now: float) -> bool:
        """Spend ``n`` bytes of ``peer``'s budget; False (nothing spent) if it holds fewer."""
        tokens = self.available(peer, now)
        if tokens < n:
            return False
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._forget(now)
            b = self._buckets[peer] = [tokens, now]
        b[0] -= n
        return True

    def _forget(self, now: float) -> None:
        full = [p for p, (t, u) in self._buckets.items()
                if min(self.burst, t + (now - u) * self.rate) >= self.burst]
        for p in full:
            del self._buckets[p]
        if len(self._buckets) >= self.max_peers:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class SyncResult:
    """What one peer delivered in a sync (``error``: why it stopped early, else None)."""

    peer: ID
    offers: int = 0
    bytes: int = 0
    accepted: int = 0
    accepted_bytes: int = 0
    rejected: int = 0
    error: str | None = None


def _message_kind(data: bytes) -> int | None:
    """The type number of a message (the second element of its array) if it is a fixint."""
    if len(data) >= 2 and 0x92 <= data[0] <= 0x9F and data[1] < 0x80:
        return data[1]
    return None


def _discard(msg: object) -> None:
    """What the offer service does with a delivered gossip message: nothing more."""


class OfferService:
    """The offer topic, the book and offer sync; run with ``await nursery.start(svc.run)``."""

    def __init__(
        self,
        host: GossipHost,
        store: Store | None,
        params: Params = DEFAULT_PARAMS,
        *,
        book: OfferBook | None = None,
        config: OfferServiceConfig = OfferServiceConfig(),
        now_ms: NowMs = wall_clock_ms,
    ) -> None:
        self.host = host
        self.store = store
        self.params = params
        self.book = book if book is not None else OfferBook(params)
        self.config = config
        self.now_ms = now_ms
        self.counters: collections.Counter[str] = collections.Counter()
        self._unflushed: collections.Counter[str] = collections.Counter()
        self._to_store: list[tuple[bytes, int, bytes, bytes, float, float]] = []
        self._store_wake = trio.Event()
        self._expiry_wake = trio.Event()
        self._wake_at_ms: float = math.inf
        self._serving = trio.CapacityLimiter(config.sync_max_concurrent)
        self._sync_pending = 0  # server: streams waiting for their request
        self._sync_open: dict[ID, int] = {}  # server: sync streams open per peer
        self._budget = ByteBudget(config.sync_peer_bytes_per_s, config.sync_peer_burst_bytes,
                                  config.sync_budget_peers)
        # (provider, seq): offers the book evicted or saw withdrawn, to delete from the store
        self._to_delete: list[tuple[bytes, int]] = []
        self._flush_lock = trio.Lock()  # flushes in order: a delete never overtakes its insert
        self.book.on_evict = self._evicted
        self.ready = trio.Event()

    # ---- counting ----
    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        self._unflushed[name] += n

    # ---- the one ingest path (gossip and sync) ----
    def ingest(self, data: bytes, source: str, peer: ID | None, *, offers_only: bool = False) -> Verdict:
        """Validate ``data`` against the book and insert it if valid. Never raises: every outcome
        is a verdict, counted as ``offers.<source>.<accept|reject|ignore>.<code>``."""
        try:
            kind = self._ingest(data, offers_only)
        except RemoteProtocolError as exc:
            verdict = Verdict.IGNORE if exc.verdict == IGNORE else Verdict.REJECT
            self.count(f"offers.{source}.{verdict.value}.{exc.code}")
            if verdict is Verdict.REJECT:
                peer_log.info(f"{source}.reject.{exc.code}", "%s: REJECT %s from %s: %s",
                              source, exc.code, peer, exc.detail)
            else:
                log.debug("%s: IGNORE %s from %s: %s", source, exc.code, peer, exc.detail)
            return verdict
        except Exception as exc:  # our bug (or a LocalProtocolError): not the peer's fault
            code = exc.code if isinstance(exc, ProtocolError) else "internal_error"
            self.count(f"offers.{source}.ignore.{code}")
            log.exception("%s: validating a message from %s failed", source, peer)
            return Verdict.IGNORE
        self.count(f"offers.{source}.accept.{kind}")
        return Verdict.ACCEPT

    def _ingest(self, data: bytes, offers_only: bool) -> str:
        kind = _message_kind(data)
        now = self.now_ms()
        if kind == Offer.TYPE:
            held = self.book.held(data[5:37])
            if held is not None and held.digest == hashlib.sha256(data).digest():
                # the same bytes again (another relay, another sync peer): skip the decode
                raise _Duplicate()
            entry = self.book.ingest_offer(data, now)
            self._accepted(entry)
            return "offer"
        if kind == OfferWithdrawal.TYPE and not offers_only:
            msg = self.book.ingest_withdrawal(data, now)
            self._to_delete.append((msg.provider, msg.seq))
            return "withdrawal"
        msg = decode(data)  # raises the decoding REJECT (malformed, unknown_type, ...)
        raise DecodeError("unexpected_type", f"{type(msg).__name__} is not carried here")

    def _evicted(self, entry: Entry) -> None:
        self.count("offers.evicted")
        self._to_delete.append((entry.provider, entry.seq))

    def _accepted(self, entry: Entry) -> None:
        self._to_store.append((entry.provider, entry.seq, entry.digest, entry.data,
                               self.now_ms() / 1000, entry.expires_ms / 1000))
        self._store_wake.set()
        deadline = entry.expires_ms + self.params.clock_skew_ms + 1
        if deadline < self._wake_at_ms:
            self._expiry_wake.set()

    def known_sender(self, msg) -> bytes | None:
        """The pubsub guard's known-sender lane (node/libp2p_patches.py): an offer or a
        withdrawal on our topic by a provider whose valid offer the book holds, by the
        provider key the payload names (peeked, not verified: a forged one fails validation
        and costs its forwarder a REJECT). Its re-announcements then have a budget of their
        own that relayed new identities cannot drain."""
        data = msg.data
        if len(data) < 37 or data[:5] not in _KNOWN_PREFIXES or self.config.topic not in msg.topicIDs:
            return None
        provider = data[5:37]
        return provider if self.book.held(provider) is not None else None

    def validate_gossip(self, payload: bytes, forwarder: ID) -> Verdict:
        """The topic validator (sync: py-libp2p calls it inline for every message)."""
        return self.ingest(payload, "gossip", forwarder)

    # ---- the service ----
    async def run(self, *, task_status: trio.TaskStatus[OfferService] = trio.TASK_STATUS_IGNORED) -> None:
        host = self.host
        host.set_topic_validator(self.config.topic, self.validate_gossip)
        host.pubsub.p2p_known_sender = self.known_sender
        # Everything is done in the validator (it ingests each accepted offer): what is
        # delivered after it is thrown away, where it is accepted (GossipHost.subscribe).
        await host.subscribe(self.config.topic, deliver=_discard)
        host.host.set_stream_handler(TProtocol(self.config.sync_protocol), self._serve_sync)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._prune_loop)
                self.ready.set()
                task_status.started(self)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self.flush()

    async def _expiry_loop(self) -> None:
        while True:
            now = self.now_ms()
            deadline = self.book.next_deadline()
            if deadline is not None and deadline <= now:
                evicted = self.book.expire(now)
                if evicted:
                    self.count("offers.expired", len(evicted))
                continue
            self._wake_at_ms = math.inf if deadline is None else deadline
            self._expiry_wake = trio.Event()
            wait = math.inf if deadline is None else (deadline - now) / 1000
            with trio.move_on_after(wait):
                await self._expiry_wake.wait()

    async def _flush_loop(self) -> None:
        while True:
            with trio.move_on_after(self.config.flush_interval_s):
                await self._store_wake.wait()
                await trio.sleep(0.05)  # gather a batch
            self._store_wake = trio.Event()
            await self.flush()

    async def _prune_loop(self) -> None:
        while True:
            await trio.sleep(self.config.prune_interval_s)
            await self.prune()

    async def prune(self) -> int:
        """Delete expired offers from the store; returns how many rows went."""
        if self.store is None:
            return 0
        now_s = (self.now_ms() - self.params.clock_skew_ms) / 1000
        deleted = await self.store.prune_expired_offers(now_s)
        self.count("offers.store_pruned", deleted)
        return deleted

    async def flush(self) -> None:
        """Write pending accepted offers and counter deltas to the store, then delete the
        offers the book evicted or saw withdrawn since the last flush."""
        if self.store is None:
            self._to_store.clear()
            self._unflushed.clear()
            self._to_delete.clear()
            return
        async with self._flush_lock:
            await self._flush(self.store)

    async def _flush(self, store: Store) -> None:
        rows, self._to_store = self._to_store, []
        deltas, self._unflushed = dict(self._unflushed), collections.Counter()
        gone, self._to_delete = self._to_delete, []
        try:
            await store.put_offers(rows)
            await store.add_counters(deltas)
            await store.delete_offers_upto(gone)
        except BaseException:
            self._to_store[:0] = rows
            self._unflushed.update(deltas)
            self._to_delete[:0] = gone
            raise

    # ---- offer sync: server ----
    async def _serve_sync(self, stream: INetStream) -> None:
        # Limits (specs/node.md, "Offer sync"): a peer holds at most sync_max_per_peer streams;
        # a stream waits at most sync_request_timeout_s for its request and holds no serving
        # slot while it waits; a response takes one of sync_max_concurrent slots, is encoded
        # frame by frame from a snapshot of references, and spends the peer's byte budget.
        peer = stream.muxed_conn.peer_id
        cfg = self.config
        if self._sync_open.get(peer, 0) >= cfg.sync_max_per_peer:
            self.count("offers.sync_serve.busy_peer")
            await _reset(stream)
            return
        if self._sync_pending >= cfg.sync_max_pending:
            self.count("offers.sync_serve.busy")
            await _reset(stream)
            return
        self._sync_open[peer] = self._sync_open.get(peer, 0) + 1
        try:
            self._sync_pending += 1
            try:
                req = await read_frame(stream, max_frame=SYNC_MAX_REQUEST,
                                       timeout=cfg.sync_request_timeout_s)
            finally:
                self._sync_pending -= 1
            limit = decode_sync_request(req)
            if self._budget.available(peer, trio.current_time()) < cfg.sync_max_frame:
                self.count("offers.sync_serve.budget_refused")
                peer_log.info("sync", "sync request from %s: byte budget spent", peer)
                await _reset(stream)
                return
            try:
                self._serving.acquire_nowait()
            except trio.WouldBlock:
                self.count("offers.sync_serve.busy")
                await _reset(stream)
                return
            try:
                with trio.move_on_after(cfg.sync_serve_timeout_s) as scope:
                    if await self._send_book(stream, peer, limit):
                        self.count("offers.sync_serve.ok")
                    else:
                        await _reset(stream)
                if scope.cancelled_caught:
                    self.count("offers.sync_serve.timeout")
                    peer_log.info("sync", "sync to %s: not finished within %s s", peer,
                                  cfg.sync_serve_timeout_s)
                    await _reset(stream)
            finally:
                self._serving.release()
        except ReqRespError as exc:
            self.count(f"offers.sync_serve.{_reqresp_code(exc)}")
            peer_log.info("sync", "sync request from %s: %s", peer, exc)
            await _reset(stream)
        except RemoteProtocolError as exc:
            self.count(f"offers.sync_serve.{exc.code}")
            peer_log.info("sync", "sync request from %s: REJECT %s", peer, exc)
            await _reset(stream)
        except Exception as exc:  # the peer reset or closed the stream under us
            self.count("offers.sync_serve.stream_failed")
            peer_log.info("sync", "sync to %s: %r", peer, exc)
            await _reset(stream)
        finally:
            n = self._sync_open[peer] - 1
            if n:
                self._sync_open[peer] = n
            else:
                del self._sync_open[peer]
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.close()
                except Exception:
                    pass

    async def _send_book(self, stream: INetStream, peer: ID, limit: int) -> bool:
        """Stream the book to ``peer``: at most one frame is encoded at a time, from references
        to the entries live when the request arrived (strongest first). False if the peer's byte
        budget ran out or a frame stalled (the caller resets the stream)."""
        cfg = self.config
        cap = min(limit or cfg.sync_max_offers, cfg.sync_max_offers)
        entries = self.book.snapshot_entries()
        del entries[cap:]
        sent = 0
        try:
            for frame in iter_frames((e.data for e in entries), cfg.sync_max_frame):
                if not self._budget.take(peer, len(frame), trio.current_time()):
                    self.count("offers.sync_serve.budget_exhausted")
                    peer_log.info("sync", "sync to %s: byte budget spent after %d bytes",
                                  peer, sent)
                    return False
                with trio.move_on_after(cfg.sync_write_timeout_s) as scope:
                    await write_frame(stream, frame, max_frame=cfg.sync_max_frame)
                if scope.cancelled_caught:
                    self.count("offers.sync_serve.stalled")
                    peer_log.info("sync", "sync to %s: a frame not taken within %s s", peer,
                             cfg.sync_write_timeout_s)
                    return False
                sent += len(frame)
                del frame
            await write_frame(stream, SYNC_END, max_frame=cfg.sync_max_frame)
            return True
        finally:
            self.count("offers.sync_serve.bytes", sent)

    # ---- offer sync: client ----
    def sync_candidates(self) -> list[ID]:
        """Connected peers with a direct connection: offer sync never runs over a relayed one
        (specs/node.md, "Reachability", item 6), and a peer reached only through a relay is
        asked once a direct connection appears (a hole punch)."""
        return direct_peers(self.host.host.get_network())[: self.config.sync_peers]

    async def sync(self, peers: Sequence[ID] | None = None, *, timeout: float | None = None) -> list[SyncResult]:
        """Fetch the market from ``peers`` (default: up to ``sync_peers`` connected peers) in
        parallel, each under ``timeout``; every offer goes through :meth:`ingest`."""
        peers = list(self.sync_candidates() if peers is None else peers)
        results = [SyncResult(p) for p in peers]
        deadline = self.config.sync_timeout_s if timeout is None else timeout
        async with trio.open_nursery() as nursery:
            for r in results:
                nursery.start_soon(self._sync_one, r, deadline)
        return results

    async def _sync_one(self, result: SyncResult, deadline: float) -> None:
        cfg = self.config
        share = cfg.sync_peer_share * self.params.book_max_bytes
        stream: INetStream | None = None
        with trio.move_on_after(deadline) as scope:
            try:
                stream = await self.host.host.new_stream(result.peer, [TProtocol(cfg.sync_protocol)])
                await write_frame(stream, encode_sync_request(0))
                while True:
                    remaining = max(0.0, scope.deadline - trio.current_time())
                    frame = await read_frame(stream, max_frame=cfg.sync_max_frame, timeout=remaining)
                    result.bytes += len(frame)
                    if result.bytes > cfg.sync_max_bytes:
                        raise Reject("sync_too_large", f"more than {cfg.sync_max_bytes} bytes")
                    offers = decode_sync_frame(frame, cfg.sync_max_frame)
                    del frame
                    if not offers:
                        break
                    result.offers += len(offers)
                    if result.offers > cfg.sync_max_offers:
                        raise Reject("sync_too_many", f"more than {cfg.sync_max_offers} offers")
                    for raw in offers:
                        verdict = self.ingest(raw, "sync", result.peer, offers_only=True)
                        if verdict is Verdict.ACCEPT:
                            result.accepted += 1
                            result.accepted_bytes += len(raw)
                            if result.accepted_bytes >= share:
                                # One peer fills at most this share of the book: a hostile
                                # peer that answers first cannot fill it with offers that the
                                # book's keep order would then hold against honest ones.
                                raise Ignore("sync_share_full",
                                             f"{result.accepted_bytes} bytes of new offers")
                        elif verdict is Verdict.REJECT:
                            result.rejected += 1
                    if result.rejected > cfg.sync_max_rejects:
                        raise Reject("sync_too_many_rejects", f"{result.rejected} invalid offers")
                    await trio.lowlevel.checkpoint()
                self.count("offers.sync.ok")
            except ReqRespError as exc:
                result.error = _reqresp_code(exc)
            except RemoteProtocolError as exc:
                result.error = exc.code
            except Exception as exc:  # stream negotiation failures, peer gone, ...
                result.error = "stream_failed"
                peer_log.info("sync", "sync from %s: %r", result.peer, exc)
        if scope.cancelled_caught:
            result.error = "timeout"
        if result.error is not None:
            self.count(f"offers.sync.fail.{result.error}")
            peer_log.info("sync", "sync from %s stopped: %s", result.peer, result.error)
        if stream is not None:
            if result.error is not None:
                await _reset(stream)
            else:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        pass


class _Duplicate(RemoteProtocolError):
    verdict = IGNORE

    def __init__(self) -> None:
        super().__init__("duplicate", "offer already held")


def _reqresp_code(exc: ReqRespError) -> str:
    return {"FrameTooLarge": "frame_too_large", "ReadTimeout": "timeout",
            "PeerClosed": "peer_closed", "MalformedFrame": "malformed_frame"}.get(
                type(exc).__name__, "reqresp_error")


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await stream.reset()
        except Exception:
            pass


__all__ = [
    "OFFER_TOPIC", "SYNC_PROTOCOL", "OfferService", "OfferServiceConfig",
    "SyncResult", "ByteBudget",
    "encode_sync_request", "decode_sync_request", "chunk_offers", "iter_frames",
    "decode_sync_frame", "wall_clock_ms",
]


def __getattr__(name: str):
    # The publisher moved to node/publisher.py; the old import path keeps working.
    if name in ("OfferPublisher", "ProviderConfig", "offer_facts"):
        from node import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
