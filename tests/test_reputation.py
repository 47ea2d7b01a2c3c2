import random

from hypothesis import given, settings, strategies as st

from protocol.evidence import build_bundle, verify_bundle
from protocol.reputation import AgreementOutcome, score_all, score_provider

from tests.rental_fixtures import TEST_PARAMS, RentalPair, make_agreement

P, Q = b"\x01" * 32, b"\x02" * 32


def outcome(i, key=P, paid=3600, acked=3600, disputed=False):
    return AgreementOutcome(i.to_bytes(32, "big"), key, 1000 + i, paid, acked, disputed)


def test_unknown_provider_scores_one_half():
    s = score_provider(P, [])
    assert s.score == 0.5 and s.agreements == 0 and s.history == () and s.lower < 0.5


def test_score__counts_failures_disputes_and_hours():
    outs = [outcome(1), outcome(2, acked=1800, disputed=True), outcome(3, paid=7200, acked=7200),
            outcome(4, key=Q)]
    s = score_provider(P, outs)
    assert (s.agreements, s.failures, s.disputes) == (3, 1, 1)
    assert s.paid_hours == 4.0 and s.delivered_hours == 3.5
    # alpha = 1 + 1 + 0.5 + 2, beta = 1 + 0.5: the documented formula.
    assert s.score == 4.5 / 6.0
    assert s.history == (1.0, 0.5, 1.0) and s.sparkline == "█▅█"
    assert s.row()["hours"] == "3.5/4.0"


def test_score_all__long_good_record_outranks_one_short_perfect_rental():
    outs = [outcome(i, key=P, paid=36_000, acked=35_900) for i in range(20)] + [outcome(99, key=Q, paid=600)]
    ranked = score_all(outs)
    assert [s.provider_key for s in ranked] == [P, Q]
    assert ranked[1].score > 0.5  # Q's one rental was perfect, just short


def test_outcome_from_verdict__uses_the_verdict_acked_and_the_chain_end():
    a = make_agreement(max_seconds=300, interval=10)
    pair = RentalPair(a, provider_crash_ms=1_700_000_000_000 + 150_000).run()
    b = build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding, 1_700_000_000,
                     pair.records("renter", "heartbeat"), pair.records("renter", "receipt"))
    v = verify_bundle(b, TEST_PARAMS)
    closed_s = next(t for side, t, c in pair.escrow_calls if c.method == "close") // 1000
    o = AgreementOutcome.from_verdict(v, a.provider.public, 1_700_000_000, closed_s)
    assert o.acked_seconds == v.acked_seconds == 140  # last heartbeat before the crash at 150 s
    assert o.paid_seconds == closed_s - 1_700_000_000 and o.delivered_fraction < 0.9
    assert score_provider(a.provider.public, [o]).failures == 1


outcomes = st.lists(
    st.builds(lambda i, k, paid, frac, d: outcome(i, key=k, paid=paid, acked=int(paid * frac), disputed=d),
              st.integers(0, 10**6), st.sampled_from([P, Q]), st.integers(0, 10**6),
              st.floats(0, 1.2), st.booleans()),
    max_size=30, unique_by=lambda o: o.agreement_id)


@settings(max_examples=200, deadline=None)
@given(outs=outcomes, seed=st.integers(0, 100))
def test_score__bounded_order_independent_and_monotone_in_good_outcomes(outs, seed):
    s = score_provider(P, outs)
    assert 0.0 <= s.lower <= s.score <= 1.0
    shuffled = list(outs)
    random.Random(seed).shuffle(shuffled)
    assert score_provider(P, shuffled) == s
    better = score_provider(P, outs + [outcome(2 * 10**6, paid=3600, acked=3600)])
    worse = score_provider(P, outs + [outcome(2 * 10**6, paid=3600, acked=0)])
    assert worse.score < s.score < better.score
