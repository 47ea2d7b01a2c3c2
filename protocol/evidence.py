"""Evidence bundles: everything about one agreement, re-checkable offline by anyone.

`build_bundle` packs the terms, details, both wallet bindings, the start time and the exact wire
bytes of heartbeats and receipts (from either side's store, or both merged). `verify_bundle`
recomputes a `Verdict` from the bundle alone: no clock, no chain, no trust in whoever built it.
specs/evidence.md lists the steps in the same order and the verdict's fields.

The verdict is deterministic (same bundle bytes, same verdict, same JSON) and never raises on a
bad item: each bad item is listed in `invalid` with a stable code and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .agreement import AgreementTerms, EscrowDomain, recover_receipt_signer
from .encoding import decode
from .errors import LocalProtocolError, ProtocolError
from .messages import (AgreementDetails, Binding, EvidenceBundle, Heartbeat, PreemptionNotice,
                       TermsWire, UsageReceipt, digest)
from .params import DEFAULT_PARAMS, SECOND_MS, Params
from .settlement import Payout, claim_payout, deposit

ZERO_HASH = b"\x00" * 32


def build_bundle(
    terms: AgreementTerms,
    details: AgreementDetails,
    provider_binding: Binding,
    renter_binding: Binding,
    started_s: int,
    heartbeats_bytes: Iterable[bytes],
    receipts_bytes: Iterable[bytes],
    notices_bytes: Iterable[bytes] = (),
) -> EvidenceBundle:
    """Pack the records. Duplicated byte strings (the same heartbeat stored by both sides) are
    kept once; the order is canonical (sorted bytes), so two nodes that hold the same records
    build the same bundle byte for byte."""
    heartbeats_bytes, receipts_bytes, notices_bytes = (
        list(heartbeats_bytes), list(receipts_bytes), list(notices_bytes))
    for name, items in (("heartbeats", heartbeats_bytes), ("receipts", receipts_bytes),
                        ("notices", notices_bytes)):
        if not all(type(b) is bytes for b in items):
            raise LocalProtocolError("bad_argument", f"{name} must be wire bytes")
    return EvidenceBundle(
        terms=TermsWire.from_terms(terms),
        details=details,
        provider_binding=provider_binding,
        renter_binding=renter_binding,
        started_s=started_s,
        heartbeats=tuple(sorted(set(heartbeats_bytes))),
        receipts=tuple(sorted(set(receipts_bytes))),
        notices=tuple(sorted(set(notices_bytes))),
    )


@dataclass(frozen=True, slots=True)
class Invalid:
    """One bundle item that failed a check. `kind`: terms, binding, heartbeat, receipt;
    `index`: position in the bundle's list (-1 for terms); `code`: stable reason."""

    kind: str
    index: int
    code: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    """Two consecutive valid heartbeats further apart (by the provider's sent_ms) than
    interval + late tolerance: time the evidence does not cover."""

    after_seq: int
    before_seq: int
    from_ms: int
    to_ms: int

    @property
    def length_ms(self) -> int:
        return self.to_ms - self.from_ms


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first point where the two sides' records disagree. kind: `unanswered_heartbeat`
    (a valid heartbeat no valid receipt answers, while a later one is answered: the renter
    withheld or the answer was lost), `unknown_heartbeat` (a valid receipt answers a heartbeat
    that is not in the bundle, or not with that hash), `trailing_unanswered` (heartbeats after
    the last answered one: one side stopped)."""

    kind: str
    heartbeat_seq: int
    at_ms: int | None  # the heartbeat's sent_ms, or the receipt's sent_ms


# Provable faults of a provider around preemption (specs/evidence.md, step 7).
NOTICE_ON_DEMAND = "notice_on_demand"  # a preemption notice in an on-demand agreement
SHORT_NOTICE = "short_notice"  # stop_ms - sent_ms below the agreed notice_s
NOTICE_BACKDATED = "notice_backdated"  # sent_ms before the heartbeat the notice says it follows
STOPPED_EARLY = "stopped_early"  # heartbeats (answered) end before the notice's stop


@dataclass(frozen=True, slots=True)
class NoticeSeen:
    """The binding preemption notice of a bundle: the valid one with the earliest stop."""

    stop_ms: int
    sent_ms: int
    reason: int
    notice_s: int  # what the agreement promised (details.notice_s)


@dataclass(frozen=True, slots=True)
class Verdict:
    agreement_id: bytes
    terms_valid: bool  # terms decode and details_hash == keccak(details)
    acked_seconds: int  # highest valid receipt (0 when none)
    payout: Payout | None  # claim_payout(terms, acked_seconds); None when the terms are invalid
    heartbeats_valid: int
    receipts_valid: int
    first_heartbeat_ms: int | None
    last_heartbeat_ms: int | None
    evidenced_ms: int  # sum over consecutive valid heartbeats of min(gap, interval + tolerance)
    gaps: tuple[Gap, ...]
    unacknowledged: tuple[int, ...]  # seqs of valid heartbeats no valid receipt answers
    divergence: Divergence | None
    invalid: tuple[Invalid, ...] = field(default=())
    notice: NoticeSeen | None = None
    notice_faults: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "agreement_id": self.agreement_id.hex(),
            "terms_valid": self.terms_valid,
            "acked_seconds": self.acked_seconds,
            "payout": self.payout.to_json() if self.payout else None,
            "heartbeats_valid": self.heartbeats_valid,
            "receipts_valid": self.receipts_valid,
            "first_heartbeat_ms": self.first_heartbeat_ms,
            "last_heartbeat_ms": self.last_heartbeat_ms,
            "evidenced_ms": self.evidenced_ms,
            "gaps": [{"after_seq": g.after_seq, "before_seq": g.before_seq, "from_ms": g.from_ms,
                      "to_ms": g.to_ms, "length_ms": g.length_ms} for g in self.gaps],
            "unacknowledged": list(self.unacknowledged),
            "divergence": None if self.divergence is None else {
                "kind": self.divergence.kind, "heartbeat_seq": self.divergence.heartbeat_seq,
                "at_ms": self.divergence.at_ms},
            "invalid": [{"kind": i.kind, "index": i.index, "code": i.code, "detail": i.detail}
                        for i in self.invalid],
            "notice": None if self.notice is None else {
                "stop_ms": self.notice.stop_ms, "sent_ms": self.notice.sent_ms,
                "reason": self.notice.reason, "notice_s": self.notice.notice_s},
            "notice_faults": list(self.notice_faults),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":"))


def verify_bundle(bundle: EvidenceBundle, params: Params = DEFAULT_PARAMS) -> Verdict:
    """Recompute the verdict of `bundle`. Steps as in specs/evidence.md."""
    invalid: list[Invalid] = []
    details = bundle.details

    # 1. Terms: they must be valid agreement terms, and commit to these details.
    try:
        terms = bundle.terms.to_terms()
    except ProtocolError as err:
        return _terms_failed(bundle, Invalid("terms", -1, "bad_terms", err.detail))
    agreement_id = terms.agreement_id()
    if terms.details_hash != details.details_hash():
        return _terms_failed(bundle, Invalid("terms", -1, "details_hash_mismatch",
                                             "keccak(details) != terms.details_hash"), agreement_id)
    domain = EscrowDomain(details.chain_id, details.escrow)

    # 2. Bindings: each verifies and ties the details' peer key to the terms' wallet.
    for index, (binding, key, wallet) in enumerate((
        (bundle.provider_binding, details.provider_key, terms.provider),
        (bundle.renter_binding, details.renter_key, terms.renter),
    )):
        code = _binding_problem(binding, key, wallet, details.chain_id)
        if code:
            invalid.append(Invalid("binding", index, code[0], code[1]))

    # 3. Heartbeats: decode, agreement, provider signature, agreed GPUs; one per seq.
    agreed = tuple(sorted(details.gpus))
    candidates: dict[int, list[tuple[Heartbeat, bytes, int]]] = {}
    for index, data in enumerate(bundle.heartbeats):
        try:
            hb = decode(data, Heartbeat)
        except ProtocolError as err:
            invalid.append(Invalid("heartbeat", index, err.code, err.detail))
            continue
        assert isinstance(hb, Heartbeat)
        code = None
        if hb.agreement_id != agreement_id:
            code = ("wrong_agreement", "")
        elif not hb.signature_valid(details.provider_key, data):
            code = ("bad_signature", "not signed by details.provider_key")
        elif tuple(sorted(m.uuid_digest for m in hb.metrics)) != agreed:
            code = ("gpu_mismatch", "metrics do not list exactly the agreed GPUs")
        if code:
            invalid.append(Invalid("heartbeat", index, *code))
            continue
        candidates.setdefault(hb.seq, []).append((hb, digest(data), index))
    # Two different validly signed heartbeats for one seq: the provider equivocated. Keep the
    # one the next heartbeat links to (else the first in bundle order); list the others.
    by_seq: dict[int, tuple[Heartbeat, bytes, int]] = {}
    for seq in sorted(candidates):
        options = candidates[seq]
        linked = {c[0].prev_hash for c in candidates.get(seq + 1, ())}
        chosen = next((c for c in options if c[1] in linked), options[0])
        by_seq[seq] = chosen
        for other in options:
            if other is not chosen:
                invalid.append(Invalid("heartbeat", other[2], "equivocation", f"second heartbeat with seq {seq}"))
    # Chain: seq 0 starts from zeros; seq k links to seq k-1 when both are present. Times of
    # consecutive heartbeats must not go back. A broken link invalidates the later heartbeat.
    chain: list[tuple[Heartbeat, bytes]] = []
    for seq in sorted(by_seq):
        hb, h, index = by_seq[seq]
        prev = by_seq.get(seq - 1)
        code = None
        if seq == 0 and hb.prev_hash != ZERO_HASH:
            code = ("broken_chain", "heartbeat 0 must have a zero prev_hash")
        elif prev is not None and hb.prev_hash != prev[1]:
            code = ("broken_chain", f"heartbeat {seq} does not link to {seq - 1}")
        elif chain and hb.sent_ms < chain[-1][0].sent_ms:
            code = ("time_went_back", f"sent_ms goes back at seq {seq}")
        elif hb.sent_ms < bundle.started_s * SECOND_MS - params.clock_skew_ms:
            code = ("before_start", f"heartbeat {seq} sent before the agreement started")
        if code:
            invalid.append(Invalid("heartbeat", index, *code))
            continue
        chain.append((hb, h))
    valid_hb = {hb.seq: h for hb, h in chain}
    sent_ms = {hb.seq: hb.sent_ms for hb, _ in chain}

    # 4. Receipts: decode, agreement, renter ed25519, wallet EIP-712 signature, acked bound.
    receipts: list[tuple[UsageReceipt, int]] = []
    for index, data in enumerate(bundle.receipts):
        try:
            r = decode(data, UsageReceipt)
        except ProtocolError as err:
            invalid.append(Invalid("receipt", index, err.code, err.detail))
            continue
        assert isinstance(r, UsageReceipt)
        code = None
        if r.agreement_id != agreement_id:
            code = ("wrong_agreement", "")
        elif not r.signature_valid(details.renter_key, data):
            code = ("bad_signature", "not signed by details.renter_key")
        elif r.acked_seconds > terms.max_seconds:
            code = ("acked_exceeds_max", f"{r.acked_seconds} > {terms.max_seconds}")
        else:
            try:
                if recover_receipt_signer(domain, agreement_id, r.acked_seconds, r.wallet_sig) != terms.renter:
                    code = ("bad_wallet_signature", "does not recover terms.renter")
            except ProtocolError as err:
                code = ("bad_wallet_signature", err.detail)
        if code:
            invalid.append(Invalid("receipt", index, *code))
            continue
        receipts.append((r, index))
    # Monotonicity: ordered by the heartbeat they answer, acked never decreases. A receipt that
    # goes back is listed (the renter signed it) but still counts: the contract would pay it.
    receipts.sort(key=lambda x: (x[0].heartbeat_seq, x[0].acked_seconds, x[1]))
    best = 0
    for r, index in receipts:
        if r.acked_seconds < best:
            invalid.append(Invalid("receipt", index, "acked_decreased",
                                   f"{r.acked_seconds} after {best} (heartbeat {r.heartbeat_seq})"))
        best = max(best, r.acked_seconds)
    acked = best

    # 5. Coverage: gaps between consecutive valid heartbeats, and the time they evidence.
    cap_ms = terms.heartbeat_interval * SECOND_MS + params.heartbeat_late_tolerance_ms
    gaps: list[Gap] = []
    evidenced = 0
    for (a, _), (b, _) in zip(chain, chain[1:]):
        span = b.sent_ms - a.sent_ms
        evidenced += min(span, cap_ms)
        if span > cap_ms:
            gaps.append(Gap(a.seq, b.seq, a.sent_ms, b.sent_ms))

    # 6. Agreement between the two sides' records.
    answered: set[int] = set()
    unknown: list[UsageReceipt] = []
    for r, _ in receipts:
        if valid_hb.get(r.heartbeat_seq) == r.heartbeat_hash:
            answered.add(r.heartbeat_seq)
        else:
            unknown.append(r)
    unacked = tuple(seq for seq in sorted(valid_hb) if seq not in answered)
    last_answered = max(answered, default=-1)
    candidates: list[Divergence] = []
    if unknown:
        r = min(unknown, key=lambda r: (r.heartbeat_seq, r.sent_ms))
        candidates.append(Divergence("unknown_heartbeat", r.heartbeat_seq, r.sent_ms))
    if unacked:
        seq = unacked[0]
        kind = "unanswered_heartbeat" if seq < last_answered else "trailing_unanswered"
        candidates.append(Divergence(kind, seq, sent_ms[seq]))
    divergence = min(candidates, key=lambda d: (d.heartbeat_seq, d.kind != "unknown_heartbeat"),
                     default=None)

    # 7. Preemption: the binding notice, and whether the provider kept its promise.
    notices: list[PreemptionNotice] = []
    for index, data in enumerate(bundle.notices):
        try:
            n = decode(data, PreemptionNotice)
        except ProtocolError as err:
            invalid.append(Invalid("notice", index, err.code, err.detail))
            continue
        assert isinstance(n, PreemptionNotice)
        if n.agreement_id != agreement_id:
            invalid.append(Invalid("notice", index, "wrong_agreement", ""))
        elif not n.signature_valid(details.provider_key, data):
            invalid.append(Invalid("notice", index, "bad_signature", "not signed by details.provider_key"))
        elif n.stop_ms < n.sent_ms:
            invalid.append(Invalid("notice", index, "bad_stop", "stop_ms before sent_ms"))
        else:
            notices.append(n)
    seen: NoticeSeen | None = None
    faults: list[str] = []
    if notices:
        n = min(notices, key=lambda n: (n.stop_ms, n.sent_ms, n.encode()))
        seen = NoticeSeen(n.stop_ms, n.sent_ms, n.reason, details.notice_s)
        if details.notice_s == 0:
            faults.append(NOTICE_ON_DEMAND)
        elif n.notice_ms < details.notice_s * SECOND_MS:
            faults.append(SHORT_NOTICE)
        after = next((hb for hb, h in chain if h == n.after_heartbeat), None)
        if after is not None and n.sent_ms < after.sent_ms:
            faults.append(NOTICE_BACKDATED)
        # Service must go on until the stop (the final heartbeat is sent at stop_ms): heartbeats
        # that end more than one cap before it, while the renter answered the last one, mean
        # the provider stopped first. (Trailing unanswered heartbeats: the renter stopped.)
        if chain and last_answered == chain[-1][0].seq \
                and chain[-1][0].sent_ms < min(n.stop_ms, bundle.started_s * SECOND_MS
                                               + terms.max_seconds * SECOND_MS) - cap_ms:
            faults.append(STOPPED_EARLY)

    invalid.sort(key=lambda i: (i.kind, i.index, i.code))
    return Verdict(
        agreement_id=agreement_id,
        terms_valid=True,
        acked_seconds=acked,
        payout=claim_payout(terms, acked),
        heartbeats_valid=len(chain),
        receipts_valid=len(receipts),
        first_heartbeat_ms=chain[0][0].sent_ms if chain else None,
        last_heartbeat_ms=chain[-1][0].sent_ms if chain else None,
        evidenced_ms=evidenced,
        gaps=tuple(gaps),
        unacknowledged=unacked,
        divergence=divergence,
        invalid=tuple(invalid),
        notice=seen,
        notice_faults=tuple(faults),
    )


# ---------------------------------------------------------------------------------------------
# Arbitration (specs/evidence.md, "Arbitration"): what an arbiter awards on a disputed claim.


@dataclass(frozen=True, slots=True)
class Ruling:
    """The arbiter's split of the deposit computed from a bundle alone. `paid_seconds` =
    max(0, acked_seconds - forfeit_seconds); `provider_amount` = price * paid_seconds, the
    renter gets the rest of the deposit. `faults`: the verdict's notice_faults that counted."""

    agreement_id: bytes
    acked_seconds: int
    forfeit_seconds: int
    paid_seconds: int
    provider_amount: int
    renter_amount: int
    faults: tuple[str, ...]

    @property
    def payout(self) -> Payout:
        return Payout(self.provider_amount, self.renter_amount)

    def to_json_dict(self) -> dict[str, Any]:
        return {"agreement_id": self.agreement_id.hex(), "acked_seconds": self.acked_seconds,
                "forfeit_seconds": self.forfeit_seconds, "paid_seconds": self.paid_seconds,
                # decimal strings, as the verdict's payout: 18-decimal amounts exceed JSON numbers
                "provider_amount": str(self.provider_amount),
                "renter_amount": str(self.renter_amount), "faults": list(self.faults)}


def arbiter_ruling(bundle: EvidenceBundle, params: Params = DEFAULT_PARAMS) -> Ruling:
    """The ruling an arbiter gives on a disputed claim from the agreement's evidence.

    Without a notice fault: the receipt rule (price * acked_seconds, as the claim). A provable
    notice fault forfeits pay for the service the broken promise took from the renter (faults
    do not add up; the largest forfeit counts), never more than the claim:
    - short_notice, notice_backdated, stopped_early: `details.notice_s` seconds, the notice
      the interruptible agreement promised and the renter did not get;
    - notice_on_demand: the on-demand agreement's service the notice cut off, from the notice's
      stop to the agreement's end, in whole seconds rounded up.
    Raises LocalProtocolError("bad_terms") when the bundle's terms do not verify: the bundle is
    not evidence of any agreement."""
    verdict = verify_bundle(bundle, params)
    if not verdict.terms_valid:
        detail = verdict.invalid[0].detail if verdict.invalid else ""
        raise LocalProtocolError("bad_terms", f"the bundle's terms do not verify: {detail}")
    terms = bundle.terms.to_terms()
    forfeit = 0
    faults = verdict.notice_faults
    if verdict.notice is not None:
        if NOTICE_ON_DEMAND in faults:
            end_ms = (bundle.started_s + terms.max_seconds) * SECOND_MS
            forfeit = max(forfeit, -(-max(0, end_ms - verdict.notice.stop_ms) // SECOND_MS))
        if {SHORT_NOTICE, NOTICE_BACKDATED, STOPPED_EARLY} & set(faults):
            forfeit = max(forfeit, bundle.details.notice_s)
    paid = max(0, verdict.acked_seconds - forfeit)
    provider_amount = terms.price_per_second * paid
    return Ruling(verdict.agreement_id, verdict.acked_seconds, min(forfeit, verdict.acked_seconds),
                  paid, provider_amount, deposit(terms) - provider_amount, faults)


def _binding_problem(binding: Binding, key: bytes, wallet: bytes, chain_id: int) -> tuple[str, str] | None:
    try:
        binding.verify()
    except ProtocolError as err:
        return (err.code, err.detail)
    if binding.peer_key != key:
        return ("binding_key_mismatch", "binding is for another peer key than the details name")
    if binding.wallet != wallet:
        return ("binding_wallet_mismatch", "binding is for another wallet than the terms name")
    if binding.chain_id != chain_id:
        return ("binding_chain_mismatch", "binding is for another chain")
    return None


def _terms_failed(bundle: EvidenceBundle, why: Invalid, agreement_id: bytes | None = None) -> Verdict:
    """Without trustworthy terms nothing else can be checked: an empty verdict."""
    return Verdict(
        agreement_id=agreement_id or b"", terms_valid=False, acked_seconds=0, payout=None,
        heartbeats_valid=0, receipts_valid=0, first_heartbeat_ms=None, last_heartbeat_ms=None,
        evidenced_ms=0, gaps=(), unacknowledged=(), divergence=None, invalid=(why,),
    )
