"""Issue 12 (audit findings): each test here failed on the escrow before the fix.

High: a party named arbiter awards itself the deposit. Medium: unbounded grace locks a deposit
for 136 years. Low: a 5 s grace lets the renter recover before the provider's claim is mined;
tokens that move funds but return false/2/a long word are paid twice; a token that silently
does nothing strands the payout; the provider's consent never expires. Info: the cached domain
separator under DELEGATECALL; withdrawTo the escrow itself strands a credit.
"""

from __future__ import annotations

from dataclasses import replace

import boa
import pytest

from protocol.agreement import ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION
from protocol.eth import contract_domain_separator

from .helpers import (
    ADDR, MAX_DISPUTE_WINDOW, MAX_GRACE, MIN_DISPUTE_WINDOW, MIN_GRACE, ZERO, claim, consent,
    deploy_hostile, hexaddr, make_terms, now, open_agreement, raw, receipt, state, tup,
    unchecked, with_arbiter,
)

OPEN, FINAL = 1, 5


def try_open(escrow, t, reason: str | None) -> None:
    """Open `t` (native coin) as the renter, expecting `reason` as the revert (None: success)."""
    with boa.env.prank(hexaddr(t.renter)):
        if reason is None:
            escrow.open(tup(t), consent(escrow, t), value=t.deposit)
            return
        with boa.reverts(reason):
            escrow.open(tup(t), consent(escrow, t), value=t.deposit)


# ---------------------------------------------------------------- High: arbiter is a party


@pytest.mark.parametrize("party", ["provider", "renter"])
def test_arbiter_cannot_be_a_party(escrow, party):
    # With arbiter == provider the provider would claim on any receipt, dispute its own claim
    # and arbitrate the whole deposit to itself (the renter case is the mirror).
    t = unchecked(make_terms(), arbiter=ADDR[party], dispute_window=3_600)
    try_open(escrow, t, "arbiter is a party")
    assert state(escrow, t)[0] == 0


def test_self_award_attack_is_stopped_at_open(escrow):
    """The attack end to end: the provider as arbiter cannot even get the agreement opened,
    so it never reaches claim -> dispute -> arbitrate(deposit)."""
    t = unchecked(make_terms(), arbiter=ADDR["provider"], dispute_window=3_600)
    try_open(escrow, t, "arbiter is a party")
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("agreement is not open"):
        escrow.claim(tup(t), 0, receipt(escrow, t, 0))
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("agreement is not disputed"):
        escrow.arbitrate(tup(t), t.deposit)


# ---------------------------------------------------------------- Medium/Low: grace bounds


@pytest.mark.parametrize("grace, ok", [
    (0, False), (5, False), (MIN_GRACE - 1, False), (MIN_GRACE, True), (600, True),
    (MAX_GRACE, True), (MAX_GRACE + 1, False), (2**32 - 1, False),
])
def test_grace_is_bounded(escrow, grace, ok):
    t = make_terms(grace=grace, salt=b"%d" % grace)
    try_open(escrow, t, None if ok else "grace out of bounds")


def test_short_grace_race_is_gone(escrow):
    """With grace = 5 s the renter could close and recover two blocks later, before the
    provider's claim was mined. Now the provider has at least MIN_GRACE after the close."""
    t = make_terms(grace=MIN_GRACE)
    open_agreement(escrow, t)
    boa.env.time_travel(seconds=100)
    with boa.env.prank(hexaddr(t.renter)):
        escrow.close(tup(t))
    boa.env.time_travel(seconds=6)
    with boa.reverts("claim period not over"):
        escrow.recover(tup(t))
    boa.env.time_travel(seconds=MIN_GRACE - 6)  # exactly end + grace: the claim still lands
    claim(escrow, t, 100)
    assert state(escrow, t)[0] == FINAL


@pytest.mark.parametrize("window, ok", [
    (1, False), (MIN_DISPUTE_WINDOW - 1, False), (MIN_DISPUTE_WINDOW, True),
    (MAX_DISPUTE_WINDOW, True), (MAX_DISPUTE_WINDOW + 1, False), (2**32 - 1, False),
])
def test_dispute_window_is_bounded(escrow, window, ok):
    t = with_arbiter(make_terms(salt=b"w%d" % window), window)
    try_open(escrow, t, None if ok else "dispute_window out of bounds")


def test_longest_lock_after_the_end_is_bounded(escrow):
    """The longest an unclaimed deposit stays locked after its end is MAX_GRACE (7 days)."""
    t = make_terms(grace=MAX_GRACE, max_seconds=10)
    open_agreement(escrow, t)
    boa.env.time_travel(seconds=10 + MAX_GRACE + 1)
    r0 = boa.env.get_balance(hexaddr(t.renter))
    escrow.recover(tup(t))
    assert boa.env.get_balance(hexaddr(t.renter)) == r0 + t.deposit


# ---------------------------------------------------------------- Low: consent deadline


def test_open_by_is_the_last_second_to_open(escrow):
    t = make_terms(open_by=now() + 100)
    boa.env.time_travel(seconds=100)  # block time == open_by: still allowed
    try_open(escrow, t, None)
    assert state(escrow, t)[0] == OPEN


def test_consent_expires_after_open_by(escrow):
    t = make_terms(open_by=now() + 100)
    boa.env.time_travel(seconds=101)
    try_open(escrow, t, "consent expired (open_by passed)")
    # Years later: the same consent is still dead.
    boa.env.time_travel(seconds=3 * 365 * 24 * 3600)
    try_open(escrow, t, "consent expired (open_by passed)")


def test_open_by_is_covered_by_the_consent(escrow):
    """The renter cannot stretch open_by: the consent signs the agreement id, which hashes it."""
    t = make_terms(open_by=now() + 100)
    later = replace(t, open_by=t.open_by + 10**6)
    assert later.agreement_id() != t.agreement_id()
    assert escrow.agreementId(tup(later)) == later.agreement_id()
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("consent not signed by provider"):
        escrow.open(tup(later), consent(escrow, t), value=t.deposit)


# ---------------------------------------------------------------- Low: odd tokens


def _two_agreements(escrow, tok):
    """The attacker's agreement and a victim's in the same token."""
    victim = make_terms(token=tok, price=1_000, provider="provider2", renter="renter2",
                        salt=b"victim")
    open_agreement(escrow, victim, tok)
    t = make_terms(token=tok, price=1_000, salt=b"attacker")
    open_agreement(escrow, t, tok)
    return t, victim


def _assert_paid_once(escrow, tok, t, victim):
    paid = 1_234 * t.price_per_second
    assert tok.balanceOf(hexaddr(t.provider)) == paid
    assert tok.balanceOf(hexaddr(t.renter)) == t.deposit - paid
    assert escrow.credits(tok.address, hexaddr(t.provider)) == 0
    assert escrow.credits(tok.address, hexaddr(t.renter)) == 0
    assert not [e for e in escrow.get_logs() if type(e).__name__ == "Credited"]
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("nothing to withdraw"):
        escrow.withdraw(tok.address)
    assert tok.balanceOf(escrow.address) == victim.deposit  # the victim's deposit is whole


@pytest.mark.parametrize("ret_word", [0, 2])
def test_token_moving_funds_but_returning_false_or_two_is_paid_once(escrow, ret_word):
    tok = deploy_hostile("OddReturnToken", ret_word)
    t, victim = _two_agreements(escrow, tok)
    claim(escrow, t, 1_234)
    _assert_paid_once(escrow, tok, t, victim)


@pytest.mark.parametrize("first_word", [0, 1])
def test_token_moving_funds_with_a_long_return_is_paid_once(escrow, first_word):
    tok = deploy_hostile("LongReturnToken", first_word)
    t, victim = _two_agreements(escrow, tok)
    claim(escrow, t, 1_234)
    _assert_paid_once(escrow, tok, t, victim)


def test_token_doing_nothing_silently_is_credited_not_lost(escrow):
    tok = deploy_hostile("SilentToken")
    t = make_terms(token=tok, price=1_000)
    open_agreement(escrow, t, tok)
    tok.set_broken(True)
    claim(escrow, t, 1_234)
    paid = 1_234 * t.price_per_second
    assert tok.balanceOf(hexaddr(t.provider)) == 0  # the token moved nothing...
    assert escrow.credits(tok.address, hexaddr(t.provider)) == paid  # ...so both are owed
    assert escrow.credits(tok.address, hexaddr(t.renter)) == t.deposit - paid
    assert tok.balanceOf(escrow.address) == t.deposit
    # While the token still does nothing, a withdrawal fails and the credit stays.
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("token transfer failed"):
        escrow.withdraw(tok.address)
    assert escrow.credits(tok.address, hexaddr(t.provider)) == paid
    tok.set_broken(False)
    for who in (t.provider, t.renter):
        with boa.env.prank(hexaddr(who)):
            escrow.withdraw(tok.address)
    assert tok.balanceOf(hexaddr(t.provider)) == paid
    assert tok.balanceOf(hexaddr(t.renter)) == t.deposit - paid
    assert tok.balanceOf(escrow.address) == 0


def test_token_lying_true_but_moving_nothing_is_credited(escrow):
    tok = deploy_hostile("SkewToken", 100)
    t, victim = _two_agreements(escrow, tok)
    tok.set_percent(0)  # returns true, moves nothing
    claim(escrow, t, 1_234)
    paid = 1_234 * t.price_per_second
    assert escrow.credits(tok.address, hexaddr(t.provider)) == paid
    assert escrow.credits(tok.address, hexaddr(t.renter)) == t.deposit - paid
    assert tok.balanceOf(escrow.address) == t.deposit + victim.deposit


def test_token_moving_part_of_a_payout_credits_the_rest(escrow):
    tok = deploy_hostile("SkewToken", 100)
    t, victim = _two_agreements(escrow, tok)
    tok.set_percent(50)
    claim(escrow, t, 1_000)
    paid = 1_000 * t.price_per_second
    assert tok.balanceOf(hexaddr(t.provider)) == paid // 2
    assert escrow.credits(tok.address, hexaddr(t.provider)) == paid - paid // 2
    # What left plus what is owed is exactly this agreement's deposit; the victim's is whole.
    owed = sum(escrow.credits(tok.address, hexaddr(w)) for w in (t.provider, t.renter))
    assert tok.balanceOf(escrow.address) - owed == victim.deposit


def test_token_taking_more_than_the_payout_reverts_the_settlement(escrow):
    tok = deploy_hostile("SkewToken", 100)
    t, victim = _two_agreements(escrow, tok)
    tok.set_percent(200)  # would pay this agreement out of the victim's deposit
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("token took more than the payout"):
        escrow.claim(tup(t), 1_000, receipt(escrow, t, 1_000))
    assert state(escrow, t)[0] == OPEN
    assert tok.balanceOf(escrow.address) == t.deposit + victim.deposit


def test_withdraw_of_a_token_that_moves_the_wrong_amount_reverts(escrow):
    tok = deploy_hostile("SkewToken", 100)
    t = make_terms(token=tok, price=1_000)
    open_agreement(escrow, t, tok)
    tok.set_percent(0)
    claim(escrow, t, 1_000)  # both payouts credited
    tok.set_percent(50)
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("token transfer failed"):
        escrow.withdraw(tok.address)
    tok.set_percent(100)
    with boa.env.prank(hexaddr(t.provider)):
        escrow.withdraw(tok.address)
    assert tok.balanceOf(hexaddr(t.provider)) == 1_000 * t.price_per_second


# ---------------------------------------------------------------- Info


def test_domain_separator_under_delegatecall_names_the_caller(escrow):
    proxy = deploy_hostile("DelegateProxy", escrow.address)
    chain_id = boa.env.evm.patch.chain_id
    own = contract_domain_separator(ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id,
                                    raw(proxy.address))
    assert proxy.domainSeparator() == own
    assert escrow.domainSeparator() == contract_domain_separator(
        ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id, raw(escrow.address))


def test_withdraw_to_the_escrow_itself_is_refused(escrow):
    tok = deploy_hostile("RevertingToken")
    t = make_terms(token=tok, price=10)
    open_agreement(escrow, t, tok)
    tok.set_blocked(hexaddr(t.renter), True)
    claim(escrow, t, 100)
    credit = escrow.credits(tok.address, hexaddr(t.renter))
    assert credit == t.deposit - 1_000
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("to is the escrow"):
        escrow.withdrawTo(tok.address, escrow.address)
    assert escrow.credits(tok.address, hexaddr(t.renter)) == credit
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("to is the escrow"):
        escrow.withdrawTo(ZERO, escrow.address)
