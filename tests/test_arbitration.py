"""The arbiter's ruling counts the provable notice faults (specs/evidence.md, "Arbitration"):
vectors in specs/vectors/arbitration.json, the escrow model paying the ruling after a dispute,
and the rule's bounds over random bundles."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from protocol.encoding import decode
from protocol.errors import LocalProtocolError
from protocol.evidence import NOTICE_ON_DEMAND, SHORT_NOTICE, STOPPED_EARLY, arbiter_ruling, verify_bundle
from protocol.messages import EvidenceBundle, TermsWire
from protocol.settlement import EscrowModel, claim_payout, deposit
from tests.protocol.arbitration_vectors import FILE, T0, agreement, build, forged, render, served_bundle
from tests.protocol.vectors import VECTORS_DIR

VECTORS = json.loads((VECTORS_DIR / FILE).read_text())


def test_arbitration__committed_vectors_match_the_code():
    assert (VECTORS_DIR / FILE).read_text() == render(build()), (
        f"specs/vectors/{FILE} is stale: run python -m tests.protocol.arbitration_vectors")


@pytest.mark.parametrize("vec", VECTORS["cases"], ids=lambda v: v["name"])
def test_arbitration__vector_bundle_gives_its_ruling(vec):
    bundle = decode(bytes.fromhex(vec["bundle_hex"]), EvidenceBundle)
    assert list(verify_bundle(bundle).notice_faults) == vec["notice_faults"]
    assert arbiter_ruling(bundle).to_json_dict() == vec["ruling"]


def test_arbitration__vectors_cover_every_notice_fault_and_the_honest_case():
    seen = {f for v in VECTORS["cases"] for f in v["notice_faults"]}
    assert seen == {"notice_on_demand", "short_notice", "notice_backdated", "stopped_early"}
    honest = next(v for v in VECTORS["cases"] if v["name"] == "honest_preemption")
    assert honest["ruling"]["provider_amount"] == honest["claim_provider_amount"]  # no fault: the claim


def test_arbitration__no_fault__the_ruling_is_the_claim():
    a = agreement(60)
    bundle = served_bundle(a, 300)
    ruling = arbiter_ruling(bundle)
    assert ruling.faults == () and ruling.forfeit_seconds == 0
    assert ruling.payout == claim_payout(a.terms, verify_bundle(bundle).acked_seconds)


def test_arbitration__short_notice__disputed_claim_pays_the_ruling_on_the_escrow():
    """The provider claims its receipts; the renter disputes with the bundle; the arbiter's
    amount from arbiter_ruling is what the escrow pays: the promised notice forfeited."""
    a = agreement(60)
    bundle = served_bundle(a, 120, lambda h: forged(a, T0 + 100_000, T0 + 110_000, h[10]))
    verdict, ruling = verify_bundle(bundle), arbiter_ruling(bundle)
    assert verdict.notice_faults == (SHORT_NOTICE,)
    escrow = EscrowModel.open(a.terms, T0 // 1000)
    now = T0 // 1000 + 130
    assert escrow.claim(verdict.acked_seconds, now) is None  # an arbiter is named: claimed
    escrow.dispute(now + 10)
    paid = escrow.arbitrate(ruling.provider_amount, now + 20)
    assert paid.provider == a.terms.price_per_second * (verdict.acked_seconds - 60)
    assert paid.renter == deposit(a.terms) - paid.provider
    assert paid.provider < claim_payout(a.terms, verdict.acked_seconds).provider


def test_arbitration__faults_do_not_add_up__the_largest_forfeit_counts():
    a = agreement(60)
    bundle = served_bundle(a, 120, lambda h: forged(a, T0 + 180_000, T0 + 200_000, h[12]))
    ruling = arbiter_ruling(bundle)
    assert set(ruling.faults) == {SHORT_NOTICE, STOPPED_EARLY} and ruling.forfeit_seconds == 60


def test_arbitration__notice_in_an_on_demand_agreement__forfeits_the_service_it_cut_off():
    b = agreement(0, seed=6)
    bundle = served_bundle(b, 590, lambda h: forged(b, T0 + 570_000, T0 + 579_001, h[57]))
    ruling = arbiter_ruling(bundle)
    assert ruling.faults == (NOTICE_ON_DEMAND,)
    assert ruling.forfeit_seconds == 21  # 600 s - 579.001 s, rounded up
    assert ruling.paid_seconds == ruling.acked_seconds - 21


def test_arbitration__bundle_with_bad_terms__no_ruling():
    a = agreement(60)
    bundle = served_bundle(a, 30)
    other = agreement(60, seed=9)
    bad = EvidenceBundle(TermsWire.from_terms(other.terms), bundle.details, bundle.provider_binding,
                         bundle.renter_binding, bundle.started_s, bundle.heartbeats, bundle.receipts,
                         bundle.notices)
    with pytest.raises(LocalProtocolError) as err:
        arbiter_ruling(bad)
    assert err.value.code == "bad_terms"


@settings(max_examples=25, deadline=None)
@given(upto=st.integers(0, 59).map(lambda k: k * 10), sent=st.integers(0, 600_000),
       notice_ms=st.integers(0, 120_000), after=st.integers(0, 59), notice_s=st.sampled_from([0, 60]))
def test_arbitration__ruling_never_pays_more_than_the_claim_and_splits_the_deposit(upto, sent, notice_ms,
                                                                                  after, notice_s):
    a = agreement(notice_s, seed=5 if notice_s else 6)
    bundle = served_bundle(a, upto, lambda h: forged(a, T0 + sent, T0 + sent + notice_ms,
                                                     h[min(after, len(h) - 1)] if h else b"\0" * 32))
    verdict, ruling = verify_bundle(bundle), arbiter_ruling(bundle)
    claim = claim_payout(a.terms, verdict.acked_seconds)
    assert 0 <= ruling.provider_amount <= claim.provider
    assert ruling.provider_amount + ruling.renter_amount == deposit(a.terms)
    assert (ruling.provider_amount < claim.provider) <= bool(verdict.notice_faults)
    if not verdict.notice_faults:
        assert ruling.payout == claim


def test_arbitration__cli_evidence_verify_prints_the_ruling(tmp_path, capsys):
    from node.cli import main

    vec = next(v for v in VECTORS["cases"] if v["name"] == "stopped_early")
    path = tmp_path / "bundle.bin"
    path.write_bytes(bytes.fromhex(vec["bundle_hex"]))
    assert main(["evidence", "verify", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["notice_faults"] == ["stopped_early"] and doc["arbiter_ruling"] == vec["ruling"]
