"""Settlement math: who gets what out of the escrow, on every path to the end of an agreement.

Pure functions of the terms, shared by the node (to predict a payout before calling the
contract), the evidence verifier (the payout a verdict implies) and the simulator (which has no
chain). They mirror node/contracts/Escrow.vy exactly; specs/settlement.md is the prose twin.

Times here are the contract's: unix **seconds** of block time (`*_s`). Amounts are integers in
the token's smallest unit; nothing is ever rounded, because every amount is a product of
`price_per_second` and a whole number of seconds.

Paths to the end of an agreement (deposit D = price_per_second * max_seconds):

| path                          | provider gets            | renter gets       |
|-------------------------------|--------------------------|-------------------|
| claim(acked), no arbiter      | price * acked            | D - price * acked |
| claim(acked), undisputed      | price * acked (finalize) | D - price * acked |
| claim(acked), disputed, ruled | provider_amount          | D - provider_amount |
| claim, disputed, no ruling    | price * acked (finalize after ARBITRATION_TIMEOUT_S) | rest |
| recover (no claim in time)    | 0                        | D                 |

Whatever the path, provider + renter == D: nothing leaves that was not deposited.
"""

from __future__ import annotations

from dataclasses import dataclass

from .agreement import (
    ESCROW_MAX_DISPUTE_WINDOW_S,
    ESCROW_MAX_GRACE_S,
    ESCROW_MIN_DISPUTE_WINDOW_S,
    ESCROW_MIN_GRACE_S,
    UINT64_MAX,
    AgreementTerms,
)
from .errors import LocalProtocolError

# The arbiter has this long after a dispute to rule; afterwards anyone may finalize at the
# claimed amounts (Escrow.vy ARBITRATION_TIMEOUT).
ARBITRATION_TIMEOUT_S = 14 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Payout:
    """What one settlement pays to each side, in the token's smallest unit."""

    provider: int
    renter: int

    @property
    def total(self) -> int:
        return self.provider + self.renter

    def to_json(self) -> dict[str, str]:
        # Decimal strings: amounts of 18-decimal tokens exceed what a JSON number holds exactly.
        return {"provider": str(self.provider), "renter": str(self.renter)}


def _check_int(value: object, name: str) -> int:
    if type(value) is not int:
        raise LocalProtocolError("bad_argument", f"{name} must be an int, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Amounts


def deposit(terms: AgreementTerms) -> int:
    """What the renter locks at open: price_per_second * max_seconds."""
    return terms.price_per_second * terms.max_seconds


def check_acked(terms: AgreementTerms, acked_seconds: int) -> int:
    """The contract's receipt bound: 0 <= acked_seconds <= max_seconds (it is a uint64)."""
    _check_int(acked_seconds, "acked_seconds")
    if acked_seconds < 0 or acked_seconds > UINT64_MAX:
        raise LocalProtocolError("acked_out_of_range", f"acked_seconds {acked_seconds} is not a uint64")
    if acked_seconds > terms.max_seconds:
        raise LocalProtocolError(
            "acked_exceeds_max",
            f"acked_seconds {acked_seconds} exceeds max_seconds {terms.max_seconds}",
        )
    return acked_seconds


def claim_payout(terms: AgreementTerms, acked_seconds: int) -> Payout:
    """A claim on a receipt for `acked_seconds` (and the finalize of an undisputed or unruled
    claim): the provider gets price * acked, the renter the rest of the deposit."""
    check_acked(terms, acked_seconds)
    provider = terms.price_per_second * acked_seconds
    return Payout(provider=provider, renter=deposit(terms) - provider)


def recover_payout(terms: AgreementTerms) -> Payout:
    """No claim before end + grace: the whole deposit goes back to the renter."""
    return Payout(provider=0, renter=deposit(terms))


def arbitration_payout(terms: AgreementTerms, provider_amount: int) -> Payout:
    """The arbiter's split of a disputed claim: provider_amount <= deposit, the renter gets the
    rest. Only agreements with an arbiter can be arbitrated."""
    _check_int(provider_amount, "provider_amount")
    if not terms.has_arbiter:
        raise LocalProtocolError("no_arbiter", "the terms name no arbiter")
    if not 0 <= provider_amount <= deposit(terms):
        raise LocalProtocolError(
            "provider_amount_exceeds_deposit",
            f"provider_amount {provider_amount} is outside 0..{deposit(terms)}",
        )
    return Payout(provider=provider_amount, renter=deposit(terms) - provider_amount)


# ---------------------------------------------------------------------------------------------
# Deadlines (block time, seconds). "until X" means allowed while now_s <= X; "after X" means
# allowed once now_s > X, exactly as the contract compares.


def end_s(terms: AgreementTerms, started_s: int) -> int:
    """The end of an agreement opened at block time `started_s`."""
    return _check_int(started_s, "started_s") + terms.max_seconds


def end_after_close_s(current_end_s: int, now_s: int) -> int:
    """A renter's close at `now_s` moves the end to now. The contract refuses a close at or
    after the current end ("agreement already ended"), and so does this."""
    _check_int(current_end_s, "current_end_s")
    _check_int(now_s, "now_s")
    if now_s >= current_end_s:
        raise LocalProtocolError("already_ended", f"close at {now_s} is not before the end {current_end_s}")
    return now_s


def claim_deadline_s(terms: AgreementTerms, end_s_: int) -> int:
    """The provider may claim until end + grace (inclusive), whether the end is the original
    one or the one a close set."""
    return _check_int(end_s_, "end_s") + terms.grace


def recover_allowed(terms: AgreementTerms, end_s_: int, now_s: int) -> bool:
    """Recover is allowed once now_s > end + grace (and nobody claimed)."""
    return now_s > claim_deadline_s(terms, end_s_)


def claim_allowed(terms: AgreementTerms, end_s_: int, now_s: int) -> bool:
    return now_s <= claim_deadline_s(terms, end_s_)


def dispute_deadline_s(terms: AgreementTerms, claimed_s: int) -> int:
    """Either party may dispute a claim until claimed_s + dispute_window (inclusive)."""
    if not terms.has_arbiter:
        raise LocalProtocolError("no_arbiter", "without an arbiter a claim settles at once")
    return _check_int(claimed_s, "claimed_s") + terms.dispute_window


def finalize_after_s(terms: AgreementTerms, since_s: int, disputed: bool) -> int:
    """finalize is allowed once now_s > this: the dispute window after an undisputed claim, or
    ARBITRATION_TIMEOUT_S after a dispute the arbiter left unanswered."""
    _check_int(since_s, "since_s")
    return since_s + (ARBITRATION_TIMEOUT_S if disputed else terms.dispute_window)


# ---------------------------------------------------------------------------------------------
# A model of one agreement's escrow slot, for the simulator and for tests: the same states and
# rules as Escrow.vy, signatures left out (the caller verifies receipts before calling claim).

OPEN, CLOSED, CLAIMED, DISPUTED, FINAL = "open", "closed", "claimed", "disputed", "final"


class EscrowModel:
    """One agreement in the escrow contract. Each method returns the Payout it makes (or None)
    and raises LocalProtocolError with the contract's reason where the contract would revert."""

    @classmethod
    def open(cls, terms: AgreementTerms, now_s: int) -> "EscrowModel":
        """The contract's `open` checks that AgreementTerms does not make itself (the consent's
        deadline and the bounds on grace and the dispute window), then the open agreement."""
        if now_s > terms.open_by:
            raise LocalProtocolError("consent_expired", f"open at {now_s} after open_by {terms.open_by}")
        if not ESCROW_MIN_GRACE_S <= terms.grace <= ESCROW_MAX_GRACE_S:
            raise LocalProtocolError("grace_out_of_bounds", f"grace {terms.grace} s")
        if terms.has_arbiter and not (ESCROW_MIN_DISPUTE_WINDOW_S <= terms.dispute_window
                                      <= ESCROW_MAX_DISPUTE_WINDOW_S):
            raise LocalProtocolError("dispute_window_out_of_bounds",
                                     f"dispute window {terms.dispute_window} s")
        return cls(terms, now_s)

    def __init__(self, terms: AgreementTerms, started_s: int) -> None:
        self.terms = terms
        self.state = OPEN
        self.end_s = end_s(terms, started_s)
        self.acked_seconds: int | None = None
        self.since_s: int | None = None
        self.paid = Payout(0, 0)

    def _require(self, ok: bool, code: str, detail: str) -> None:
        if not ok:
            raise LocalProtocolError(code, detail)

    def _settle(self, payout: Payout) -> Payout:
        self.state = FINAL
        self.paid = payout
        return payout

    def close(self, now_s: int) -> None:
        self._require(self.state == OPEN, "not_open", f"close in state {self.state}")
        self.end_s = end_after_close_s(self.end_s, now_s)
        self.state = CLOSED

    def claim(self, acked_seconds: int, now_s: int) -> Payout | None:
        self._require(self.state in (OPEN, CLOSED), "not_open", f"claim in state {self.state}")
        self._require(claim_allowed(self.terms, self.end_s, now_s), "claim_period_over",
                      f"claim at {now_s} after {claim_deadline_s(self.terms, self.end_s)}")
        payout = claim_payout(self.terms, acked_seconds)
        if not self.terms.has_arbiter:
            return self._settle(payout)
        self.state, self.acked_seconds, self.since_s = CLAIMED, acked_seconds, now_s
        return None

    def dispute(self, now_s: int) -> None:
        self._require(self.state == CLAIMED, "not_claimed", f"dispute in state {self.state}")
        assert self.since_s is not None
        self._require(now_s <= dispute_deadline_s(self.terms, self.since_s), "dispute_window_over",
                      f"dispute at {now_s} after the window")
        self.state, self.since_s = DISPUTED, now_s

    def arbitrate(self, provider_amount: int, now_s: int) -> Payout:
        self._require(self.state == DISPUTED, "not_disputed", f"arbitrate in state {self.state}")
        assert self.since_s is not None
        self._require(now_s <= self.since_s + ARBITRATION_TIMEOUT_S, "arbitration_period_over",
                      f"arbitrate at {now_s} after the arbitration timeout")
        return self._settle(arbitration_payout(self.terms, provider_amount))

    def finalize(self, now_s: int) -> Payout:
        self._require(self.state in (CLAIMED, DISPUTED), "not_claimed",
                      f"finalize in state {self.state}")
        assert self.since_s is not None and self.acked_seconds is not None
        after = finalize_after_s(self.terms, self.since_s, self.state == DISPUTED)
        self._require(now_s > after, "too_early", f"finalize at {now_s}, allowed after {after}")
        return self._settle(claim_payout(self.terms, self.acked_seconds))

    def recover(self, now_s: int) -> Payout:
        self._require(self.state in (OPEN, CLOSED), "not_open", f"recover in state {self.state}")
        self._require(recover_allowed(self.terms, self.end_s, now_s), "claim_period_not_over",
                      f"recover at {now_s}, allowed after {claim_deadline_s(self.terms, self.end_s)}")
        return self._settle(recover_payout(self.terms))
