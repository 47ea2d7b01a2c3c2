"""Local provider reputation: what this node's own finished agreements say about a provider.

No gossip, no global score: only agreements this node was party to, each with the verdict of
its evidence (protocol/evidence.py) and the chain's end time. Pure and deterministic: the same
outcomes, in any order, give the same score. The formula is in specs/reputation.md.

score = alpha / (alpha + beta), a Beta posterior mean over "hours delivered" vs "hours paid for
but not delivered":

    w_i   = min(paid_hours_i, MAX_WEIGHT_HOURS)          weight of agreement i
    f_i   = min(1, acked_seconds_i / paid_seconds_i)     fraction of paid-for time delivered
            (0 when the evidence shows a preemption fault: notice promise broken)
    alpha = PRIOR_HOURS + sum(w_i * f_i)
    beta  = PRIOR_HOURS + sum(w_i * (1 - f_i))

An unknown provider scores exactly 0.5. `lower` = max(0, score - 2 * sd) ranks cautiously:
a provider with one short perfect rental does not outrank one with a hundred good hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .errors import LocalProtocolError

PRIOR_HOURS = 1.0  # pseudo-hours on each side of the prior: unknown provider = 0.5
MAX_WEIGHT_HOURS = 24.0  # one long agreement counts at most this much
FAILURE_FRACTION = 0.9  # delivered less than this of the paid-for time: a failed agreement
HISTORY_LEN = 20
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True, slots=True)
class AgreementOutcome:
    """One finished agreement as this node saw it.

    paid_seconds: from the start to the end the chain recorded (max_seconds, or less after a
    close): the time the renter kept paying for. acked_seconds: the verdict's (what the renter's
    receipts acknowledge). disputed: either side disputed the claim."""

    agreement_id: bytes
    provider_key: bytes
    ended_s: int
    paid_seconds: int
    acked_seconds: int
    disputed: bool = False
    # Provable preemption faults in the verdict (evidence.NOTICE_* codes): the provider broke
    # its notice promise, so the agreement counts as failed whatever was delivered.
    notice_faults: int = 0

    def __post_init__(self) -> None:
        if self.paid_seconds < 0 or self.acked_seconds < 0:
            raise LocalProtocolError("bad_argument", "seconds must be non-negative")

    @classmethod
    def from_verdict(cls, verdict, provider_key: bytes, started_s: int, ended_s: int,
                     disputed: bool = False) -> "AgreementOutcome":
        return cls(verdict.agreement_id, provider_key, ended_s, max(0, ended_s - started_s),
                   verdict.acked_seconds, disputed, len(verdict.notice_faults))

    @property
    def delivered_fraction(self) -> float:
        if self.notice_faults:
            return 0.0
        if self.paid_seconds == 0:
            return 1.0
        return min(1.0, self.acked_seconds / self.paid_seconds)


@dataclass(frozen=True, slots=True)
class ProviderScore:
    provider_key: bytes
    score: float  # posterior mean, 0.5 for an unknown provider
    lower: float  # score - 2 sd, floored at 0: for ranking
    agreements: int
    failures: int  # delivered_fraction < FAILURE_FRACTION
    disputes: int
    paid_hours: float
    delivered_hours: float
    history: tuple[float, ...]  # delivered fractions of the last HISTORY_LEN agreements, oldest first
    notice_faults: int = 0  # agreements with a provable preemption fault

    @property
    def sparkline(self) -> str:
        """The history as one character per agreement, for a CLI table."""
        return "".join(_SPARK[min(len(_SPARK) - 1, int(f * len(_SPARK)))] for f in self.history)

    def row(self) -> dict[str, str]:
        """Display strings for a CLI table."""
        return {
            "score": f"{self.score:.2f}",
            "lower": f"{self.lower:.2f}",
            "agreements": str(self.agreements),
            "failures": str(self.failures),
            "disputes": str(self.disputes),
            "hours": f"{self.delivered_hours:.1f}/{self.paid_hours:.1f}",
            "history": self.sparkline,
        }


def score_provider(provider_key: bytes, outcomes: Iterable[AgreementOutcome]) -> ProviderScore:
    """Score one provider from the outcomes of its agreements (others are skipped)."""
    mine = sorted((o for o in outcomes if o.provider_key == provider_key),
                  key=lambda o: (o.ended_s, o.agreement_id))
    alpha = beta = PRIOR_HOURS
    paid_h = delivered_h = 0.0
    for o in mine:
        hours = o.paid_seconds / 3600
        f = o.delivered_fraction
        w = min(hours, MAX_WEIGHT_HOURS)
        alpha += w * f
        beta += w * (1 - f)
        paid_h += hours
        delivered_h += min(o.acked_seconds, o.paid_seconds) / 3600
    n = alpha + beta
    score = alpha / n
    sd = math.sqrt(alpha * beta / (n * n * (n + 1)))
    return ProviderScore(
        provider_key=provider_key,
        score=score,
        lower=max(0.0, score - 2 * sd),
        agreements=len(mine),
        failures=sum(1 for o in mine if o.delivered_fraction < FAILURE_FRACTION),
        disputes=sum(1 for o in mine if o.disputed),
        paid_hours=paid_h,
        delivered_hours=delivered_h,
        history=tuple(o.delivered_fraction for o in mine[-HISTORY_LEN:]),
        notice_faults=sum(1 for o in mine if o.notice_faults),
    )


def score_all(outcomes: Iterable[AgreementOutcome]) -> list[ProviderScore]:
    """Every provider in `outcomes`, best first (by `lower`, then score, then key)."""
    outcomes = list(outcomes)
    keys = sorted({o.provider_key for o in outcomes})
    scores = [score_provider(k, outcomes) for k in keys]
    return sorted(scores, key=lambda s: (-s.lower, -s.score, s.provider_key))
