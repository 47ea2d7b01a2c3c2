"""Negotiation between a renter and a provider: two table-driven, sans-I/O state machines.

specs/negotiation.md is the prose twin of this module (flow, transition tables, reason codes).

The renter proposes (`Proposal`, rounds 1..`negotiation_max_rounds`); the provider answers each
proposal with a `CounterProposal`, an `Accept` or a `NegotiationReject`. The renter takes a counter
by proposing exactly its values again; only the provider sends `Accept`, because Accept carries the
provider wallet's EIP-712 consent signature the renter needs to open the escrow. Either side may end
the negotiation at any time with a `NegotiationReject` and a reason code (`Reason`).

Both machines share one shape (aioquic's): `handle(message, now_ms)` or `receive_data(data, now_ms)`
for input, `on_timer(now_ms)` and `next_deadline()` for time, and every method returns a list of
effects (`protocol.effects`) for the driver to carry out in order. Transitions are the tables
`RENTER_TRANSITIONS` and `PROVIDER_TRANSITIONS`; any (state, message type) pair that is not in the
table is a protocol violation: the machine goes to FAILED, records the reason and whose fault it
was, and tells the peer with a NegotiationReject (except in answer to a NegotiationReject). Peer
input never raises; calling a method in a state where it makes no sense raises LocalProtocolError.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

from .agreement import UINT256_MAX, AgreementTerms, EscrowDomain, sign_consent, verify_consent
from .effects import Effect, EscrowCall, Persist, Report, Send
from .encoding import Message, decode, to_wire_text
from .errors import DecodeError, LocalProtocolError, Reject, RemoteProtocolError
from .eth import ZERO_ADDRESS, private_key_address
from .identity import PeerKey
from .messages import (
    MAX_GPUS_PER_OFFER,
    Accept,
    AgreementDetails,
    Binding,
    CounterProposal,
    NegotiationReject,
    Offer,
    Proposal,
)
from .verifier import VERIFIER, Verifier
from .params import Params
from .tokens import refused_token

UINT8_MAX = 2**8 - 1
UINT32_MAX = 2**32 - 1
NEGOTIATION_ID_LEN = 16
DEFAULT_OPEN_HOLD_MS = 120_000  # a provider's default hold (node/negotiate.py passes its own)


# --------------------------------------------------------------------------------------------
# Reason codes (u16 on the wire; stable: never renumber, only append)


class Reason(enum.IntEnum):
    """Why a negotiation ended. Sent in NegotiationReject.reason and kept in `Failure.reason`."""

    PRICE_TOO_LOW = 1  # provider: price below its floor and no round left to counter
    NO_CAPACITY = 2  # provider: not enough free GPUs; renter: counter offers fewer than its minimum
    BAD_DURATION = 3  # provider: outside the offer's range, no round left; renter: counter outside its range
    PRICE_TOO_HIGH = 4  # renter: the counter's price is above the renter's maximum
    OFFER_STALE = 5  # provider: the proposal names an offer digest that is not its current offer
    TOO_MANY_ROUNDS = 6  # a proposal beyond negotiation_max_rounds, or a counter in the last round
    TIMEOUT = 7  # the peer did not answer within negotiation_step_timeout_ms
    CANCELLED = 8  # this side stopped (e.g. the renter took another provider's agreement)
    INVALID_MESSAGE = 9  # undecodable, unexpected in this state, or impossible field values
    WRONG_NEGOTIATION = 10  # negotiation_id is not this negotiation's
    WRONG_ROUND = 11  # round is not the one this state expects
    BAD_SIGNATURE = 12  # ed25519 signature does not verify under the peer's key
    BAD_BINDING = 13  # the renter's wallet binding does not verify or names another peer key
    WRONG_CHAIN = 14  # the renter's binding is for another chain than the offer's
    TERMS_MISMATCH = 15  # Accept.agreement_id differs from the id the renter computes
    BAD_CONSENT = 16  # Accept.consent_sig is not the provider wallet's signature over the terms
    STALE_MESSAGE = 17  # sent_ms outside [now - skew - step timeout, now + skew]
    BAD_OPEN_BY = 18  # renter: Accept.open_by leaves less than min_open_window_ms to open the escrow
    INSUFFICIENT_FUNDS = 19  # provider: the renter wallet's balance or allowance to the escrow is below the deposit
    TOO_MANY_PENDING = 20  # provider: this renter peer or wallet already holds its cap of unopened agreements
    PROVIDER_BUSY = 21  # provider: it could not check the renter's funds in time; try again later
    IMAGE_NOT_OFFERED = 22  # provider: the proposal's image is not one of the offer's images


def reason_name(code: int) -> str:
    """The name of a reason code; codes from a newer peer are kept and shown as UNKNOWN_<n>."""
    try:
        return Reason(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


class Fault(enum.Enum):
    """The side that ended the negotiation."""

    LOCAL = "local"  # this side: its policy declined, it cancelled
    REMOTE = "remote"  # the peer: its NegotiationReject, a message that broke the protocol, silence


@dataclass(frozen=True, slots=True)
class Failure:
    """How a negotiation ended when it did not end in an agreement.

    `error` is set exactly when the peer broke the protocol (forged, malformed, out of order):
    a RemoteProtocolError with verdict REJECT the node may count against the peer's score. A
    clean decline, a cancel, or a timeout leaves it None."""

    reason: int
    fault: Fault
    detail: str = ""
    error: RemoteProtocolError | None = None

    @property
    def reason_name(self) -> str:
        return reason_name(self.reason)


class NegotiationViolation(Reject):
    """The peer broke the negotiation protocol; `reason` is the code sent back to it."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason.name.lower(), detail)
        self.reason = reason


class State(enum.Enum):
    IDLE = "idle"  # renter: not started; provider: no proposal received yet
    PROPOSED = "proposed"  # renter: a proposal is out, waiting for the provider's answer
    COUNTERED = "countered"  # provider: a counter is out, waiting for the renter's next proposal
    AGREED = "agreed"  # terms agreed and the provider's consent signature exchanged
    FAILED = "failed"  # ended without agreement; see `failure`


TERMINAL = frozenset({State.AGREED, State.FAILED})


# --------------------------------------------------------------------------------------------
# Turning an accepted proposal into contract terms


def escrow_domain(offer: Offer) -> EscrowDomain:
    """The EIP-712 domain of the escrow the offer names."""
    return EscrowDomain(offer.terms.chain_id, offer.terms.escrow)


def renter_refusal(offer: Offer, arbiters: frozenset[bytes] | set[bytes]) -> str | None:
    """Why a renter must not negotiate for `offer` at all, or None. `arbiters` is the renter's
    own allowlist of arbiter wallets: an arbiter rules on the whole deposit, and nothing on
    chain stops a provider from naming a sock puppet, so only arbiters the renter chose are
    acceptable (an empty allowlist refuses every offer that names one)."""
    t = offer.terms
    if t.arbiter != ZERO_ADDRESS and t.arbiter not in arbiters:
        if not arbiters:
            return (f"the offer names arbiter 0x{t.arbiter.hex()} and this renter trusts no "
                    "arbiter (add it to renter.arbiters to accept it)")
        return f"the offer names arbiter 0x{t.arbiter.hex()}, which is not in renter.arbiters"
    why = refused_token(t.chain_id, t.token)
    if why is not None:
        return f"the offer's token 0x{t.token.hex()} is refused: {why}"
    return None


def open_by_for(now_ms: int, open_hold_ms: int) -> int:
    """The open_by a provider puts in the terms it accepts at `now_ms` (unix seconds, inclusive:
    the escrow opens while block time <= open_by): the end of its hold, rounded down."""
    return (now_ms + open_hold_ms) // 1000


def agreement_image(offer: Offer, image: str) -> str:
    """The image an agreement names: the proposal's, or the offer's default (its first image)
    when the proposal named none; "" when the offer lists no images."""
    return image or (offer.images[0] if offer.images else "")


def build_agreement(
    offer: Offer, offer_digest: bytes, proposal: Proposal, gpus: Sequence[bytes], open_by: int
) -> tuple[AgreementTerms, AgreementDetails]:
    """The terms exactly as the escrow contract will see them, and the off-chain details they
    commit to. Both sides call this with the same inputs and must get the same agreement id
    (`open_by` is the provider's, carried in Accept).

    Raises LocalProtocolError if the inputs cannot form valid terms (e.g. provider wallet ==
    renter wallet, deposit overflow, wrong number of GPUs)."""
    if len(gpus) != proposal.gpu_count:
        raise LocalProtocolError(
            "bad_gpus", f"{len(gpus)} GPUs assigned for a proposal of {proposal.gpu_count}"
        )
    t = offer.terms
    details = AgreementDetails(
        negotiation_id=proposal.negotiation_id,
        offer_digest=offer_digest,
        provider_key=offer.provider,
        renter_key=proposal.renter,
        chain_id=t.chain_id,
        escrow=t.escrow,
        gpus=tuple(gpus),
        access_key=proposal.access_key,
        notice_s=proposal.notice_s,
        image=agreement_image(offer, proposal.image),
    )
    terms = AgreementTerms(
        provider=offer.binding.wallet,
        renter=proposal.renter_binding.wallet,
        token=t.token,
        price_per_second=proposal.price_per_gpu_second * proposal.gpu_count,
        max_seconds=proposal.duration_s,
        heartbeat_interval=t.heartbeat_interval_s,
        grace=t.grace_s,
        arbiter=t.arbiter,
        dispute_window=t.dispute_window_s,
        details_hash=details.details_hash(),
        open_by=open_by,
    )
    return terms, details


# --------------------------------------------------------------------------------------------
# Shared machinery

Handler = Callable[[Any, Any, int], list[Effect]]


class _Negotiation:
    """What both machines share: failing, timers, the envelope checks, dispatch by table."""

    ROLE: ClassVar[str]
    TRANSITIONS: ClassVar[dict[tuple[State, type], Handler]]

    def __init__(self, key: PeerKey, params: Params, verifier: Verifier = VERIFIER) -> None:
        self.params = params
        self.verifier = verifier  # signature and binding checks (the simulator memoises them)
        self.state = State.IDLE
        self.failure: Failure | None = None
        self.negotiation_id: bytes = b"\x00" * NEGOTIATION_ID_LEN
        self.round = 0  # the round of the latest proposal sent (renter) or received (provider)
        self.terms: AgreementTerms | None = None
        self.details: AgreementDetails | None = None
        self.consent_sig: bytes | None = None
        self._key = key
        self._peer: bytes | None = None  # the peer's ed25519 key, once known
        self._deadline: int | None = None
        self._wire: bytes | None = None  # wire bytes of the message being handled, if known

    # -- public API --------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When `on_timer` must next be called (unix ms), or None."""
        return self._deadline

    def on_timer(self, now_ms: int) -> list[Effect]:
        """Fire the step deadline if it has passed. Calling early (or with no deadline) does
        nothing and returns [], as aioquic's handle_timer: drivers may wake up spuriously."""
        if self._deadline is None or now_ms < self._deadline:
            return []
        return self._timeout(now_ms)

    def receive_data(self, data: bytes, now_ms: int) -> list[Effect]:
        """Decode one message from the stream and handle it. Bytes that do not decode are a
        protocol violation (INVALID_MESSAGE), not an exception."""
        if type(data) is not bytes:
            raise LocalProtocolError("bad_argument", "receive_data takes bytes")
        try:
            message = decode(data)
        except DecodeError as exc:
            if self.state is State.FAILED:
                return [self._after_end("undecodable bytes")]
            effects = self._expire_if_due(now_ms)
            if effects:
                return effects + [self._after_end("undecodable bytes")]
            violation = NegotiationViolation(Reason.INVALID_MESSAGE, f"undecodable: {exc}")
            return self._fail(now_ms, violation.reason, Fault.REMOTE, violation.detail,
                              error=violation, tell=True)
        self._wire = data
        try:
            return self.handle(message, now_ms)
        finally:
            self._wire = None

    def handle(self, message: Message, now_ms: int) -> list[Effect]:
        """Handle one decoded message from the peer."""
        if not isinstance(message, Message):
            raise LocalProtocolError("bad_argument", "handle takes a decoded Message")
        name = type(message).__name__
        if self.state is State.FAILED:
            # Already over (e.g. our cancel crossed the peer's Accept). Not an error, not
            # silent either: the driver sees a Report.
            return [self._after_end(name)]
        effects = self._expire_if_due(now_ms)
        if effects:
            return effects + [self._after_end(name)]
        handler = self.TRANSITIONS.get((self.state, type(message)))
        try:
            if handler is None:
                raise NegotiationViolation(
                    Reason.INVALID_MESSAGE, f"{name} is not expected in state {self.state.name}"
                )
            return handler(self, message, now_ms)
        except NegotiationViolation as violation:
            return self._fail(
                now_ms, violation.reason, Fault.REMOTE, violation.detail, error=violation,
                tell=not isinstance(message, NegotiationReject),
            )

    def cancel(self, now_ms: int, detail: str = "") -> list[Effect]:
        """End the negotiation from this side with CANCELLED, telling the peer if it is
        involved. Allowed in any state but FAILED (in AGREED: this side will not go on, e.g. a
        renter that took another provider's agreement and will not open this escrow)."""
        if self.state is State.FAILED:
            raise LocalProtocolError("wrong_state", "negotiation already failed")
        return self._fail(now_ms, Reason.CANCELLED, Fault.LOCAL, detail or "cancelled", tell=True)

    # -- helpers for subclasses --------------------------------------------------------------

    def _expire_if_due(self, now_ms: int) -> list[Effect]:
        # A message that arrives after the step deadline is late even if the driver has not
        # called on_timer yet: the deadline wins, so both sides see the same outcome.
        if self._deadline is not None and now_ms >= self._deadline:
            return self._timeout(now_ms)
        return []

    def _timeout(self, now_ms: int) -> list[Effect]:
        return self._fail(now_ms, Reason.TIMEOUT, Fault.REMOTE,
                          f"no answer within {self.params.negotiation_step_timeout_ms} ms",
                          tell=True)

    def _after_end(self, what: str) -> Report:
        return Report("negotiation_message_after_end", {
            "role": self.ROLE, "negotiation_id": self.negotiation_id, "message": what,
            "state": self.state.value,
        })

    def _fail(self, now_ms: int, reason: int, fault: Fault, detail: str,
              error: RemoteProtocolError | None = None, tell: bool = True) -> list[Effect]:
        effects: list[Effect] = []
        if tell and self._peer is not None and self.state is not State.FAILED:
            reject = NegotiationReject(
                negotiation_id=self.negotiation_id, round=self.round, reason=int(reason),
                detail=_clip(detail, 200), sent_ms=now_ms,
            ).sign(self._key)
            effects.append(Send(self._peer, reject))
        self.state = State.FAILED
        self._deadline = None
        self.failure = Failure(int(reason), fault, detail, error)
        effects.append(Report("negotiation_failed", {
            "role": self.ROLE, "negotiation_id": self.negotiation_id, "round": self.round,
            "reason": reason_name(int(reason)), "fault": fault.value, "detail": detail,
        }))
        return effects

    def _check_envelope(self, msg: Any, now_ms: int, rounds: Iterable[int]) -> None:
        """Checks every incoming negotiation message passes, in this order."""
        if msg.negotiation_id != self.negotiation_id:
            raise NegotiationViolation(Reason.WRONG_NEGOTIATION,
                                       f"negotiation {msg.negotiation_id.hex()} is not this one")
        if msg.round not in rounds:
            raise NegotiationViolation(Reason.WRONG_ROUND,
                                       f"round {msg.round} where {sorted(rounds)} expected")
        if self._peer is None or not msg.signature_valid(self._peer, self._wire, self.verifier):
            raise NegotiationViolation(Reason.BAD_SIGNATURE,
                                       f"{type(msg).__name__} signature does not verify")
        p = self.params
        if not now_ms - p.clock_skew_ms - p.negotiation_step_timeout_ms <= msg.sent_ms \
                <= now_ms + p.clock_skew_ms:
            raise NegotiationViolation(Reason.STALE_MESSAGE,
                                       f"sent_ms {msg.sent_ms} too far from now {now_ms}")

    def _on_reject(self, msg: NegotiationReject, now_ms: int) -> list[Effect]:
        self._check_envelope(msg, now_ms, self._reject_rounds())
        return self._fail(now_ms, msg.reason, Fault.REMOTE, msg.detail, tell=False)

    def _reject_rounds(self) -> Iterable[int]:
        return (self.round,)


def _clip(text: str, limit: int) -> str:
    return to_wire_text(text, limit)


# --------------------------------------------------------------------------------------------
# Renter


class RenterNegotiation(_Negotiation):
    """The renter's side of one negotiation with one provider about one offer.

    Limits: the renter takes a counter whose price is at most `max_price_per_gpu_second`, whose
    GPU count is in [min_gpu_count, gpu_count] and whose duration is in [min_duration_s,
    max_duration_s] (both default to what it asks for). Its first proposal asks for the offer's
    price, or less if `max_price_per_gpu_second` or `opening_price_per_gpu_second` is lower."""

    ROLE = "renter"

    def __init__(
        self,
        offer: Offer,
        offer_digest: bytes,
        renter: PeerKey,
        renter_binding: Binding,
        gpu_count: int,
        duration_s: int,
        max_price_per_gpu_second: int,
        access_key: str,
        params: Params,
        rng: Any,  # random.Random: the negotiation id comes from it
        *,
        min_gpu_count: int | None = None,
        min_duration_s: int | None = None,
        max_duration_s: int | None = None,
        opening_price_per_gpu_second: int | None = None,
        notice_s: int = 0,
        image: str = "",
        verifier: Verifier = VERIFIER,
    ) -> None:
        super().__init__(renter, params, verifier)
        # One of the offer's images, or "" for its default. Not checked here: the provider
        # decides (IMAGE_NOT_OFFERED), as for any other term it does not offer.
        self.image = image
        self.offer = offer
        # 0: on-demand GPUs; otherwise the interruptible set with this notice (its price).
        self.notice_s = notice_s
        self.offer_digest = offer_digest
        self.binding = renter_binding
        self.access_key = access_key
        self.gpu_count = gpu_count
        self.duration_s = duration_s
        self.max_price = max_price_per_gpu_second
        self.min_gpu_count = gpu_count if min_gpu_count is None else min_gpu_count
        self.min_duration_s = duration_s if min_duration_s is None else min_duration_s
        self.max_duration_s = duration_s if max_duration_s is None else max_duration_s
        opening = min(offer.class_price(notice_s) or offer.terms.price_per_gpu_second,
                      max_price_per_gpu_second)
        if opening_price_per_gpu_second is not None:
            opening = min(opening, opening_price_per_gpu_second)
        self.opening_price = opening
        self._check_arguments()
        self.negotiation_id = rng.randbytes(NEGOTIATION_ID_LEN)
        self.proposal: Proposal | None = None  # the latest proposal sent

    def _check_arguments(self) -> None:
        def bad(why: str) -> LocalProtocolError:
            return LocalProtocolError("bad_argument", why)

        if len(self.offer_digest) != 32:
            raise bad("offer_digest is 32 bytes")
        if self.binding.peer_key != self._key.public:
            raise bad("renter_binding is for another peer key")
        if self.binding.chain_id != self.offer.terms.chain_id:
            raise bad("renter_binding is for another chain than the offer")
        if self.binding.wallet == self.offer.binding.wallet:
            raise bad("renter and provider wallets must differ")
        if self.binding.wallet == self.offer.terms.arbiter:
            raise bad("the offer's arbiter is this renter's wallet")
        if self._key.public == self.offer.provider:
            raise bad("renter and provider keys must differ")
        if self.notice_s and self.offer.interruptible_set(self.notice_s) is None:
            raise bad(f"the offer has no interruptible set with notice_s {self.notice_s}")
        if not 1 <= self.min_gpu_count <= self.gpu_count <= MAX_GPUS_PER_OFFER:
            raise bad(f"need 1 <= min_gpu_count <= gpu_count <= {MAX_GPUS_PER_OFFER}")
        if not 1 <= self.min_duration_s <= self.duration_s <= self.max_duration_s <= UINT32_MAX:
            raise bad("need 1 <= min_duration_s <= duration_s <= max_duration_s <= 2**32-1")
        if not 1 <= self.opening_price <= self.max_price:
            raise bad("prices must be positive")
        if self.max_price * self.gpu_count * self.max_duration_s > UINT256_MAX:
            raise bad("the largest deposit overflows uint256")
        if self.params.negotiation_max_rounds < 1 or self.params.negotiation_max_rounds > UINT8_MAX:
            raise bad("negotiation_max_rounds must be in 1..255")
        # The access key must fit the wire (Text(1024), printable): find out now, not at start.
        self._proposal(1, self.gpu_count, self.duration_s, self.opening_price, 0).encode()

    def _proposal(self, round_: int, gpu_count: int, duration_s: int, price: int,
                  now_ms: int) -> Proposal:
        return Proposal(
            negotiation_id=self.negotiation_id, round=round_, offer_digest=self.offer_digest,
            provider=self.offer.provider, renter=self._key.public, renter_binding=self.binding,
            gpu_count=gpu_count, duration_s=duration_s, price_per_gpu_second=price,
            access_key=self.access_key, sent_ms=now_ms, notice_s=self.notice_s, image=self.image,
        ).sign(self._key)

    def _send_proposal(self, round_: int, gpu_count: int, duration_s: int, price: int,
                       now_ms: int) -> list[Effect]:
        self.proposal = self._proposal(round_, gpu_count, duration_s, price, now_ms)
        self.round = round_
        self.state = State.PROPOSED
        self._deadline = now_ms + self.params.negotiation_step_timeout_ms
        return [Send(self.offer.provider, self.proposal)]

    def start(self, now_ms: int) -> list[Effect]:
        """Send the round-1 proposal."""
        if self.state is not State.IDLE:
            raise LocalProtocolError("wrong_state", f"start in state {self.state.name}")
        self._peer = self.offer.provider  # from now on the provider is involved: tell it
        return self._send_proposal(1, self.gpu_count, self.duration_s, self.opening_price, now_ms)

    def _reject_rounds(self) -> Iterable[int]:
        # The provider may have ended round r-1 (e.g. timed out after its counter) while our
        # proposal r was on the way: its reject then names r-1.
        return (self.round,) if self.state is State.AGREED else (self.round, self.round - 1)

    # -- transitions -------------------------------------------------------------------------

    def _on_counter(self, msg: CounterProposal, now_ms: int) -> list[Effect]:
        self._check_envelope(msg, now_ms, (self.round,))
        t = self.offer.terms
        # [violation] a counter must be something the provider could accept under its offer
        if not 1 <= msg.gpu_count <= len(self.offer.class_gpus(self.notice_s)):
            raise NegotiationViolation(Reason.INVALID_MESSAGE,
                                       "counter GPU count outside the offer's class")
        if not t.min_duration_s <= msg.duration_s <= t.max_duration_s:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "counter duration outside the offer")
        if msg.price_per_gpu_second == 0:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "counter price is zero")
        p = self.proposal
        assert p is not None
        if (msg.gpu_count, msg.duration_s, msg.price_per_gpu_second) == \
                (p.gpu_count, p.duration_s, p.price_per_gpu_second):
            raise NegotiationViolation(Reason.INVALID_MESSAGE,
                                       "counter repeats the proposal: accept it instead")
        # [violation] no round left for the renter to take the counter
        if self.round >= self.params.negotiation_max_rounds:
            raise NegotiationViolation(Reason.TOO_MANY_ROUNDS,
                                       f"counter in round {self.round}, the last round")
        # [decline] outside this renter's limits
        if msg.price_per_gpu_second > self.max_price:
            return self._fail(now_ms, Reason.PRICE_TOO_HIGH, Fault.LOCAL,
                              f"counter price {msg.price_per_gpu_second} above {self.max_price}")
        if not self.min_gpu_count <= msg.gpu_count <= self.gpu_count:
            return self._fail(now_ms, Reason.NO_CAPACITY, Fault.LOCAL,
                              f"counter offers {msg.gpu_count} GPUs, need "
                              f"{self.min_gpu_count}..{self.gpu_count}")
        if not self.min_duration_s <= msg.duration_s <= self.max_duration_s:
            return self._fail(now_ms, Reason.BAD_DURATION, Fault.LOCAL,
                              f"counter duration {msg.duration_s} s outside "
                              f"{self.min_duration_s}..{self.max_duration_s}")
        # Take the counter: propose exactly its values in the next round.
        return self._send_proposal(self.round + 1, msg.gpu_count, msg.duration_s,
                                   msg.price_per_gpu_second, now_ms)

    def _on_accept(self, msg: Accept, now_ms: int) -> list[Effect]:
        self._check_envelope(msg, now_ms, (self.round,))
        proposal = self.proposal
        assert proposal is not None
        # The GPUs of the class the renter asked for: on-demand ones, or the interruptible set's.
        offered = set(self.offer.class_gpus(proposal.notice_s))
        if len(msg.gpus) != proposal.gpu_count or len(set(msg.gpus)) != len(msg.gpus) \
                or not set(msg.gpus) <= offered:
            raise NegotiationViolation(
                Reason.INVALID_MESSAGE,
                f"accept assigns {len(msg.gpus)} GPUs, need {proposal.gpu_count} distinct ones "
                "from the offer's class",
            )
        # [violation] a consent the renter cannot use in time (the escrow refuses after open_by)
        if msg.open_by * 1000 < now_ms + self.params.min_open_window_ms:
            raise NegotiationViolation(
                Reason.BAD_OPEN_BY,
                f"open_by {msg.open_by} leaves less than {self.params.min_open_window_ms} ms "
                "to open the escrow")
        try:
            terms, details = build_agreement(self.offer, self.offer_digest, proposal, msg.gpus,
                                             msg.open_by)
        except LocalProtocolError as exc:  # e.g. open_by beyond uint64
            raise NegotiationViolation(Reason.INVALID_MESSAGE, str(exc)) from None
        agreement_id = terms.agreement_id()
        if msg.agreement_id != agreement_id:
            raise NegotiationViolation(Reason.TERMS_MISMATCH,
                                       "accepted agreement id differs from the proposal's terms")
        domain = escrow_domain(self.offer)
        try:
            verify_consent(domain, terms, msg.consent_sig)
        except Reject as exc:
            raise NegotiationViolation(Reason.BAD_CONSENT, str(exc)) from None
        self.state = State.AGREED
        self._deadline = None
        self.terms, self.details, self.consent_sig = terms, details, msg.consent_sig
        return [
            Persist("accept", agreement_id, msg),
            EscrowCall("open", agreement_id, {
                "terms": terms, "details": details, "consent_sig": msg.consent_sig,
                "domain": domain, "deposit": terms.deposit,
            }),
            Report("negotiation_agreed", {
                "role": self.ROLE, "negotiation_id": self.negotiation_id, "round": self.round,
                "agreement_id": agreement_id, "deposit": terms.deposit,
            }),
        ]

    TRANSITIONS = {
        # (state, message type) -> handler. Anything else: FAILED, INVALID_MESSAGE.
        (State.PROPOSED, CounterProposal): _on_counter,
        (State.PROPOSED, Accept): _on_accept,
        (State.PROPOSED, NegotiationReject): _Negotiation._on_reject,
        (State.AGREED, NegotiationReject): _Negotiation._on_reject,
    }


# --------------------------------------------------------------------------------------------
# Provider


class ProviderNegotiation(_Negotiation):
    """The provider's side of one negotiation, created when a renter opens a negotiation stream.

    It accepts a proposal that names its current offer, asks for at most the free GPUs, a
    duration within the offer's range and a price of at least `min_price_per_gpu_second` (its
    floor, which may be below the offer's advertised price). Otherwise it counters with the
    nearest terms it would accept while rounds remain, and rejects in the last round."""

    ROLE = "provider"

    def __init__(
        self,
        offer: Offer,
        offer_digest: bytes,
        provider: PeerKey,
        wallet_private_key: bytes,
        free_gpus: Sequence[bytes],
        min_price_per_gpu_second: int,
        params: Params,
        *,
        open_hold_ms: int = DEFAULT_OPEN_HOLD_MS,
        verifier: Verifier = VERIFIER,
    ) -> None:
        super().__init__(provider, params, verifier)
        if open_hold_ms < 1:
            raise LocalProtocolError("bad_argument", "open_hold_ms must be positive")
        if provider.public != offer.provider:
            raise LocalProtocolError("bad_argument", "the offer is not this provider's")
        if private_key_address(wallet_private_key) != offer.binding.wallet:
            raise LocalProtocolError("bad_argument", "wallet key is not the offer's bound wallet")
        if len(offer_digest) != 32:
            raise LocalProtocolError("bad_argument", "offer_digest is 32 bytes")
        if min_price_per_gpu_second < 1:
            raise LocalProtocolError("bad_argument", "min_price_per_gpu_second must be positive")
        if not 1 <= params.negotiation_max_rounds <= UINT8_MAX:
            raise LocalProtocolError("bad_argument", "negotiation_max_rounds must be in 1..255")
        self.offer = offer
        self.offer_digest = offer_digest
        self.min_price = min_price_per_gpu_second
        self.open_hold_ms = open_hold_ms  # the accepted terms' open_by is now + this
        self._wallet_key = wallet_private_key
        self.free_gpus: tuple[bytes, ...] = ()
        self.set_free_gpus(free_gpus)
        self.proposal: Proposal | None = None  # the latest proposal received and checked
        self.accept: Accept | None = None

    def set_free_gpus(self, free_gpus: Sequence[bytes]) -> None:
        """Update the GPUs this negotiation may assign (another negotiation took some)."""
        if self.state in TERMINAL:
            raise LocalProtocolError("wrong_state", f"capacity change in state {self.state.name}")
        offered = [g.uuid_digest for g in self.offer.gpus]
        free = tuple(free_gpus)
        if len(set(free)) != len(free) or not set(free) <= set(offered):
            raise LocalProtocolError("bad_argument", "free_gpus must be distinct GPUs of the offer")
        self.free_gpus = free

    # -- transitions -------------------------------------------------------------------------

    def _on_first_proposal(self, msg: Proposal, now_ms: int) -> list[Effect]:
        # Learnt before any check, so that a reject for a bad first proposal can be addressed.
        self.negotiation_id = msg.negotiation_id
        self._peer = msg.renter
        self.round = msg.round
        self._check_envelope(msg, now_ms, (1,))
        if msg.provider != self._key.public:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "proposal is for another provider")
        binding = msg.renter_binding
        if binding.chain_id != self.offer.terms.chain_id:
            raise NegotiationViolation(Reason.WRONG_CHAIN,
                                       f"renter binding is for chain {binding.chain_id}")
        if binding.peer_key != msg.renter:
            raise NegotiationViolation(Reason.BAD_BINDING, "renter binding names another peer key")
        try:
            binding.verify(self.verifier)
        except Reject as exc:
            raise NegotiationViolation(Reason.BAD_BINDING, str(exc)) from None
        if binding.wallet == self.offer.binding.wallet:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "renter wallet is the provider's")
        if binding.wallet == self.offer.terms.arbiter:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "renter wallet is the offer's arbiter")
        return self._decide(msg, now_ms)

    def _on_next_proposal(self, msg: Proposal, now_ms: int) -> list[Effect]:
        self._check_envelope(msg, now_ms, (self.round + 1,))
        first = self.proposal
        assert first is not None
        if (msg.provider, msg.renter, msg.renter_binding, msg.access_key, msg.notice_s, msg.image) != \
                (first.provider, first.renter, first.renter_binding, first.access_key, first.notice_s,
                 first.image):
            raise NegotiationViolation(Reason.INVALID_MESSAGE,
                                       "provider, renter, binding, access key, class or image changed")
        return self._decide(msg, now_ms)

    def _decide(self, msg: Proposal, now_ms: int) -> list[Effect]:
        # The round is 1 or one more than the round we countered, and we counter only while
        # round < negotiation_max_rounds: a proposal can never be beyond the last round here.
        self.round = msg.round
        if msg.gpu_count == 0 or msg.duration_s == 0 or msg.price_per_gpu_second == 0:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "zero GPUs, duration or price")
        if msg.price_per_gpu_second * msg.gpu_count * msg.duration_s > UINT256_MAX:
            raise NegotiationViolation(Reason.INVALID_MESSAGE, "deposit overflows uint256")
        self.proposal = msg
        # [decline] the renter saw another offer than the current one (gossip lag): no penalty
        if msg.offer_digest != self.offer_digest:
            return self._fail(now_ms, Reason.OFFER_STALE, Fault.LOCAL,
                              "proposal names an offer that is not the current one")
        # [decline] an image the offer does not list: a term the provider does not sell, no penalty
        if msg.image and msg.image not in self.offer.images:
            offered = ", ".join(self.offer.images) or "none"
            return self._fail(now_ms, Reason.IMAGE_NOT_OFFERED, Fault.LOCAL,
                              f"image {msg.image} is not offered (offered: {offered})")
        t = self.offer.terms
        # [violation] an interruptible proposal names one of the offer's sets by its notice
        if msg.notice_s and self.offer.interruptible_set(msg.notice_s) is None:
            raise NegotiationViolation(Reason.INVALID_MESSAGE,
                                       f"the offer has no interruptible set with notice {msg.notice_s} s")
        free = len(self._class_free(msg.notice_s))
        if free == 0:
            return self._fail(now_ms, Reason.NO_CAPACITY, Fault.LOCAL, "no free GPUs")
        want = (
            min(msg.gpu_count, free),
            min(max(msg.duration_s, t.min_duration_s), t.max_duration_s),
            max(msg.price_per_gpu_second, self._floor(msg.notice_s)),
        )
        if want == (msg.gpu_count, msg.duration_s, msg.price_per_gpu_second):
            return self._accept(msg, now_ms)
        if msg.round < self.params.negotiation_max_rounds:
            counter = CounterProposal(
                negotiation_id=self.negotiation_id, round=msg.round, gpu_count=want[0],
                duration_s=want[1], price_per_gpu_second=want[2], sent_ms=now_ms,
            ).sign(self._key)
            self.state = State.COUNTERED
            self._deadline = now_ms + self.params.negotiation_step_timeout_ms
            return [Send(msg.renter, counter)]
        # No round left: say which term could not be met, first failing check first.
        if msg.gpu_count > free:
            return self._fail(now_ms, Reason.NO_CAPACITY, Fault.LOCAL,
                              f"{free} GPUs free, no round left")
        if want[1] != msg.duration_s:
            return self._fail(now_ms, Reason.BAD_DURATION, Fault.LOCAL,
                              f"duration outside {t.min_duration_s}..{t.max_duration_s} s, "
                              "no round left")
        return self._fail(now_ms, Reason.PRICE_TOO_LOW, Fault.LOCAL,
                          f"price below {self._floor(msg.notice_s)}, no round left")

    def _class_free(self, notice_s: int) -> tuple[bytes, ...]:
        """The free GPUs of a class: on-demand ones (notice 0) or the interruptible set's."""
        allowed = set(self.offer.class_gpus(notice_s))
        return tuple(g for g in self.free_gpus if g in allowed)

    def _floor(self, notice_s: int) -> int:
        """The least price per GPU-second accepted: `min_price` on demand; an interruptible
        set's own advertised price (or `min_price` if that is lower)."""
        if notice_s == 0:
            return self.min_price
        return min(self.min_price, self.offer.class_price(notice_s))

    def _accept(self, msg: Proposal, now_ms: int) -> list[Effect]:
        gpus = self._class_free(msg.notice_s)[: msg.gpu_count]
        # Everything the renter controls was checked above (counts, overflow, its wallet), so a
        # LocalProtocolError here would be this provider's own bug (e.g. its offer) and propagates.
        open_by = open_by_for(now_ms, self.open_hold_ms)
        terms, details = build_agreement(self.offer, self.offer_digest, msg, gpus, open_by)
        agreement_id = terms.agreement_id()
        consent = sign_consent(self._wallet_key, escrow_domain(self.offer), terms)
        accept = Accept(
            negotiation_id=self.negotiation_id, round=msg.round, agreement_id=agreement_id,
            gpus=tuple(gpus), consent_sig=consent, open_by=open_by, sent_ms=now_ms,
        ).sign(self._key)
        self.state = State.AGREED
        self._deadline = None
        self.terms, self.details, self.consent_sig, self.accept = terms, details, consent, accept
        return [
            # Durable before the consent leaves: the renter can open the escrow with it.
            Persist("proposal", agreement_id, msg),
            Persist("accept", agreement_id, accept),
            Send(msg.renter, accept),
            Report("negotiation_agreed", {
                "role": self.ROLE, "negotiation_id": self.negotiation_id, "round": msg.round,
                "agreement_id": agreement_id, "gpus": tuple(gpus),
            }),
        ]

    def withhold(self, now_ms: int, reason: Reason, detail: str) -> list[Effect]:
        """The driver does not send the Accept after all (the renter's wallet cannot fund the
        deposit, or the renter already holds its cap of unopened agreements): end FAILED with
        `reason`, fault local, and tell the renter with a NegotiationReject. Only in AGREED, and
        only while the Accept has not left: once it has, the consent cannot be taken back."""
        if self.state is not State.AGREED:
            raise LocalProtocolError("wrong_state", f"withhold in state {self.state.name}")
        if reason not in WITHHOLD_REASONS:
            raise LocalProtocolError("bad_argument", f"{reason.name} is not a reason to withhold")
        return self._fail(now_ms, reason, Fault.LOCAL, detail, tell=True)

    TRANSITIONS = {
        # (state, message type) -> handler. Anything else: FAILED, INVALID_MESSAGE.
        (State.IDLE, Proposal): _on_first_proposal,
        (State.COUNTERED, Proposal): _on_next_proposal,
        (State.COUNTERED, NegotiationReject): _Negotiation._on_reject,
        (State.AGREED, NegotiationReject): _Negotiation._on_reject,
    }


# Why a provider may withhold an Accept its machine reached (the checks the node makes between
# the machine's decision and sending the consent: specs/node.md, "Negotiation stream").
WITHHOLD_REASONS = frozenset({Reason.INSUFFICIENT_FUNDS, Reason.TOO_MANY_PENDING,
                              Reason.PROVIDER_BUSY})

RENTER_TRANSITIONS = RenterNegotiation.TRANSITIONS
PROVIDER_TRANSITIONS = ProviderNegotiation.TRANSITIONS


# --------------------------------------------------------------------------------------------
# A renter negotiating with several providers at once


class FirstAgreementWins:
    """Several renter negotiations at once (one per provider); the first to reach AGREED wins.

    When one agrees, every other negotiation not yet FAILED is cancelled at once
    (NegotiationReject CANCELLED, so each provider frees its GPUs instead of waiting for a
    timeout). No other negotiation can reach AGREED after that: an Accept already on its way
    meets a FAILED machine and only yields a `negotiation_message_after_end` report, so only the
    winner's EscrowCall open is ever emitted."""

    def __init__(self, negotiations: Iterable[RenterNegotiation]) -> None:
        self.negotiations: dict[bytes, RenterNegotiation] = {}
        for n in negotiations:
            if n.negotiation_id in self.negotiations:
                raise LocalProtocolError("bad_argument", "two negotiations share an id")
            self.negotiations[n.negotiation_id] = n
        if not self.negotiations:
            raise LocalProtocolError("bad_argument", "no negotiations")
        self.winner: RenterNegotiation | None = None

    def start(self, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        for n in self.negotiations.values():
            effects += n.start(now_ms)
        return effects

    def handle(self, negotiation_id: bytes, message: Message, now_ms: int) -> list[Effect]:
        n = self._get(negotiation_id)
        return self._settle(n, n.handle(message, now_ms), now_ms)

    def receive_data(self, negotiation_id: bytes, data: bytes, now_ms: int) -> list[Effect]:
        n = self._get(negotiation_id)
        return self._settle(n, n.receive_data(data, now_ms), now_ms)

    def on_timer(self, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        for n in self.negotiations.values():
            effects += n.on_timer(now_ms)
        return effects

    def next_deadline(self) -> int | None:
        deadlines = [d for n in self.negotiations.values() if (d := n.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    @property
    def done(self) -> bool:
        return all(n.state in TERMINAL for n in self.negotiations.values())

    def _get(self, negotiation_id: bytes) -> RenterNegotiation:
        n = self.negotiations.get(negotiation_id)
        if n is None:
            raise LocalProtocolError("unknown_negotiation", "no such negotiation in this group")
        return n

    def _settle(self, n: RenterNegotiation, effects: list[Effect], now_ms: int) -> list[Effect]:
        if n.state is not State.AGREED or self.winner is not None:
            return effects
        self.winner = n
        cancels: list[Effect] = []
        for other in self.negotiations.values():
            if other is not n and other.state is not State.FAILED:
                cancels += other.cancel(now_ms, "renter took another provider's agreement")
        # The cancels first: effects are carried out in order, and the winner's escrow open
        # may take blocks while the other providers would hold GPUs for nothing.
        return cancels + effects
