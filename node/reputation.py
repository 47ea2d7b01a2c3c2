"""Local reputation: this node's own verdicts on the providers it rented from.

When a rental of ours settles, the renter recomputes the verdict from its own evidence (the
stored heartbeats and receipts, protocol/evidence.py), turns it into an `AgreementOutcome` and
stores it; `score_of` feeds the offer book, so searches can sort and filter by score. Nothing
here is gossiped: a score is this node's experience, not a claim anyone else can forge.
"""

from __future__ import annotations

import logging
import time

from protocol.encoding import pack, unpack_canonical
from protocol.evidence import build_bundle, verify_bundle
from protocol.offerbook import UNKNOWN_SCORE
from protocol.reputation import AgreementOutcome, ProviderScore, score_all, score_provider

from .store import Store

log = logging.getLogger(__name__)

OUTCOME_KIND = "outcome"


class LocalReputation:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.outcomes: list[AgreementOutcome] = []
        self._scores: dict[bytes, float] = {}

    async def load(self) -> None:
        """Read the stored outcomes (subject: the agreement id; the provider is inside)."""
        for raw in await self.store.evidence_of_kind(OUTCOME_KIND):
            aid, provider, ended, paid, acked, disputed = unpack_canonical(raw)
            self.outcomes.append(AgreementOutcome(aid, provider, ended, paid, acked, bool(disputed)))
        self._rescore()

    def score_of(self, provider_key: bytes) -> float:
        return self._scores.get(provider_key, UNKNOWN_SCORE)

    def score(self, provider_key: bytes) -> ProviderScore:
        return score_provider(provider_key, self.outcomes)

    def table(self) -> list[ProviderScore]:
        return score_all(self.outcomes)

    async def record(self, rental, ended_s: int) -> AgreementOutcome:
        """A rental of ours (as renter) settled: judge it from our own evidence."""
        heartbeats = [row.raw for row in await self.store.heartbeats(rental.agreement_id)]
        receipts = [row.raw for row in await self.store.receipts(rental.agreement_id)]
        bundle = build_bundle(rental.terms, rental.details, rental.provider_binding,
                              rental.renter_binding, rental.started_s or 0, heartbeats, receipts)
        verdict = verify_bundle(bundle)
        outcome = AgreementOutcome.from_verdict(verdict, rental.details.provider_key,
                                                rental.started_s or ended_s, ended_s)
        self.outcomes.append(outcome)
        await self.store.add_evidence(rental.agreement_id, OUTCOME_KIND, pack([
            outcome.agreement_id, outcome.provider_key, outcome.ended_s, outcome.paid_seconds,
            outcome.acked_seconds, int(outcome.disputed)]), time.time())
        self._rescore()
        log.info("provider %s scored %.3f after agreement %s (%d of %d s delivered)",
                 outcome.provider_key.hex()[:12], self.score_of(outcome.provider_key),
                 outcome.agreement_id.hex()[:12], outcome.acked_seconds, outcome.paid_seconds)
        return outcome

    def _rescore(self) -> None:
        self._scores = {s.provider_key: s.score for s in score_all(self.outcomes)}
