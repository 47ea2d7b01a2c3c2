import dataclasses
import functools

import pytest
from hypothesis import given, settings, strategies as st

from protocol import settlement
from protocol.agreement import AgreementTerms, UINT64_MAX
from protocol.errors import LocalProtocolError
from protocol.settlement import (
    ARBITRATION_TIMEOUT_S, EscrowModel, Payout, arbitration_payout, claim_payout, recover_payout,
)

from tests.rental_fixtures import make_agreement

ARBITER = b"\xab" * 20


@functools.cache
def _base():
    return make_agreement(1).terms


def _terms(price: int, max_seconds: int, arbiter: bool = False) -> AgreementTerms:
    base = _base()
    return AgreementTerms(
        base.provider, base.renter, base.token, price, max_seconds, 10, 300,
        ARBITER if arbiter else b"\x00" * 20, 3600 if arbiter else 0, base.details_hash,
        base.open_by,
    )


def test_claim_payout__splits_deposit_by_acked_seconds():
    terms = _terms(price=7, max_seconds=600)
    assert claim_payout(terms, 100) == Payout(provider=700, renter=7 * 600 - 700)
    assert claim_payout(terms, 0) == Payout(0, 4200)
    assert claim_payout(terms, 600) == Payout(4200, 0)


def test_claim_payout__acked_beyond_max_is_a_local_error():
    terms = _terms(price=7, max_seconds=600)
    with pytest.raises(LocalProtocolError) as exc:
        claim_payout(terms, 601)
    assert exc.value.code == "acked_exceeds_max"
    for bad in (-1, 1.5, True):
        with pytest.raises(LocalProtocolError):
            claim_payout(terms, bad)


def test_recover_payout__returns_whole_deposit():
    terms = _terms(price=3, max_seconds=50)
    assert recover_payout(terms) == Payout(0, 150)


def test_arbitration_payout__bounded_by_deposit_and_needs_arbiter():
    terms = _terms(price=3, max_seconds=50, arbiter=True)
    assert arbitration_payout(terms, 100) == Payout(100, 50)
    with pytest.raises(LocalProtocolError) as exc:
        arbitration_payout(terms, 151)
    assert exc.value.code == "provider_amount_exceeds_deposit"
    with pytest.raises(LocalProtocolError) as exc:
        arbitration_payout(_terms(3, 50), 10)
    assert exc.value.code == "no_arbiter"


def test_deadlines__close_moves_end_and_grace_follows():
    terms = _terms(price=1, max_seconds=1000)
    end = settlement.end_s(terms, 5000)
    assert end == 6000
    assert settlement.claim_deadline_s(terms, end) == 6300
    new_end = settlement.end_after_close_s(end, 5400)
    assert new_end == 5400
    assert settlement.claim_allowed(terms, new_end, 5700)
    assert not settlement.claim_allowed(terms, new_end, 5701)
    assert not settlement.recover_allowed(terms, new_end, 5700)
    assert settlement.recover_allowed(terms, new_end, 5701)
    with pytest.raises(LocalProtocolError) as exc:
        settlement.end_after_close_s(end, 6000)
    assert exc.value.code == "already_ended"


amounts = st.integers(min_value=1, max_value=10**30)
durations = st.integers(min_value=1, max_value=30 * 24 * 3600)


@settings(max_examples=200, deadline=None)
@given(price=amounts, max_seconds=durations, data=st.data())
def test_claim_payout__sums_to_deposit_and_is_monotone(price, max_seconds, data):
    terms = _terms(price, max_seconds)
    a = data.draw(st.integers(0, max_seconds))
    b = data.draw(st.integers(a, max_seconds))
    pa, pb = claim_payout(terms, a), claim_payout(terms, b)
    assert pa.total == pb.total == terms.deposit
    assert pa.provider <= pb.provider and pa.renter >= pb.renter
    assert min(pa.provider, pa.renter) >= 0


@settings(max_examples=200, deadline=None)
@given(price=amounts, max_seconds=durations, amount=st.integers(0, 10**40))
def test_arbitration_payout__never_exceeds_deposit(price, max_seconds, amount):
    terms = _terms(price, max_seconds, arbiter=True)
    if amount > terms.deposit:
        with pytest.raises(LocalProtocolError):
            arbitration_payout(terms, amount)
    else:
        p = arbitration_payout(terms, amount)
        assert p.total == terms.deposit and p.renter >= 0


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["close", "claim", "dispute", "arbitrate", "finalize", "recover"]),
        st.integers(0, 3 * ARBITRATION_TIMEOUT_S),  # time step
        st.integers(0, 10**6),  # argument
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(arbiter=st.booleans(), max_seconds=st.integers(1, 10**6), actions=ACTIONS)
def test_escrow_model__any_call_sequence_pays_out_at_most_once_and_exactly_the_deposit(
    arbiter, max_seconds, actions
):
    terms = _terms(price=11, max_seconds=max_seconds, arbiter=arbiter)
    model = EscrowModel(terms, started_s=1_000_000)
    now = 1_000_000
    payouts = []
    for method, step, arg in actions:
        now += step
        try:
            if method == "claim":
                result = model.claim(arg % (max_seconds + 2), now)
            elif method == "arbitrate":
                result = model.arbitrate(arg * 7, now)
            else:
                result = getattr(model, method)(now)
        except LocalProtocolError:
            continue
        if isinstance(result, Payout):
            payouts.append(result)
    assert len(payouts) <= 1
    if payouts:
        assert payouts[0].total == terms.deposit
        assert model.state == settlement.FINAL
    else:
        assert model.state != settlement.FINAL


def test_escrow_model__claim_after_close_and_grace_is_refused_then_recover_pays_renter():
    terms = _terms(price=2, max_seconds=1000)
    model = EscrowModel(terms, started_s=0)
    model.close(400)
    with pytest.raises(LocalProtocolError) as exc:
        model.recover(700)
    assert exc.value.code == "claim_period_not_over"
    with pytest.raises(LocalProtocolError) as exc:
        model.claim(100, 701)
    assert exc.value.code == "claim_period_over"
    assert model.recover(701) == Payout(0, 2000)


def test_escrow_model__undisputed_claim_finalizes_at_claimed_amounts():
    terms = _terms(price=2, max_seconds=1000, arbiter=True)
    model = EscrowModel(terms, started_s=0)
    assert model.claim(250, 900) is None
    with pytest.raises(LocalProtocolError):
        model.finalize(900 + 3600)
    assert model.finalize(900 + 3601) == Payout(500, 1500)


def test_escrow_model__disputed_claim_is_arbitrated_or_finalized_after_timeout():
    terms = _terms(price=2, max_seconds=1000, arbiter=True)
    m1 = EscrowModel(terms, started_s=0)
    m1.claim(250, 900)
    m1.dispute(1000)
    assert m1.arbitrate(1234, 1000 + ARBITRATION_TIMEOUT_S) == Payout(1234, 766)
    m2 = EscrowModel(terms, started_s=0)
    m2.claim(250, 900)
    m2.dispute(1000)
    with pytest.raises(LocalProtocolError):
        m2.finalize(1000 + ARBITRATION_TIMEOUT_S)
    assert m2.finalize(1001 + ARBITRATION_TIMEOUT_S) == Payout(500, 1500)


def test_escrow_model__open_checks_the_consent_deadline_and_the_bounds():
    terms = dataclasses.replace(_terms(price=1, max_seconds=100), open_by=5_000)
    assert EscrowModel.open(terms, 5_000).state == settlement.OPEN  # block time == open_by: ok
    with pytest.raises(LocalProtocolError) as exc:
        EscrowModel.open(terms, 5_001)
    assert exc.value.code == "consent_expired"
    for grace in (299, 604_801):
        with pytest.raises(LocalProtocolError) as exc:
            EscrowModel.open(dataclasses.replace(terms, grace=grace), 4_000)
        assert exc.value.code == "grace_out_of_bounds"
    arb = dataclasses.replace(_terms(price=1, max_seconds=100, arbiter=True), open_by=5_000)
    assert EscrowModel.open(arb, 4_000).state == settlement.OPEN
    for window in (299, 604_801):
        with pytest.raises(LocalProtocolError) as exc:
            EscrowModel.open(dataclasses.replace(arb, dispute_window=window), 4_000)
        assert exc.value.code == "dispute_window_out_of_bounds"
