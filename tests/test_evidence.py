import dataclasses
import json
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.encoding import decode
from protocol.evidence import Divergence, build_bundle, verify_bundle
from protocol.messages import EvidenceBundle
from protocol.settlement import claim_payout

from tests.rental_fixtures import TEST_PARAMS, RentalPair, make_agreement

T0 = 1_700_000_000_000


def bundle_of(pair, sides=("provider", "renter"), heartbeats=None, receipts=None):
    a = pair.a
    hbs = heartbeats if heartbeats is not None else [b for s in sides for b in pair.records(s, "heartbeat")]
    rcs = receipts if receipts is not None else [b for s in sides for b in pair.records(s, "receipt")]
    return build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding, T0 // 1000, hbs, rcs)


def verify(bundle):
    # Through the wire, as an auditor would receive it.
    return verify_bundle(decode(bundle.encode(), EvidenceBundle), TEST_PARAMS)


def test_verify_bundle__clean_rental__full_acked_no_gaps_no_divergence():
    a = make_agreement(max_seconds=300, interval=10)
    pair = RentalPair(a).run()
    v = verify(bundle_of(pair))
    assert v.terms_valid and v.invalid == ()
    assert v.acked_seconds == 300 and v.payout == claim_payout(a.terms, 300) == pair.payout
    assert v.heartbeats_valid == 31 and v.receipts_valid == 31
    assert v.gaps == () and v.unacknowledged == () and v.divergence is None
    assert v.evidenced_ms == 300_000
    assert v.agreement_id == a.agreement_id


def test_verify_bundle__renter_record_shows_gap_merged_record_shows_unanswered_heartbeat():
    a = make_agreement(max_seconds=100, interval=10)
    pair = RentalPair(a, drop=lambda d, i: d == "p2r" and i == 3).run()
    renter_only = verify(bundle_of(pair, sides=("renter",)))
    assert [(g.after_seq, g.before_seq, g.length_ms) for g in renter_only.gaps] == [(2, 4, 20_000)]
    merged = verify(bundle_of(pair))
    assert merged.gaps == () and merged.unacknowledged == (3,)
    assert merged.divergence == Divergence("unanswered_heartbeat", 3, T0 + 30_000)
    assert merged.acked_seconds == pair.renter.acked_seconds


def test_verify_bundle__renter_vanished__trailing_unanswered_heartbeats():
    a = make_agreement(max_seconds=300, interval=10)
    pair = RentalPair(a, renter_vanish_ms=T0 + 55_000).run()
    v = verify(bundle_of(pair, sides=("provider",)))
    assert v.acked_seconds == 50 and v.payout == pair.payout
    assert v.unacknowledged == (6, 7, 8)
    assert v.divergence == Divergence("trailing_unanswered", 6, T0 + 60_000)


def test_verify_bundle__receipt_for_a_heartbeat_missing_from_the_bundle_is_a_divergence():
    a = make_agreement(max_seconds=60, interval=10)
    pair = RentalPair(a).run()
    hbs = pair.records("provider", "heartbeat")
    v = verify(bundle_of(pair, heartbeats=hbs[:2] + hbs[3:]))
    assert v.divergence == Divergence("unknown_heartbeat", 2, T0 + 20_000)
    assert v.acked_seconds == 60  # the receipts still pay: the contract only checks the wallet


def test_verify_bundle__tampered_and_foreign_items_are_listed_and_skipped():
    a = make_agreement(max_seconds=60, interval=10)
    pair = RentalPair(a).run()
    hbs = pair.records("provider", "heartbeat")
    rcs = pair.records("provider", "receipt")
    last_rc = decode(rcs[-1])
    forged_rc = dataclasses.replace(last_rc, acked_seconds=60).sign(a.provider)  # wrong signer
    hb2 = decode(hbs[2])
    equivocal = dataclasses.replace(hb2, sent_ms=hb2.sent_ms + 1).sign(a.provider)
    broken = dataclasses.replace(decode(hbs[4]), prev_hash=b"\x01" * 32).sign(a.provider)
    bundle = bundle_of(pair, heartbeats=hbs[:4] + [broken.encode()] + hbs[5:] + [equivocal.encode(), b"\xc1"],
                       receipts=rcs[:-1] + [forged_rc.encode()])
    v = verify(bundle)
    codes = sorted((i.kind, i.code) for i in v.invalid)
    # hb 4 was re-signed with a bad link, so hb 5 no longer links either; the twin of hb 2 loses
    # to the one hb 3 links to.
    assert codes == [("heartbeat", "broken_chain"), ("heartbeat", "broken_chain"),
                     ("heartbeat", "equivocation"), ("heartbeat", "malformed"),
                     ("receipt", "bad_signature")]
    equivocal_index = bundle.heartbeats.index(equivocal.encode())
    assert [i.index for i in v.invalid if i.code == "equivocation"] == [equivocal_index]
    assert v.acked_seconds == decode(rcs[-2]).acked_seconds == 50
    assert v.heartbeats_valid == len(hbs) - 2


def test_verify_bundle__details_not_matching_terms__nothing_else_is_trusted():
    a = make_agreement()
    pair = RentalPair(a).run()
    bundle = bundle_of(pair)
    other = dataclasses.replace(bundle.details, gpus=bundle.details.gpus[:1])
    v = verify(dataclasses.replace(bundle, details=other))
    assert not v.terms_valid and v.payout is None
    assert [i.code for i in v.invalid] == ["details_hash_mismatch"]
    bad_terms = dataclasses.replace(bundle.terms, max_seconds=0)
    assert [i.code for i in verify(dataclasses.replace(bundle, terms=bad_terms)).invalid] == ["bad_terms"]


def test_verify_bundle__swapped_bindings_are_reported():
    a = make_agreement(max_seconds=30)
    pair = RentalPair(a).run()
    bundle = bundle_of(pair)
    v = verify(dataclasses.replace(bundle, provider_binding=bundle.renter_binding,
                                   renter_binding=bundle.provider_binding))
    assert [(i.kind, i.index, i.code) for i in v.invalid] == [
        ("binding", 0, "binding_key_mismatch"), ("binding", 1, "binding_key_mismatch")]
    assert v.acked_seconds == 30


def test_verdict__deterministic_and_json_serialisable_whatever_the_record_order():
    a = make_agreement(max_seconds=120, interval=10)
    pair = RentalPair(a, drop=lambda d, i: i % 4 == 1).run()
    hbs = [b for s in ("provider", "renter") for b in pair.records(s, "heartbeat")]
    rcs = [b for s in ("provider", "renter") for b in pair.records(s, "receipt")]
    rng = random.Random(1)
    verdicts = set()
    for _ in range(3):
        rng.shuffle(hbs)
        rng.shuffle(rcs)
        verdicts.add(verify(bundle_of(pair, heartbeats=hbs, receipts=rcs)).to_json())
    assert len(verdicts) == 1
    doc = json.loads(verdicts.pop())
    assert doc["acked_seconds"] == pair.renter.acked_seconds
    assert doc["payout"]["provider"] == str(claim_payout(a.terms, doc["acked_seconds"]).provider)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), drop_rate=st.sampled_from([0.0, 0.2, 0.4]),
       vanish=st.one_of(st.none(), st.integers(0, 150_000)))
def test_verdict_agrees_with_settlement_and_with_what_the_escrow_paid(seed, drop_rate, vanish):
    a = make_agreement(9, max_seconds=150, interval=10)
    rng = random.Random(seed)
    fates = {}

    def fate(d, i):
        return fates.setdefault((d, i), (rng.random() < drop_rate, rng.randrange(1500)))

    pair = RentalPair(a, drop=lambda d, i: fate(d, i)[0], delay_ms=lambda d, i: fate(d, i)[1],
                      renter_vanish_ms=None if vanish is None else T0 + vanish).run()
    provider_view = verify(bundle_of(pair, sides=("provider",)))
    assert provider_view.invalid == ()
    assert provider_view.acked_seconds == pair.provider.acked_seconds
    assert provider_view.payout == claim_payout(a.terms, provider_view.acked_seconds)
    if pair.payout is not None and any(c.method == "claim" for _, _, c in pair.escrow_calls):
        assert provider_view.payout == pair.payout
    merged = verify(bundle_of(pair))
    assert merged.acked_seconds == pair.renter.acked_seconds >= provider_view.acked_seconds
    assert merged.heartbeats_valid == len(pair.provider.sent)
