"""The rental stream: provider heartbeats, renter receipts, and when each side stops.

Two sans-I/O machines, one per role, in the shape of protocol/negotiation.py:
`receive_data(data, now_ms)` (decode, then dispatch) or `handle(message, now_ms)` for the peer's
messages, `on_timer(now_ms)` and `next_deadline()` for time, plus a few calls for what the driver
learns elsewhere (the chain, the user). Each returns a list of effects (protocol/effects.py) to
carry out in order.

Every input, a peer message (by type) or an `Event` (a timer or a driver call), goes through one
table per machine, `TRANSITIONS: (state, input) -> (next state, handler)`, h11-style: what is not
in the table does not happen. specs/heartbeat.md is the prose twin (the same tables, checked
against these by tests/protocol/test_spec_tables.py), the acked-seconds rule, the withholding
policy and the loss bounds.

A peer's bad message never raises and never ends a rental by itself: a message not in the table
for the current state, or one failing a check, is counted in `rejections[code]` and reported as
`Report("receipt_rejected" | "heartbeat_rejected", {"code", "verdict", "detail"})`; `verdict` is
"reject" (penalise the peer) or "ignore" (stale, duplicate, crossed in flight: no penalty).
Misuse by the local caller (a driver call or timer event not in the table) raises
LocalProtocolError.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Any, Callable, ClassVar, Protocol, Sequence

from .agreement import AgreementTerms, EscrowDomain, recover_receipt_signer, sign_receipt
from .effects import Effect, EscrowCall, Persist, Report, Send, StartService, StopService
from .encoding import Message, decode
from .errors import DecodeError, Ignore, LocalProtocolError, Reject, RemoteProtocolError
from .eth import private_key_address
from .identity import PeerKey
from .messages import (AccessGrant, AgreementDetails, GpuMetrics, Heartbeat, PreemptionNotice,
                       PreemptionReason, UsageReceipt, digest)
from .verifier import VERIFIER, Verifier
from .params import DEFAULT_PARAMS, SECOND_MS, Params

ZERO_HASH = b"\x00" * 32
NONCE_LEN = 16
MAX_LIVE_NONCES = 64  # renter: nonces issued and still acceptable (bounded memory)


class RandomSource(Protocol):
    """What the renter needs from a `random.Random` (protocol/ never imports `random`)."""

    def randbytes(self, n: int) -> bytes: ...


def initial_nonce(agreement_id: bytes) -> bytes:
    """The nonce heartbeats echo before the renter's first receipt names one."""
    return agreement_id[:NONCE_LEN]


def heartbeat_hash(hb: Heartbeat) -> bytes:
    """sha256 of the heartbeat's canonical wire bytes: the chain link and what receipts cite."""
    return digest(hb.encode())


class State(enum.StrEnum):
    """Rental states (both roles). A str enum: the value is what nodes show and tests compare."""

    SERVING = "serving"  # provider: heartbeats out, receipts in
    NOTICE = "notice"  # provider: serving, a preemption notice sent; service stops at its stop_ms
    FINISHING = "finishing"  # provider: past the end, final heartbeat out, awaiting its receipt
    ACTIVE = "active"  # renter: good heartbeats arriving, receipts out
    SILENT = "silent"  # renter: no good heartbeat for a while (receipts withheld anyway)
    NOTICED = "noticed"  # renter: a preemption notice holds; receipts go on until its stop
    PREEMPTED = "preempted"  # renter: past the notice's stop, waiting for the provider's claim
    CLOSED = "closed"  # renter: closed the escrow early, waiting to recover
    ENDED = "ended"  # renter: the agreement's end passed, waiting for the claim or to recover
    DONE = "done"  # both: settled, claimed or recovered; nothing more happens


class Event(enum.StrEnum):
    """Inputs that are not peer messages: a timer the machine set, or a driver call."""

    HEARTBEAT_DUE = "heartbeat_due"  # provider timer: the next heartbeat slot
    RECEIPTS_MISSED = "receipts_missed"  # provider timer: the stop deadline
    AGREEMENT_END = "agreement_end"  # timer: provider at end_ms, renter at end_ms + tol
    RENTER_CLOSED = "renter_closed"  # provider driver: escrow_closed (the renter's Closed event)
    SERVICE_LOST = "service_lost"  # provider driver: service_lost (the rented container died)
    FINAL_RECEIPT = "final_receipt"  # provider: a valid receipt answers the final heartbeat
    FINAL_WAIT_OVER = "final_wait_over"  # provider timer: end_ms + min(I, grace/2)
    SILENCE = "silence"  # renter timer: timeout*I without a good heartbeat
    LONG_SILENCE = "long_silence"  # renter timer: (timeout+N)*I without a good heartbeat
    STOP = "stop"  # renter driver: stop(now)
    SETTLED = "settled"  # renter driver: escrow_settled (claimed or finalized on chain)
    RECOVER_DUE = "recover_due"  # renter timer: end + grace + 1 s + clock_skew
    PREEMPT = "preempt"  # provider driver: preempt(now, stop_ms, reason)
    NOTICE_END = "notice_end"  # timer: provider at the notice's stop_ms, renter at stop_ms + tol
    CLAIM_OVERDUE = "claim_overdue"  # renter timer: stop_ms + grace/2 without a settlement


Input = Event | type[Message]  # a key of a TRANSITIONS table: an Event or a message type
Handler = Callable[[Any, Any, int], list[Effect]]  # (machine, message or None, now_ms)


class _Machine:
    """Shared plumbing: dispatch by table, receive_data, rejection counting."""

    TRANSITIONS: ClassVar[dict[tuple[State, Input], tuple[State, Handler]]]
    # The message types the peer sends this role, each with the report event for a bad one
    # (the first also for bytes that do not decode).
    RECEIVES: ClassVar[dict[type[Message], str]]
    state: State

    def __init__(self, verifier: Verifier = VERIFIER) -> None:
        self.rejections: Counter[str] = Counter()
        self.verifier = verifier  # signature checks of the peer's messages (the simulator memoises)

    def receive_data(self, data: bytes, now_ms: int) -> list[Effect]:
        """Decode one frame from the peer's stream and handle it. Bytes that are not one
        canonical message of the expected type are rejected (counted, reported), not raised."""
        if type(data) is not bytes:
            raise LocalProtocolError("bad_argument", "receive_data takes bytes")
        try:
            message = decode(data, tuple(self.RECEIVES))
        except DecodeError as err:
            return self._rejected(err)
        return self.handle(message, now_ms)

    def handle(self, message: Message, now_ms: int) -> list[Effect]:
        """Handle one decoded message from the peer."""
        try:
            self._admit(message)
            self._validate(message, now_ms)
        except RemoteProtocolError as err:
            return self._rejected(err, type(message))
        return self._step(type(message), message, now_ms)

    def _admit(self, message: Message) -> None:
        """The first checks: the message type, then whether the table expects it now."""
        # [REJECT unexpected_message] only the RECEIVES types travel towards each role
        if type(message) not in self.RECEIVES:
            raise Reject("unexpected_message", f"{type(message).__name__} on the rental stream")
        if (self.state, type(message)) not in self.TRANSITIONS:
            raise self._not_expected(message)

    def _not_expected(self, message: Message) -> RemoteProtocolError:
        raise NotImplementedError

    def _validate(self, message: Any, now_ms: int) -> Any:
        raise NotImplementedError

    def _step(self, event: Input, message: Any, now_ms: int) -> list[Effect]:
        """Take the transition for `event` in the current state: move, then run its handler."""
        try:
            next_state, handler = self.TRANSITIONS[(self.state, event)]
        except KeyError:
            name = event.__name__ if isinstance(event, type) else event.value
            raise LocalProtocolError(
                "bad_transition", f"{type(self).__name__}: no transition for {name!r} in {self.state.value!r}"
            ) from None
        self.state = next_state
        return handler(self, message, now_ms)

    def _on_timer_event(self, event: Event | None, now_ms: int) -> list[Effect]:
        return [] if event is None else self._step(event, None, now_ms)

    def _rejected(self, err: RemoteProtocolError, what: type | None = None) -> list[Effect]:
        self.rejections[err.code] += 1
        event = self.RECEIVES[what] if what in self.RECEIVES else next(iter(self.RECEIVES.values()))
        return [Report(event, {"code": err.code, "verdict": err.verdict, "detail": err.detail})]


def _duration_ms(seconds: int) -> int:
    return seconds * SECOND_MS


# =============================================================================================
# Provider


class ProviderRental(_Machine):
    """The provider's side of one agreement: heartbeats out, receipts in, stop and claim.

    Heartbeat k is due at `started_ms + k * interval` (no drift; slots missed because the driver
    called late are skipped, not sent in a burst). A final heartbeat goes out at the end, so the
    last interval can be acknowledged too.
    """

    RECEIVES = {UsageReceipt: "receipt_rejected"}

    def __init__(
        self,
        terms: AgreementTerms,
        details: AgreementDetails,
        domain: EscrowDomain,
        provider: PeerKey,
        started_ms: int,
        params: Params = DEFAULT_PARAMS,
        metrics: Sequence[GpuMetrics] | None = None,
        *,
        verifier: Verifier = VERIFIER,
    ) -> None:
        super().__init__(verifier)
        if provider.public != details.provider_key:
            raise LocalProtocolError("wrong_key", "provider key is not details.provider_key")
        if terms.details_hash != details.details_hash():
            raise LocalProtocolError("details_mismatch", "terms.details_hash does not commit to details")
        self.terms, self.details, self.domain, self.key, self.params = terms, details, domain, provider, params
        self.agreement_id = terms.agreement_id()
        self.started_ms = started_ms
        self.interval_ms = _duration_ms(terms.heartbeat_interval)
        self.end_ms = started_ms + _duration_ms(terms.max_seconds)
        # Wait this long after the end for the receipt answering the final heartbeat.
        self.final_wait_ms = min(self.interval_ms, _duration_ms(terms.grace) // 2)
        self.state = State.SERVING
        self.metrics: tuple[GpuMetrics, ...] = tuple(metrics) if metrics is not None else tuple(
            GpuMetrics(uuid_digest=g, util_pct=0, mem_used_mib=0, temp_c=0, power_mw=0)
            for g in details.gpus
        )
        self.sent: list[bytes] = []  # hashes of heartbeats sent, index = seq
        self.sent_ms: list[int] = []
        self.next_heartbeat_ms = started_ms
        self.nonce = initial_nonce(self.agreement_id)
        self.latest: UsageReceipt | None = None  # latest valid receipt (the one to claim with)
        # The stop timer restarts only on a receipt that raises acked_seconds (the first
        # receipt, acking 0, counts): a renter cannot keep the service with receipts that pay
        # nothing more.
        self.last_progress_ms = started_ms
        self.progress_acked = -1
        self.final_seq: int | None = None
        self.stopped_ms: int | None = None  # when StopService was emitted
        self.notice: PreemptionNotice | None = None  # the preemption notice sent, if any
        self.finish_ms = self.end_ms  # when the final heartbeat went out (end or notice stop)

    @classmethod
    def restore(
        cls,
        terms: AgreementTerms,
        details: AgreementDetails,
        domain: EscrowDomain,
        provider: PeerKey,
        started_ms: int,
        params: Params = DEFAULT_PARAMS,
        *,
        heartbeats: Sequence[Heartbeat],
        latest_receipt: UsageReceipt | None,
        now_ms: int,
        metrics: Sequence[GpuMetrics] | None = None,
        notice: PreemptionNotice | None = None,
    ) -> "ProviderRental":
        """A serving machine rebuilt from this provider's own records after a restart.

        `heartbeats`: every heartbeat it stored, in seq order (a Persist effect precedes each Send,
        so no heartbeat the renter saw is missing); `latest_receipt`: the stored receipt
        answering the highest heartbeat seq, or None. The next heartbeat continues the chain
        (seq and prev_hash) and echoes that receipt's `next_nonce`, which the renter still holds
        live. The stop timer restarts at `now_ms`: the renter gets N intervals to reconnect, so
        a restart costs the provider at most the usual unpaid bound once more. Records that do
        not fit together raise LocalProtocolError (a damaged or foreign store)."""
        m = cls(terms, details, domain, provider, started_ms, params, metrics)
        prev = ZERO_HASH
        for i, hb in enumerate(heartbeats):
            if hb.agreement_id != m.agreement_id or hb.seq != i or hb.prev_hash != prev:
                raise LocalProtocolError("bad_record", f"stored heartbeat {i} does not continue the chain")
            prev = heartbeat_hash(hb)
            m.sent.append(prev)
            m.sent_ms.append(hb.sent_ms)
        if heartbeats and not heartbeats[-1].signature_valid(provider.public):
            raise LocalProtocolError("bad_record", "stored heartbeats are not signed by this provider")
        if latest_receipt is not None:
            try:
                m._admit(latest_receipt)
                m.latest = m._validate(latest_receipt, now_ms)
            except RemoteProtocolError as err:
                raise LocalProtocolError("bad_record", f"stored receipt: {err.code}") from None
            m.nonce = latest_receipt.next_nonce
            m.progress_acked = latest_receipt.acked_seconds
        if m.sent_ms:
            slots = max(0, m.sent_ms[-1] - started_ms) // m.interval_ms + 1
            m.next_heartbeat_ms = started_ms + slots * m.interval_ms
        m.last_progress_ms = now_ms
        if notice is not None:  # sent before the restart: the machine keeps its promise
            if notice.agreement_id != m.agreement_id or not notice.signature_valid(provider.public):
                raise LocalProtocolError("bad_record", "stored notice is not this agreement's")
            m.notice, m.state = notice, State.NOTICE
        return m

    # -- driver inputs ---------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """Effects to begin: give the renter access."""
        return [StartService(self.agreement_id)]

    def set_metrics(self, metrics: Sequence[GpuMetrics]) -> None:
        """The GPU snapshot the next heartbeat carries (the driver polls NVML). Report what is
        there: if an agreed GPU is gone, the renter withholds receipts, as it should."""
        if not all(isinstance(m, GpuMetrics) for m in metrics):
            raise LocalProtocolError("bad_argument", "metrics must be GpuMetrics")
        self.metrics = tuple(metrics)

    @property
    def acked_seconds(self) -> int:
        return self.latest.acked_seconds if self.latest else 0

    def stop_deadline_ms(self) -> int:
        """Stop serving once N heartbeats in a row after the last paying receipt went unanswered:
        N intervals, plus the late tolerance for the answer to the N-th."""
        return (self.last_progress_ms + self.params.provider_stop_after_missed_receipts * self.interval_ms
                + self.params.heartbeat_late_tolerance_ms)

    def next_deadline(self) -> int | None:
        if self.state is State.SERVING:
            return min(self.next_heartbeat_ms, self.stop_deadline_ms(), self.end_ms)
        if self.state is State.NOTICE:
            assert self.notice is not None
            return min(self.next_heartbeat_ms, self.stop_deadline_ms(), self.notice.stop_ms)
        if self.state is State.FINISHING:
            return self.finish_ms + self.final_wait_ms
        return None

    def on_timer(self, now_ms: int) -> list[Effect]:
        """Fire the timer event that is due, if any (the end first, then the stop deadline,
        then the heartbeat slot). Calling early does nothing and returns []."""
        return self._on_timer_event(self._due(now_ms), now_ms)

    def _due(self, now_ms: int) -> Event | None:
        if self.state in (State.SERVING, State.NOTICE):
            if self.state is State.SERVING and now_ms >= self.end_ms:
                return Event.AGREEMENT_END
            if self.notice is not None and now_ms >= self.notice.stop_ms:
                return Event.NOTICE_END
            if now_ms >= self.stop_deadline_ms():
                return Event.RECEIPTS_MISSED
            if now_ms >= self.next_heartbeat_ms:
                return Event.HEARTBEAT_DUE
        elif self.state is State.FINISHING and now_ms >= self.finish_ms + self.final_wait_ms:
            return Event.FINAL_WAIT_OVER
        return None

    def preempt(self, now_ms: int, stop_ms: int, reason: PreemptionReason | int,
                detail: str = "") -> list[Effect]:
        """Stop an interruptible rental at `stop_ms`: a signed PreemptionNotice goes to the
        renter now; heartbeats go on until `stop_ms`, then service stops and the final heartbeat
        is sent (as at the agreement's end). The notice must keep the promise: `stop_ms` at
        least `details.notice_s` seconds after `now_ms`, and before the agreement's end."""
        if self.details.notice_s == 0:
            raise LocalProtocolError("not_interruptible", "an on-demand agreement is not preempted")
        if stop_ms < now_ms + _duration_ms(self.details.notice_s):
            raise LocalProtocolError("notice_too_short",
                                     f"stop_ms gives less than the promised {self.details.notice_s} s")
        if stop_ms >= self.end_ms:
            raise LocalProtocolError("after_end", "the agreement ends before stop_ms anyway")
        if int(reason) not in PreemptionReason.__members__.values():
            raise LocalProtocolError("bad_argument", f"unknown preemption reason {reason}")
        self._pending_notice = (stop_ms, int(reason), detail)
        return self._step(Event.PREEMPT, None, now_ms)

    def escrow_closed(self, now_ms: int) -> list[Effect]:
        """The driver saw the renter's `Closed` event: stop serving and claim now."""
        if self.state is State.DONE:
            return []
        return self._step(Event.RENTER_CLOSED, None, now_ms)

    def service_started(self, now_ms: int) -> None:
        """The driver finished carrying out StartService (creating a container takes seconds,
        more on a loaded host): the stop timer counts from here, as after a restore, so a slow
        start is not taken for a renter that stopped paying. No effects; heartbeats follow on
        the usual slots (the missed ones skipped)."""
        if self.state is State.SERVING:
            self.last_progress_ms = max(self.last_progress_ms, now_ms)

    def service_lost(self, now_ms: int) -> list[Effect]:
        """The driver saw the rented environment die (its container exited): nothing is served
        any more, so no heartbeat is sent again; claim what was acknowledged. The renter sees
        the silence and closes (specs/heartbeat.md)."""
        if self.state not in (State.SERVING, State.NOTICE):
            return []
        return self._step(Event.SERVICE_LOST, None, now_ms)

    # -- handlers: (state, input) -> effects ------------------------------------------------

    def _on_heartbeat_due(self, _: None, now_ms: int) -> list[Effect]:
        effects = self._heartbeat(now_ms)
        slots = (now_ms - self.started_ms) // self.interval_ms + 1
        self.next_heartbeat_ms = self.started_ms + slots * self.interval_ms
        return effects

    def _on_receipt(self, receipt: UsageReceipt, now_ms: int) -> list[Effect]:
        self.latest = receipt
        self.nonce = receipt.next_nonce
        if receipt.acked_seconds > self.progress_acked:
            self.progress_acked = receipt.acked_seconds
            self.last_progress_ms = now_ms
        return [Persist("receipt", self.agreement_id, receipt)]

    def _on_receipt_finishing(self, receipt: UsageReceipt, now_ms: int) -> list[Effect]:
        effects = self._on_receipt(receipt, now_ms)
        if receipt.heartbeat_seq == self.final_seq:
            effects += self._step(Event.FINAL_RECEIPT, None, now_ms)
        return effects

    def _on_receipts_missed(self, _: None, now_ms: int) -> list[Effect]:
        self.stopped_ms = now_ms
        return [StopService(self.agreement_id, "receipts_missed"),
                Report("renter_stopped_paying", {"acked_seconds": self.acked_seconds}),
                *self._claim()]

    def _on_end(self, _: None, now_ms: int) -> list[Effect]:
        self.stopped_ms = now_ms
        self.final_seq = len(self.sent)
        return [StopService(self.agreement_id, "agreement_end"), *self._heartbeat(now_ms)]

    def _on_service_lost(self, _: None, now_ms: int) -> list[Effect]:
        self.stopped_ms = now_ms
        return [StopService(self.agreement_id, "service_lost"),
                Report("service_lost", {"acked_seconds": self.acked_seconds}), *self._claim()]

    def _on_preempt(self, _: None, now_ms: int) -> list[Effect]:
        stop_ms, reason, detail = self._pending_notice
        self.notice = PreemptionNotice(
            agreement_id=self.agreement_id, stop_ms=stop_ms, reason=reason, detail=detail,
            after_heartbeat=self.sent[-1] if self.sent else ZERO_HASH, sent_ms=now_ms,
        ).sign(self.key)
        return [Persist("notice", self.agreement_id, self.notice),
                Send(self.details.renter_key, self.notice),
                Report("preemption_sent", {"stop_ms": stop_ms, "reason": reason})]

    def _on_notice_end(self, _: None, now_ms: int) -> list[Effect]:
        # As at the agreement's end: stop, then a final heartbeat the renter's last receipt
        # answers (it acknowledges up to the stop); that receipt is claimed at once.
        self.stopped_ms = now_ms
        self.finish_ms = now_ms
        self.final_seq = len(self.sent)
        return [StopService(self.agreement_id, "preempted"), *self._heartbeat(now_ms)]

    def _on_renter_closed(self, _: None, now_ms: int) -> list[Effect]:
        self.stopped_ms = now_ms
        return [StopService(self.agreement_id, "renter_closed"), *self._claim()]

    def _on_claim(self, _: None, now_ms: int) -> list[Effect]:
        return self._claim()

    TRANSITIONS = {
        # (state, input): (next state, handler)       # the handler's effects
        (State.SERVING, Event.HEARTBEAT_DUE): (State.SERVING, _on_heartbeat_due),  # Persist + Send heartbeat
        (State.SERVING, UsageReceipt): (State.SERVING, _on_receipt),  # Persist receipt, adopt nonce
        (State.SERVING, Event.RECEIPTS_MISSED): (State.DONE, _on_receipts_missed),  # StopService + claim
        (State.SERVING, Event.AGREEMENT_END): (State.FINISHING, _on_end),  # StopService, final heartbeat
        (State.SERVING, Event.RENTER_CLOSED): (State.DONE, _on_renter_closed),  # StopService + claim
        (State.SERVING, Event.SERVICE_LOST): (State.DONE, _on_service_lost),  # StopService + claim
        (State.FINISHING, UsageReceipt): (State.FINISHING, _on_receipt_finishing),  # Persist receipt
        (State.FINISHING, Event.FINAL_RECEIPT): (State.DONE, _on_claim),  # claim
        (State.FINISHING, Event.FINAL_WAIT_OVER): (State.DONE, _on_claim),  # claim
        (State.FINISHING, Event.RENTER_CLOSED): (State.DONE, _on_claim),  # claim
        # Interruptible agreements: a notice, service until its stop, then as at the end.
        (State.SERVING, Event.PREEMPT): (State.NOTICE, _on_preempt),  # Persist + Send notice
        (State.NOTICE, Event.HEARTBEAT_DUE): (State.NOTICE, _on_heartbeat_due),  # Persist + Send heartbeat
        (State.NOTICE, UsageReceipt): (State.NOTICE, _on_receipt),  # Persist receipt, adopt nonce
        (State.NOTICE, Event.RECEIPTS_MISSED): (State.DONE, _on_receipts_missed),  # StopService + claim
        (State.NOTICE, Event.NOTICE_END): (State.FINISHING, _on_notice_end),  # StopService, final heartbeat
        (State.NOTICE, Event.RENTER_CLOSED): (State.DONE, _on_renter_closed),  # StopService + claim
        (State.NOTICE, Event.SERVICE_LOST): (State.DONE, _on_service_lost),  # StopService + claim
    }

    # -- internals -------------------------------------------------------------------------

    def _not_expected(self, message: Message) -> RemoteProtocolError:
        # [IGNORE rental_over] the claim is made; later receipts change nothing
        return Ignore("rental_over", "receipt after the provider settled")

    def _validate(self, r: UsageReceipt, now_ms: int) -> UsageReceipt:
        """The checks after `_admit`, in order; the first failing one decides the code
        (specs/heartbeat.md)."""
        # [REJECT wrong_agreement]
        if r.agreement_id != self.agreement_id:
            raise Reject("wrong_agreement", "receipt for another agreement")
        # [REJECT bad_signature] ed25519 by details.renter_key
        if not r.signature_valid(self.details.renter_key, None, self.verifier):
            raise Reject("bad_signature", "receipt not signed by the renter's peer key")
        # [REJECT unknown_heartbeat] it must answer a heartbeat this provider sent
        if r.heartbeat_seq >= len(self.sent) or self.sent[r.heartbeat_seq] != r.heartbeat_hash:
            raise Reject("unknown_heartbeat", f"receipt answers heartbeat {r.heartbeat_seq} we never sent")
        # [REJECT acked_exceeds_max] the contract would refuse it
        if r.acked_seconds > self.terms.max_seconds:
            raise Reject("acked_exceeds_max", f"{r.acked_seconds} > max_seconds {self.terms.max_seconds}")
        if self.latest is not None:
            # [IGNORE stale_receipt] an older answer overtaken in flight, or a duplicate
            if r.heartbeat_seq <= self.latest.heartbeat_seq:
                raise Ignore("stale_receipt", f"answers heartbeat {r.heartbeat_seq}, have {self.latest.heartbeat_seq}")
            # [REJECT acked_decreased] cumulative seconds never go down
            if r.acked_seconds < self.latest.acked_seconds:
                raise Reject("acked_decreased", f"{r.acked_seconds} < {self.latest.acked_seconds}")
        # [REJECT bad_wallet_signature] EIP-712 Receipt must recover terms.renter (ecrecover last:
        # it is the most expensive check)
        try:
            signer = recover_receipt_signer(self.domain, r.agreement_id, r.acked_seconds, r.wallet_sig)
        except Reject as err:
            raise Reject("bad_wallet_signature", err.detail) from None
        if signer != self.terms.renter:
            raise Reject("bad_wallet_signature", "wallet signature does not recover the renter")
        return r

    def _heartbeat(self, now_ms: int) -> list[Effect]:
        seq = len(self.sent)
        hb = Heartbeat(
            agreement_id=self.agreement_id,
            seq=seq,
            sent_ms=now_ms,
            nonce=self.nonce,
            prev_hash=self.sent[-1] if self.sent else ZERO_HASH,
            metrics=self.metrics,
        ).sign(self.key)
        self.sent.append(heartbeat_hash(hb))
        self.sent_ms.append(now_ms)
        return [Persist("heartbeat", self.agreement_id, hb), Send(self.details.renter_key, hb)]

    def _claim(self) -> list[Effect]:
        if self.latest is None:
            return [Report("nothing_to_claim", {"reason": "no valid receipt"})]
        return [EscrowCall("claim", self.agreement_id, {
            "acked_seconds": self.latest.acked_seconds,
            "receipt_sig": self.latest.wallet_sig,
        })]



# =============================================================================================
# Renter


class RenterRental(_Machine):
    """The renter's side of one agreement: heartbeats in, receipts out, withholding, close and
    recover; and the provider's AccessGrant (`access`: how to reach the GPUs), checked like a
    heartbeat's agreement id and signature.

    The acked-seconds rule (specs/heartbeat.md): the first good heartbeat starts the clock and
    acknowledges nothing; each later good heartbeat, received at `now_ms`, acknowledges
    `min(t - last_good_ms, interval + heartbeat_late_tolerance)` milliseconds with
    `t = min(now_ms, end_ms)`; `acked_seconds = min(max_seconds, acked_ms // 1000)`. Time is the
    renter's own clock: the provider's `sent_ms` is checked for sanity but never paid on.
    """

    RECEIVES = {Heartbeat: "heartbeat_rejected", AccessGrant: "access_rejected",
                PreemptionNotice: "notice_rejected"}

    def __init__(
        self,
        terms: AgreementTerms,
        details: AgreementDetails,
        domain: EscrowDomain,
        renter: PeerKey,
        renter_wallet_key: bytes,
        started_ms: int,
        rng: RandomSource,
        params: Params = DEFAULT_PARAMS,
        *,
        verifier: Verifier = VERIFIER,
    ) -> None:
        super().__init__(verifier)
        if renter.public != details.renter_key:
            raise LocalProtocolError("wrong_key", "renter key is not details.renter_key")
        if private_key_address(renter_wallet_key) != terms.renter:
            raise LocalProtocolError("wrong_key", "wallet key is not terms.renter")
        if terms.details_hash != details.details_hash():
            raise LocalProtocolError("details_mismatch", "terms.details_hash does not commit to details")
        self.terms, self.details, self.domain, self.key, self.params = terms, details, domain, renter, params
        self._wallet_key = renter_wallet_key
        self.rng = rng
        self.agreement_id = terms.agreement_id()
        self.started_ms = started_ms
        self.interval_ms = _duration_ms(terms.heartbeat_interval)
        self.cap_ms = self.interval_ms + params.heartbeat_late_tolerance_ms
        self.end_ms = started_ms + _duration_ms(terms.max_seconds)
        self.grace_ms = _duration_ms(terms.grace)
        self.silent_after_ms = params.renter_heartbeat_timeout_intervals * self.interval_ms
        # No parameter of its own (params.py belongs to others): close once the provider would
        # itself have stopped for missed receipts after the silence began.
        self.close_after_ms = (params.renter_heartbeat_timeout_intervals
                               + params.provider_stop_after_missed_receipts) * self.interval_ms
        self.agreed_gpus = tuple(sorted(details.gpus))
        self.state = State.ACTIVE
        self.last_seq: int | None = None
        self.last_hash: bytes | None = None
        self.last_sent_ms: int | None = None
        self.last_good_ms: int | None = None  # renter's clock, capped at end_ms
        self.acked_ms = 0
        self.acked_seconds = 0
        self.nonces: list[bytes] = [initial_nonce(self.agreement_id)]
        self.recover_at_ms: int | None = None
        self.closed_ms: int | None = None
        self.access: str | None = None  # from the provider's AccessGrant, once one arrives
        # Interruptible agreements: the binding preemption notice (the earliest stop received)
        # and the end of paid service it sets (renter's clock; the acked rule caps at it).
        self.notice: PreemptionNotice | None = None
        self.service_end_ms = self.end_ms

    @classmethod
    def restore(
        cls,
        terms: AgreementTerms,
        details: AgreementDetails,
        domain: EscrowDomain,
        renter: PeerKey,
        renter_wallet_key: bytes,
        started_ms: int,
        rng: RandomSource,
        params: Params = DEFAULT_PARAMS,
        *,
        heartbeats: Sequence[tuple[Heartbeat, int]],
        receipts: Sequence[UsageReceipt],
        closed_ms: int | None = None,
        notices: Sequence[PreemptionNotice] = (),
    ) -> "RenterRental":
        """A machine rebuilt from this renter's own records after a restart.

        `heartbeats`: the good heartbeats it stored, each with the renter-clock time it was
        accepted at, in seq order; `receipts`: the receipts it stored, in heartbeat seq order.
        The acked-seconds rule is replayed over the accept times (never below the last receipt
        signed, so acked_seconds cannot go down). Live nonces are rebuilt exactly: the one the
        last accepted heartbeat echoed, and every `next_nonce` issued after it. Each was stored
        before its receipt was sent, so a nonce the provider can echo is never forgotten, and a
        nonce that was never stored was never sent. `closed_ms`: the escrow was closed then
        (block time): the machine waits to recover. The silence clock runs on from the last
        good heartbeat: downtime is not paid for."""
        m = cls(terms, details, domain, renter, renter_wallet_key, started_ms, rng, params)
        for n in notices:  # accepted before the restart: they bind again
            if n.agreement_id != m.agreement_id or not n.signature_valid(details.provider_key):
                raise LocalProtocolError("bad_record", "stored notice is not this agreement's")
            if m.notice is None or n.stop_ms < m.notice.stop_ms:
                m.notice, m.service_end_ms = n, min(m.end_ms, n.stop_ms)
                m.state = State.NOTICED
        for hb, accepted_ms in heartbeats:
            if hb.agreement_id != m.agreement_id or (m.last_seq is not None and hb.seq <= m.last_seq):
                raise LocalProtocolError("bad_record", f"stored heartbeat {hb.seq} out of order")
            t = min(accepted_ms, m.service_end_ms)
            if m.last_good_ms is not None:
                m.acked_ms += min(max(0, t - m.last_good_ms), m.cap_ms)
            m.last_good_ms = t if m.last_good_ms is None else max(m.last_good_ms, t)
            m.last_seq, m.last_hash, m.last_sent_ms = hb.seq, heartbeat_hash(hb), hb.sent_ms
        if heartbeats and not heartbeats[-1][0].signature_valid(details.provider_key):
            raise LocalProtocolError("bad_record", "stored heartbeat not signed by the provider")
        issued = [initial_nonce(m.agreement_id)]
        for r in receipts:
            if r.agreement_id != m.agreement_id or not r.signature_valid(renter.public):
                raise LocalProtocolError("bad_record", "stored receipt is not ours")
            m.acked_ms = max(m.acked_ms, r.acked_seconds * SECOND_MS)
            issued.append(r.next_nonce)
        if heartbeats:
            echoed = heartbeats[-1][0].nonce
            if echoed not in issued:
                raise LocalProtocolError("bad_record", "last heartbeat echoes a nonce we never stored")
            issued = issued[len(issued) - 1 - issued[::-1].index(echoed):]
        m.nonces = issued[-MAX_LIVE_NONCES:]
        m.acked_seconds = min(m.terms.max_seconds, m.acked_ms // SECOND_MS)
        if closed_ms is not None:
            m.state = State.CLOSED
            m.closed_ms = closed_ms
            m.recover_at_ms = m._recover_time(closed_ms)
        return m

    # -- driver inputs ---------------------------------------------------------------------

    def _silence_since(self) -> int:
        return self.last_good_ms if self.last_good_ms is not None else self.started_ms

    def next_deadline(self) -> int | None:
        if self.state is State.ACTIVE:
            return min(self._silence_since() + self.silent_after_ms, self._end_seen_ms())
        if self.state in (State.SILENT, State.NOTICED):
            return min(self._silence_since() + self.close_after_ms, self._end_seen_ms())
        if self.state is State.PREEMPTED:
            return self._claim_overdue_ms()
        if self.state in (State.CLOSED, State.ENDED):
            return self.recover_at_ms
        return None

    def _end_seen_ms(self) -> int:
        # The final heartbeat is sent at the end (or a notice's stop); accept it for the late
        # tolerance.
        return self.service_end_ms + self.params.heartbeat_late_tolerance_ms

    def _claim_overdue_ms(self) -> int:
        # After a preemption the provider claims on the final receipt at once; past half the
        # grace the renter closes the escrow, so that it can recover if no claim comes.
        return self.service_end_ms + self.grace_ms // 2

    def on_timer(self, now_ms: int) -> list[Effect]:
        """Fire the timer event that is due, if any (the end first, then the silences, then
        recover). Calling early does nothing and returns []."""
        return self._on_timer_event(self._due(now_ms), now_ms)

    def _due(self, now_ms: int) -> Event | None:
        running = self.state in (State.ACTIVE, State.SILENT)
        if running and now_ms >= self._end_seen_ms():
            return Event.AGREEMENT_END
        if self.state is State.NOTICED and now_ms >= self._end_seen_ms():
            return Event.NOTICE_END
        if self.state is State.PREEMPTED and now_ms >= self._claim_overdue_ms():
            return Event.CLAIM_OVERDUE
        since = self._silence_since()
        if self.state is State.ACTIVE and now_ms >= since + self.silent_after_ms:
            return Event.SILENCE
        if self.state in (State.SILENT, State.NOTICED) and now_ms >= since + self.close_after_ms:
            return Event.LONG_SILENCE
        if self.state in (State.CLOSED, State.ENDED) and self.recover_at_ms is not None \
                and now_ms >= self.recover_at_ms:
            return Event.RECOVER_DUE
        return None

    def stop(self, now_ms: int) -> list[Effect]:
        """The renter ends the rental early: close the escrow (end := now on-chain)."""
        if self.state not in (State.ACTIVE, State.SILENT, State.NOTICED):
            raise LocalProtocolError("not_running", f"stop in state {self.state.value}")
        if now_ms >= self.end_ms:
            raise LocalProtocolError("already_ended", "the agreement has reached its end")
        return self._step(Event.STOP, None, now_ms)

    def escrow_settled(self, now_ms: int) -> list[Effect]:
        """The driver saw the agreement settle on-chain (claimed or finalized): nothing more to
        do, in particular no recover."""
        if self.state is State.DONE:
            return []
        return self._step(Event.SETTLED, None, now_ms)

    # -- handlers: (state, input) -> effects ------------------------------------------------

    def _on_heartbeat(self, hb: Heartbeat, now_ms: int) -> list[Effect]:
        h = heartbeat_hash(hb)
        effects: list[Effect] = [Persist("heartbeat", self.agreement_id, hb)]
        # Acked-seconds rule (a preemption notice moves the end to its stop).
        t = min(now_ms, self.service_end_ms)
        if self.last_good_ms is not None:
            self.acked_ms += min(max(0, t - self.last_good_ms), self.cap_ms)
        self.last_good_ms = t if self.last_good_ms is None else max(self.last_good_ms, t)
        self.acked_seconds = min(self.terms.max_seconds, self.acked_ms // SECOND_MS)
        self.last_seq, self.last_hash, self.last_sent_ms = hb.seq, h, hb.sent_ms
        # Nonces older than the one this heartbeat echoed can no longer be used.
        self.nonces = self.nonces[self.nonces.index(hb.nonce):]
        next_nonce = self.rng.randbytes(NONCE_LEN)
        self.nonces.append(next_nonce)
        del self.nonces[:-MAX_LIVE_NONCES]
        receipt = UsageReceipt(
            agreement_id=self.agreement_id,
            acked_seconds=self.acked_seconds,
            heartbeat_seq=hb.seq,
            heartbeat_hash=h,
            next_nonce=next_nonce,
            sent_ms=now_ms,
            wallet_sig=sign_receipt(self._wallet_key, self.domain, self.agreement_id, self.acked_seconds),
        ).sign(self.key)
        effects += [Persist("receipt", self.agreement_id, receipt), Send(self.details.provider_key, receipt)]
        return effects

    def _on_heartbeat_after_silence(self, hb: Heartbeat, now_ms: int) -> list[Effect]:
        store_hb, *rest = self._on_heartbeat(hb, now_ms)
        return [store_hb, Report("provider_resumed", {"seq": hb.seq}), *rest]

    def _on_access_grant(self, grant: AccessGrant, now_ms: int) -> list[Effect]:
        # Sent on every stream the provider attaches: the latest one is the one to use.
        self.access = grant.access
        return [Report("access_granted", {})]

    def _on_notice(self, notice: PreemptionNotice, now_ms: int) -> list[Effect]:
        # The earliest stop binds (_validate ignores a notice that does not move it earlier).
        self.notice = notice
        self.service_end_ms = min(self.end_ms, notice.stop_ms)
        promised_ms = _duration_ms(self.details.notice_s)
        return [Persist("notice", self.agreement_id, notice),
                Report("preemption_notice", {
                    "stop_ms": notice.stop_ms, "reason": notice.reason, "detail": notice.detail,
                    # less notice than promised by its own signed times (a provable fault), or
                    # received with less left than promised (late: delay, or backdated)
                    "short": notice.notice_ms < promised_ms,
                    "late": notice.stop_ms - now_ms < promised_ms - self.params.clock_skew_ms,
                    "remaining_ms": max(0, notice.stop_ms - now_ms),
                    "acked_seconds": self.acked_seconds})]

    def _on_notice_end(self, _: None, now_ms: int) -> list[Effect]:
        return [Report("preempted", {"acked_seconds": self.acked_seconds,
                                     "stop_ms": self.service_end_ms})]

    def _on_claim_overdue(self, _: None, now_ms: int) -> list[Effect]:
        return self._close(now_ms, "preempted_unclaimed")

    def _on_silence(self, _: None, now_ms: int) -> list[Effect]:
        return [Report("provider_silent", {"since_ms": self._silence_since(),
                                           "acked_seconds": self.acked_seconds})]

    def _on_long_silence(self, _: None, now_ms: int) -> list[Effect]:
        return self._close(now_ms, "provider_silent")

    def _on_stop(self, _: None, now_ms: int) -> list[Effect]:
        return self._close(now_ms, "renter_stop")

    def _on_end(self, _: None, now_ms: int) -> list[Effect]:
        self.recover_at_ms = self._recover_time(self.end_ms)
        return [Report("agreement_ended", {"acked_seconds": self.acked_seconds})]

    def _on_settled(self, _: None, now_ms: int) -> list[Effect]:
        return [Report("settled", {"acked_seconds": self.acked_seconds})]

    def _on_recover_due(self, _: None, now_ms: int) -> list[Effect]:
        return [EscrowCall("recover", self.agreement_id)]

    TRANSITIONS = {
        # (state, input): (next state, handler)       # the handler's effects
        (State.ACTIVE, Heartbeat): (State.ACTIVE, _on_heartbeat),  # Persist heartbeat, Persist + Send receipt
        (State.SILENT, Heartbeat): (State.ACTIVE, _on_heartbeat_after_silence),  # ... and provider_resumed
        (State.ACTIVE, Event.SILENCE): (State.SILENT, _on_silence),  # Report (receipts withheld anyway)
        (State.SILENT, Event.LONG_SILENCE): (State.CLOSED, _on_long_silence),  # EscrowCall close
        (State.ACTIVE, Event.STOP): (State.CLOSED, _on_stop),  # EscrowCall close
        (State.SILENT, Event.STOP): (State.CLOSED, _on_stop),  # EscrowCall close
        (State.ACTIVE, Event.AGREEMENT_END): (State.ENDED, _on_end),  # Report agreement_ended
        (State.SILENT, Event.AGREEMENT_END): (State.ENDED, _on_end),  # Report agreement_ended
        (State.ACTIVE, Event.SETTLED): (State.DONE, _on_settled),  # the provider claimed early
        (State.SILENT, Event.SETTLED): (State.DONE, _on_settled),
        (State.CLOSED, Event.SETTLED): (State.DONE, _on_settled),
        (State.ENDED, Event.SETTLED): (State.DONE, _on_settled),
        (State.CLOSED, Event.RECOVER_DUE): (State.DONE, _on_recover_due),  # EscrowCall recover
        (State.ENDED, Event.RECOVER_DUE): (State.DONE, _on_recover_due),  # EscrowCall recover
        # How to reach the rented GPUs: kept while the renter may still use them.
        (State.ACTIVE, AccessGrant): (State.ACTIVE, _on_access_grant),  # Report access_granted
        (State.SILENT, AccessGrant): (State.SILENT, _on_access_grant),
        (State.CLOSED, AccessGrant): (State.CLOSED, _on_access_grant),
        (State.ENDED, AccessGrant): (State.ENDED, _on_access_grant),
        # Interruptible agreements: a notice moves the end of paid service to its stop.
        (State.ACTIVE, PreemptionNotice): (State.NOTICED, _on_notice),  # Persist notice, Report preemption_notice
        (State.SILENT, PreemptionNotice): (State.NOTICED, _on_notice),
        (State.NOTICED, PreemptionNotice): (State.NOTICED, _on_notice),  # an earlier stop binds
        (State.NOTICED, Heartbeat): (State.NOTICED, _on_heartbeat),  # Persist heartbeat, Persist + Send receipt
        (State.NOTICED, AccessGrant): (State.NOTICED, _on_access_grant),
        (State.NOTICED, Event.LONG_SILENCE): (State.CLOSED, _on_long_silence),  # EscrowCall close
        (State.NOTICED, Event.STOP): (State.CLOSED, _on_stop),  # EscrowCall close
        (State.NOTICED, Event.NOTICE_END): (State.PREEMPTED, _on_notice_end),  # Report preempted
        (State.NOTICED, Event.SETTLED): (State.DONE, _on_settled),
        (State.PREEMPTED, Event.SETTLED): (State.DONE, _on_settled),  # the provider claimed
        (State.PREEMPTED, Event.CLAIM_OVERDUE): (State.CLOSED, _on_claim_overdue),  # EscrowCall close
    }

    # -- internals -------------------------------------------------------------------------

    def _not_expected(self, message: Message) -> RemoteProtocolError:
        # [IGNORE not_running] closed, ended or settled: a heartbeat that crossed our close
        what = {Heartbeat: "heartbeat", AccessGrant: "access grant"}.get(type(message), "notice")
        return Ignore("not_running", f"{what} in state {self.state.value}")

    def _validate(self, message: Any, now_ms: int) -> Any:
        """The checks after `_admit`, in order; the first failing one decides the code
        (specs/heartbeat.md)."""
        if isinstance(message, AccessGrant):
            return self._validate_grant(message)
        if isinstance(message, PreemptionNotice):
            return self._validate_notice(message, now_ms)
        hb = message
        # [REJECT wrong_agreement]
        if hb.agreement_id != self.agreement_id:
            raise Reject("wrong_agreement", "heartbeat for another agreement")
        # [REJECT bad_signature] ed25519 by details.provider_key
        if not hb.signature_valid(self.details.provider_key, None, self.verifier):
            raise Reject("bad_signature", "heartbeat not signed by the provider's peer key")
        # [IGNORE stale_heartbeat] replayed, duplicated or overtaken: seq must grow
        if self.last_seq is not None and hb.seq <= self.last_seq:
            raise Ignore("stale_heartbeat", f"seq {hb.seq} <= last accepted {self.last_seq}")
        # [REJECT broken_chain] seq 0 starts from zeros; seq last+1 links to the last accepted.
        # A jump over lost heartbeats cannot be checked here (the evidence bundle can).
        if hb.seq == 0 and hb.prev_hash != ZERO_HASH:
            raise Reject("broken_chain", "heartbeat 0 must have a zero prev_hash")
        if self.last_seq is not None and hb.seq == self.last_seq + 1 and hb.prev_hash != self.last_hash:
            raise Reject("broken_chain", f"heartbeat {hb.seq} does not link to {self.last_seq}")
        # [REJECT wrong_nonce] it must echo a nonce we issued, no older than the last one echoed
        # (older ones remain valid only while our newer receipts may still be in flight/lost)
        if hb.nonce not in self.nonces:
            raise Reject("wrong_nonce", "heartbeat does not echo a live nonce of ours")
        # [REJECT from_future] sent_ms beyond our clock plus the tolerated skew
        if hb.sent_ms > now_ms + self.params.clock_skew_ms:
            raise Reject("from_future", f"sent_ms {hb.sent_ms} > now {now_ms} + skew")
        # [REJECT before_start] nobody serves an agreement before it opened
        if hb.sent_ms < self.started_ms - self.params.clock_skew_ms:
            raise Reject("before_start", f"sent_ms {hb.sent_ms} before the agreement started")
        # [REJECT time_went_back] the provider's own clock must not run backwards
        if self.last_sent_ms is not None and hb.sent_ms < self.last_sent_ms:
            raise Reject("time_went_back", f"sent_ms {hb.sent_ms} < previous {self.last_sent_ms}")
        # [REJECT gpu_mismatch] metrics list exactly the agreed GPUs (as a set, each once)
        if tuple(sorted(m.uuid_digest for m in hb.metrics)) != self.agreed_gpus:
            raise Reject("gpu_mismatch", "heartbeat metrics do not list exactly the agreed GPUs")
        return hb

    def _validate_grant(self, grant: AccessGrant) -> AccessGrant:
        # [REJECT wrong_agreement]
        if grant.agreement_id != self.agreement_id:
            raise Reject("wrong_agreement", "access grant for another agreement")
        # [REJECT bad_signature] ed25519 by details.provider_key
        if not grant.signature_valid(self.details.provider_key, None, self.verifier):
            raise Reject("bad_signature", "access grant not signed by the provider's peer key")
        return grant

    def _validate_notice(self, n: PreemptionNotice, now_ms: int) -> PreemptionNotice:
        # [REJECT wrong_agreement]
        if n.agreement_id != self.agreement_id:
            raise Reject("wrong_agreement", "notice for another agreement")
        # [REJECT bad_signature] ed25519 by details.provider_key
        if not n.signature_valid(self.details.provider_key, None, self.verifier):
            raise Reject("bad_signature", "notice not signed by the provider's peer key")
        # [REJECT not_interruptible] an on-demand agreement has no preemption
        if self.details.notice_s == 0:
            raise Reject("not_interruptible", "a preemption notice for an on-demand agreement")
        # [REJECT from_future] sent_ms beyond our clock plus the tolerated skew
        if n.sent_ms > now_ms + self.params.clock_skew_ms:
            raise Reject("from_future", f"sent_ms {n.sent_ms} > now {now_ms} + skew")
        # [REJECT bad_stop] service cannot stop before the notice was sent
        if n.stop_ms < n.sent_ms:
            raise Reject("bad_stop", f"stop_ms {n.stop_ms} before sent_ms {n.sent_ms}")
        # [IGNORE notice_not_earlier] a repeat, or a later stop: the earliest stop binds
        if self.notice is not None and n.stop_ms >= self.notice.stop_ms:
            raise Ignore("notice_not_earlier", "the notice held already stops no later")
        return n

    def _recover_time(self, end_ms: int) -> int:
        # The contract allows recover once block time > end + grace; allow for clock skew.
        return end_ms + self.grace_ms + SECOND_MS + self.params.clock_skew_ms

    def _close(self, now_ms: int, reason: str) -> list[Effect]:
        self.closed_ms = now_ms
        self.recover_at_ms = self._recover_time(now_ms)
        return [EscrowCall("close", self.agreement_id, {"reason": reason})]
