"""Heartbeats and receipts over a long-lived libp2p stream: the driver around protocol/rental.py.

Protocol `/gpumarket/rental/1` (specs/node.md): the renter opens a stream to the provider and
sends one frame, the 32-byte agreement id; then the provider sends Heartbeat frames and the renter
answers each good one with a UsageReceipt frame. When the stream drops, the renter dials again
and sends the agreement id again; the provider attaches the new stream to the running session.
Neither state machine depends on the stream: heartbeats sent while no stream is attached are
stored (and lost to the renter, who then pays nothing for the gap), exactly as the protocol's
acked-seconds rule expects.

Effects are carried out strictly in order, so a Persist (heartbeat or receipt into SQLite) is
committed before the Send that follows it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from protocol.agreement import AgreementTerms
from protocol.effects import Effect, EscrowCall, Persist, Report, Send
from protocol.identity import peer_id_from_public_key
from protocol.messages import (AccessGrant, AgreementDetails, Heartbeat, PreemptionNotice,
                               UsageReceipt, digest)
from protocol.rental import ProviderRental, RenterRental, State

from .clock import now_ms
from .effects import EffectExecutor
from .host import GossipHost
from .reqresp import PeerClosed, ReadTimeout, ReqRespError, close_quietly, read_frame, write_frame

log = logging.getLogger(__name__)

RENTAL_PROTOCOL = "/gpumarket/rental/1"
# Frames carry Heartbeat (4 KiB), UsageReceipt (512 B) and AccessGrant (8 KiB: up to 4096
# bytes of access text plus its envelope, 4211 bytes at most): the limit is the largest.
MAX_RENTAL_FRAME = AccessGrant.MAX_SIZE
HELLO_TIMEOUT_S = 10.0  # the renter must name the agreement this soon after opening the stream
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
HELLO_RATE_PER_S = 2.0  # provider: rental hellos per second one peer may send ...
HELLO_BURST = 10  # ... with this burst (a renter redials at most every 0.2 s)
MAX_HELLO_PEERS = 4096  # peers whose hello rate is remembered


SETTLED_EVENTS = frozenset({"Claimed", "Finalized", "Recovered", "Arbitrated"})  # escrow events that pay out


class EscrowPort(Protocol):
    """What a rental needs from the chain (implemented over the chain client)."""

    async def started_s(self, terms: AgreementTerms) -> int | None:
        """Block time the agreement was opened at, or None if it is not open on chain."""

    async def execute(self, call: EscrowCall, terms: AgreementTerms) -> None:
        """Carry out claim / close / recover for `terms`."""


class RecordStore(Protocol):
    """The part of node.store.Store a rental writes to."""

    async def put_heartbeat(self, agreement_id: bytes, seq: int, raw: bytes, hash: bytes,
                            received_at: float) -> bool: ...

    async def put_rental_receipt(self, agreement_id: bytes, heartbeat_seq: int,
                                 acked_seconds: int, raw: bytes, now: float) -> bool: ...


@dataclass
class SessionLog:
    """What a session did, for the CLI, the demo and tests."""

    reports: list[Report] = field(default_factory=list)
    escrow_calls: list[EscrowCall] = field(default_factory=list)
    heartbeats: int = 0
    receipts: int = 0
    reconnects: int = 0


class _Session:
    """Runs one rental machine: a timer task plus the frames of the attached stream."""

    def __init__(self, machine: ProviderRental | RenterRental, terms: AgreementTerms,
                 details: AgreementDetails, escrow: EscrowPort, store: RecordStore | None,
                 clock: Callable[[], int]) -> None:
        self.machine = machine
        self.terms = terms
        self.details = details
        self.agreement_id = terms.agreement_id()
        self.escrow = escrow
        self.store = store
        self.clock = clock
        self.log = SessionLog()
        self.stream: INetStream | None = None
        self._wake = trio.Event()  # set when something may have moved the next deadline
        self._lock = trio.Lock()  # effects of the timer and of frames must not interleave
        self.done = trio.Event()
        # Called with each Report after it is logged (the renter's --on-preempt hook).
        self.on_report: Callable[[Report], Awaitable[None]] | None = None

    @property
    def finished(self) -> bool:
        return self.machine.state is State.DONE

    async def carry_out(self, effects: list[Effect]) -> None:
        await EffectExecutor(persist=self._store, send=self._send, escrow=self._escrow,
                             report=self._report, start_service=self.on_service,
                             stop_service=self.on_service).run(effects)
        self._wake.set()
        if self.finished:
            self.done.set()

    async def _escrow(self, effect: EscrowCall) -> None:
        self.log.escrow_calls.append(effect)
        try:
            await self.escrow.execute(effect, self.terms)
        except Exception as exc:  # the chain said no: keep the session, report it
            log.warning("escrow %s for %s failed: %s", effect.method,
                        self.agreement_id.hex()[:12], exc)
            self.log.reports.append(Report("escrow_call_failed",
                                           {"method": effect.method, "error": str(exc)}))

    async def _report(self, effect: Report) -> None:
        self.log.reports.append(effect)
        log.info("rental %s: %s %s", self.agreement_id.hex()[:12], effect.event, effect.detail)
        if self.on_report is not None:
            await self.on_report(effect)

    async def on_service(self, effect: Effect) -> None:
        """StartService / StopService: the provider's business (see ProviderSession)."""

    async def _store(self, effect: Persist) -> None:
        msg = effect.message
        if isinstance(msg, Heartbeat):
            self.log.heartbeats += 1
            if self.store is not None:
                raw = msg.encode()
                await self.store.put_heartbeat(effect.agreement_id, msg.seq, raw, digest(raw),
                                               self.clock() / 1000)
        elif isinstance(msg, UsageReceipt):
            self.log.receipts += 1
            if self.store is not None:
                await self.store.put_rental_receipt(effect.agreement_id, msg.heartbeat_seq,
                                                    msg.acked_seconds, msg.encode(),
                                                    self.clock() / 1000)
        elif isinstance(msg, PreemptionNotice) and self.store is not None:
            # Evidence (specs/evidence.md step 8); kept beside the agreement's other records.
            await self.store.add_evidence(effect.agreement_id, "preemption_notice", msg.encode(),
                                          self.clock() / 1000)

    async def _send(self, effect: Send) -> None:
        stream = self.stream
        if stream is None:
            return  # no stream right now: the message is stored; the peer will miss it
        try:
            await write_frame(stream, effect.message.encode(), max_frame=MAX_RENTAL_FRAME)
        except PeerClosed:
            self.stream = None

    async def run_timers(self) -> None:
        while not self.finished:
            deadline = self.machine.next_deadline()
            self._wake = trio.Event()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = (deadline - self.clock()) / 1000
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                    continue  # woken early: recompute the deadline
            async with self._lock:
                await self.carry_out(self._timer_effects(max(self.clock(), deadline)))
        self.done.set()

    def _timer_effects(self, now: int) -> list[Effect]:
        return self.machine.on_timer(now)

    async def feed(self, data: bytes) -> None:
        async with self._lock:
            await self.carry_out(self.machine.receive_data(data, self.clock()))

    async def escrow_event(self, name: str) -> None:
        """The escrow contract emitted ``name`` (an event name) for this agreement; the
        machine's effects are carried out under the session's lock, like a frame's."""
        async with self._lock:
            await self.carry_out(self._escrow_effects(name, self.clock()))

    def _escrow_effects(self, name: str, now: int) -> list[Effect]:
        return []


class ProviderSession(_Session):
    """The provider's side: heartbeats on a schedule, receipts from whichever stream is attached."""

    def __init__(self, machine: ProviderRental, terms: AgreementTerms, details: AgreementDetails,
                 escrow: EscrowPort, store: RecordStore | None, clock: Callable[[], int],
                 metrics: Callable[[], Any] | None,
                 service: Callable[[Effect], Awaitable[None]] | None) -> None:
        super().__init__(machine, terms, details, escrow, store, clock)
        self.metrics = metrics
        self.service = service
        self.grant: AccessGrant | None = None  # sent on every attached stream
        self.halted: str | None = None  # why the session stopped before serving

    @property
    def finished(self) -> bool:
        return self.halted is not None or super().finished

    async def halt(self, reason: str) -> None:
        """Stop before serving (the access hook failed): no heartbeat is ever sent, so no
        receipt exists and no money moves beyond the open; the renter's node closes and
        recovers its deposit after the silence."""
        self.halted = reason
        self.log.reports.append(Report("halted", {"reason": reason}))
        self._wake.set()
        self.done.set()
        stream, self.stream = self.stream, None
        if stream is not None:
            await close_quietly(stream)

    async def preempt(self, notice_ms: int, reason: int, detail: str) -> PreemptionNotice | None:
        """Interruptible agreements: notify the renter that service stops `notice_ms` from now
        (the machine checks the promised notice; see ProviderRental.preempt). None if not
        serving, or if the agreement ends before that stop anyway. The stop is taken from the
        same clock reading as the notice's time, inside the lock: a stop computed before
        waiting for the lock came out a few ms short of the promised notice under load."""
        async with self._lock:
            if self.finished or self.machine.state is not State.SERVING:
                return None
            now = self.clock()
            stop_ms = now + notice_ms
            if stop_ms >= self.machine.end_ms:  # type: ignore[union-attr]
                return None
            await self.carry_out(self.machine.preempt(now, stop_ms, reason, detail))  # type: ignore[union-attr]
        return self.machine.notice  # type: ignore[union-attr]

    async def send_grant(self, grant: AccessGrant) -> None:
        self.grant = grant
        if self.stream is not None:
            await self._send(Send(self.details.renter_key, grant))

    def _timer_effects(self, now: int) -> list[Effect]:
        if self.metrics is not None:
            try:
                snapshot = self.metrics()
                if snapshot is not None:
                    self.machine.set_metrics(snapshot)  # type: ignore[union-attr]
            except Exception as exc:  # NVML hiccup: send the last snapshot
                log.warning("GPU metrics failed: %s", exc)
        return self.machine.on_timer(now)

    async def on_service(self, effect: Effect) -> None:
        if self.service is not None:
            await self.service(effect)

    async def serve_stream(self, stream: INetStream) -> None:
        """Attach a renter stream and read its receipts until it ends."""
        old, self.stream = self.stream, stream
        if self.grant is not None:
            await self._send(Send(self.details.renter_key, self.grant))
        notice = getattr(self.machine, "notice", None)
        if notice is not None:  # a renter that missed it (stream down) learns it now
            await self._send(Send(self.details.renter_key, notice))
        if old is not None:
            self.log.reconnects += 1
            await close_quietly(old)
        idle = (self.terms.heartbeat_interval * 1000 * 4) / 1000 + 5
        while not self.finished and self.stream is stream:
            try:
                data = await read_frame(stream, max_frame=MAX_RENTAL_FRAME, timeout=idle)
            except ReqRespError:
                break
            await self.feed(data)
        if self.stream is stream:
            self.stream = None


    def _escrow_effects(self, name: str, now: int) -> list[Effect]:
        return self.machine.escrow_closed(now) if name == "Closed" else []  # type: ignore[union-attr]

    async def service_lost(self) -> None:
        """The rented environment died: stop service and claim (ProviderRental.service_lost)."""
        async with self._lock:
            await self.carry_out(self.machine.service_lost(self.clock()))  # type: ignore[union-attr]


class RenterSession(_Session):
    """The renter's side: keeps a stream to the provider open, answers heartbeats."""

    @property
    def access(self) -> str | None:
        """From the provider's AccessGrant, once one arrives (the machine checks it)."""
        return self.machine.access  # type: ignore[union-attr]

    async def run_connection(self, host: GossipHost, provider: ID) -> None:
        attempt = 0
        while not self.finished:
            # py-libp2p (0.8.1) refuses to dial a peer for 60 s once all its addresses failed
            # (a "negative cache"); a provider that restarts is back within seconds, and this
            # loop paces its own redials, so lift the block for this one peer.
            unblock = getattr(host.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(provider)
            try:
                with trio.fail_after(10):
                    stream = await host.host.new_stream(provider, [TProtocol(RENTAL_PROTOCOL)])
                await write_frame(stream, self.agreement_id, max_frame=MAX_RENTAL_FRAME)
            except Exception as exc:
                # Back off, but redial at least once per heartbeat interval: a provider that
                # restarts should find its renter again before it stops for missed receipts.
                delay = min(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)],
                            max(RECONNECT_BACKOFF_S[0], self.terms.heartbeat_interval / 2))
                attempt += 1
                log.info("rental %s: provider unreachable (%r), retry in %.1fs",
                         self.agreement_id.hex()[:12], exc, delay)
                with trio.move_on_after(delay):
                    await self.done.wait()
                continue
            if attempt or self.log.reconnects or self.log.heartbeats:
                self.log.reconnects += 1
            attempt = 0
            self.stream = stream
            idle = self.terms.heartbeat_interval * 2 + 5
            try:
                while not self.finished:
                    try:
                        data = await read_frame(stream, max_frame=MAX_RENTAL_FRAME, timeout=idle)
                    except ReadTimeout:
                        break  # silent provider: redial (the machine withholds meanwhile)
                    except ReqRespError:
                        break
                    await self.feed(data)
            finally:
                self.stream = None
                await close_quietly(stream)
            if not self.finished:
                with trio.move_on_after(RECONNECT_BACKOFF_S[0]):
                    await self.done.wait()

    def _escrow_effects(self, name: str, now: int) -> list[Effect]:
        if name in SETTLED_EVENTS:
            return self.machine.escrow_settled(now)  # type: ignore[union-attr]
        return []

    async def stop(self) -> None:
        """End early: the machine emits the escrow close."""
        async with self._lock:
            await self.carry_out(self.machine.stop(self.clock()))  # type: ignore[union-attr]


class HelloRefused(Exception):
    """start_session's refusal of a rental hello, with the reason counted by the desk."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


StartSession = Callable[[bytes, ID], Awaitable[ProviderSession | None]]


class RentalDesk:
    """Provider: answers `/gpumarket/rental/1` streams and runs one session per agreement.

    A hello costs the provider nothing it does not already have: each peer gets a token bucket
    of hellos (`hello_rate_per_s`, `hello_burst`; beyond it the stream is closed unread); a
    stream for a running session must come from the agreement's renter; anything else goes to
    `start_session`, which answers unknown agreements from memory (None) and decides how often
    it asks the chain (node.Node._start_provider_session)."""

    def __init__(self, host: GossipHost, nursery: trio.Nursery, start_session: StartSession, *,
                 hello_rate_per_s: float = HELLO_RATE_PER_S, hello_burst: int = HELLO_BURST) -> None:
        self.host = host
        self.nursery = nursery
        self.start_session = start_session
        self.sessions: dict[bytes, ProviderSession] = {}
        self.rejected: dict[str, int] = {}
        self.hello_rate_per_s = hello_rate_per_s
        self.hello_burst = hello_burst
        self._buckets: OrderedDict[ID, tuple[float, float]] = OrderedDict()  # peer -> (tokens, at)

    def install(self) -> None:
        self.host.host.set_stream_handler(TProtocol(RENTAL_PROTOCOL), self._on_stream)

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _allow_hello(self, peer: ID) -> bool:
        now = trio.current_time()
        tokens, at = self._buckets.pop(peer, (float(self.hello_burst), now))
        tokens = min(float(self.hello_burst), tokens + (now - at) * self.hello_rate_per_s)
        allowed = tokens >= 1
        self._buckets[peer] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > MAX_HELLO_PEERS:  # the least recently seen peer goes first
            self._buckets.popitem(last=False)
        return allowed

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            if not self._allow_hello(peer):
                self._count("rate_limited")
                return
            try:
                hello = await read_frame(stream, max_frame=64, timeout=HELLO_TIMEOUT_S)
            except ReqRespError as exc:
                self._count(type(exc).__name__)
                return
            if len(hello) != 32:
                self._count("bad_hello")
                return
            session = self.sessions.get(hello)
            if session is not None and \
                    peer_id_from_public_key(session.details.renter_key) != peer.to_base58():
                self._count("not_renter")  # another peer must not take the renter's stream
                return
            if session is None:
                try:
                    session = await self.start_session(hello, peer)
                except HelloRefused as refused:
                    self._count(refused.reason)
                    return
                if session is None:
                    self._count("unknown_agreement")
                    return
                self.sessions[hello] = session
                self.nursery.start_soon(session.run_timers)
            if session.finished:
                self._count("rental_over")
                return
            await session.serve_stream(stream)
        finally:
            await close_quietly(stream)
