"""An agreement's lifecycle as this node records it (the `agreements` table's `state`).

The states are node bookkeeping, not protocol: the negotiation and rental machines have their
own. Every change goes through `check_transition`, which refuses a change the table below does
not list (a bug: e.g. reopening an expired agreement). Re-setting the current state is allowed
(a restart repeats what it finds). `settled` may follow any state: the chain is the authority
(a Claimed, Recovered, Finalized or Arbitrated event ends the agreement whatever we thought).

    provider: accepted -> open -> stopped -> settled         (or accepted -> expired;
    renter:   agreed   -> open -> settled                     open -> aborted: access hook failed;
                                                              agreed -> open_failed)
"""

from __future__ import annotations

import enum


class AgreementState(enum.StrEnum):
    ACCEPTED = "accepted"  # provider: its Accept is persisted (and sent); the escrow not open yet
    AGREED = "agreed"  # renter: the provider's consent is persisted; its open not yet mined
    OPEN = "open"  # the escrow is open: the rental runs (or is being resumed)
    STOPPED = "stopped"  # provider: served its last; left to claim
    ABORTED = "aborted"  # provider: the access hook failed; served and claims nothing
    SETTLED = "settled"  # the escrow paid out (claimed, recovered, finalized, arbitrated)
    EXPIRED = "expired"  # never opened: the consent's open_by passed, or the renter cancelled
    OPEN_FAILED = "open_failed"  # renter: its open transaction was refused


S = AgreementState
CREATED = frozenset({S.ACCEPTED, S.AGREED})  # the first state of a new row
UNSETTLED = (S.ACCEPTED, S.AGREED, S.OPEN, S.STOPPED)  # what a restart looks at

TRANSITIONS: dict[AgreementState, frozenset[AgreementState]] = {
    S.ACCEPTED: frozenset({S.OPEN, S.EXPIRED, S.STOPPED, S.ABORTED}),
    S.AGREED: frozenset({S.OPEN, S.OPEN_FAILED, S.EXPIRED}),
    # open -> expired: a restart finds no escrow for it (the chain is the authority)
    S.OPEN: frozenset({S.STOPPED, S.ABORTED, S.EXPIRED}),
    S.STOPPED: frozenset({S.EXPIRED}),
    S.ABORTED: frozenset(),
    S.SETTLED: frozenset(),
    S.EXPIRED: frozenset(),
    S.OPEN_FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the lifecycle does not allow (a bug in the node)."""


def check_transition(old: str | None, new: AgreementState) -> AgreementState:
    """`new` if `old` (None: no row yet) may be followed by it; else IllegalTransition."""
    new = AgreementState(new)
    if old is None:
        if new not in CREATED:
            raise IllegalTransition(f"a new agreement starts accepted or agreed, not {new}")
        return new
    old = AgreementState(old)
    if new is old or new is S.SETTLED or new in TRANSITIONS[old]:
        return new
    raise IllegalTransition(f"agreement state {old} cannot become {new}")
