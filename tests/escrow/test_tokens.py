"""ERC-20 deposits and payouts, including hostile tokens and hostile recipients."""

from __future__ import annotations

import boa
import pytest

from .helpers import (
    ADDR, ZERO, balance, claim, consent, deploy_hostile, hexaddr, make_terms, open_agreement,
    receipt, state, tup,
)


def test_test_token_is_usdc_like(token):
    assert token.decimals() == 6
    assert token.symbol() == "tUSDC"
    token.mint(hexaddr(ADDR["renter"]), 5 * 10**6)
    assert token.balanceOf(hexaddr(ADDR["renter"])) == 5 * 10**6
    assert token.totalSupply() == 5 * 10**6
    with boa.env.prank(hexaddr(ADDR["outsider"])), boa.reverts("ERC20: transfer amount exceeds balance"):
        token.transfer(hexaddr(ADDR["renter"]), 1)


def test_erc20_lifecycle_pays_both(escrow, token):
    t = make_terms(token=token, price=1_000)
    open_agreement(escrow, t, token)
    assert token.balanceOf(escrow.address) == t.deposit
    claim(escrow, t, 1_234)
    assert token.balanceOf(hexaddr(t.provider)) == 1_234_000
    assert token.balanceOf(hexaddr(t.renter)) == t.deposit - 1_234_000
    assert token.balanceOf(escrow.address) == 0


def test_erc20_open_checks(escrow, token):
    t = make_terms(token=token, price=1_000)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("token transferFrom failed"):
        escrow.open(tup(t), consent(escrow, t))  # no balance, no allowance
    token.mint(hexaddr(t.renter), t.deposit)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("token transferFrom failed"):
        escrow.open(tup(t), consent(escrow, t))  # balance, no allowance
    with boa.env.prank(hexaddr(t.renter)):
        token.approve(escrow.address, t.deposit)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("msg.value must be zero for a token deposit"):
        escrow.open(tup(t), consent(escrow, t), value=1)
    eoa = make_terms(token=ADDR["outsider"])
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("token has no code"):
        escrow.open(tup(eoa), consent(escrow, eoa))
    with boa.env.prank(hexaddr(t.renter)):
        escrow.open(tup(t), consent(escrow, t))


def test_token_without_bool_return_works(escrow):
    tok = deploy_hostile("NoBoolToken")
    t = make_terms(token=tok, price=7)
    open_agreement(escrow, t, tok)
    claim(escrow, t, 100)
    assert tok.balanceOf(hexaddr(t.provider)) == 700
    assert tok.balanceOf(hexaddr(t.renter)) == t.deposit - 700
    assert tok.balanceOf(escrow.address) == 0


def test_fee_on_transfer_token_rejected(escrow):
    tok = deploy_hostile("FeeToken")
    t = make_terms(token=tok, price=1_000)
    tok.mint(hexaddr(t.renter), t.deposit)
    with boa.env.prank(hexaddr(t.renter)):
        tok.approve(escrow.address, t.deposit)
        with boa.reverts("token delivered less than the deposit"):
            escrow.open(tup(t), consent(escrow, t))
    assert tok.balanceOf(escrow.address) == 0


def test_reentering_token_cannot_reenter(escrow):
    tok = deploy_hostile("ReentrantToken")
    # A victim agreement that anyone may recover right now: the token's re-entry payload
    # would succeed if the escrow were not locked during the token call.
    victim = make_terms(salt=b"victim", max_seconds=10, grace=300)
    open_agreement(escrow, victim)
    boa.env.time_travel(seconds=311)
    tok.arm(escrow.address, escrow.recover.prepare_calldata(tup(victim)))
    t = make_terms(token=tok, price=10, salt=b"t")
    open_agreement(escrow, t, tok)  # transferFrom re-enters
    assert (tok.reentry_attempts(), tok.reentry_successes()) == (1, 0)
    claim(escrow, t, 10)  # both transfers re-enter
    assert (tok.reentry_attempts(), tok.reentry_successes()) == (3, 0)
    assert tok.balanceOf(hexaddr(t.provider)) == 100
    assert tok.balanceOf(hexaddr(t.renter)) == t.deposit - 100
    assert tok.balanceOf(escrow.address) == 0
    assert state(escrow, victim)[0] == 1  # untouched by the re-entries
    escrow.recover(tup(victim))  # the same call, not re-entrant, succeeds
    assert state(escrow, victim)[0] == 5


@pytest.mark.parametrize("return_false", [False, True])
def test_failing_token_push_becomes_credit(escrow, return_false):
    tok = deploy_hostile("RevertingToken")
    tok.set_return_false(return_false)
    t = make_terms(token=tok, price=10)
    open_agreement(escrow, t, tok)
    tok.set_blocked(hexaddr(t.renter), True)
    claim(escrow, t, 100)  # the provider is still paid; the renter's refund is credited
    credited = [e for e in escrow.get_logs() if type(e).__name__ == "Credited"]
    assert [(str(e.recipient).lower(), e.amount) for e in credited] == [
        (hexaddr(t.renter), t.deposit - 1_000)]
    assert tok.balanceOf(hexaddr(t.provider)) == 1_000
    assert escrow.credits(tok.address, hexaddr(t.renter)) == t.deposit - 1_000
    assert tok.balanceOf(escrow.address) == t.deposit - 1_000
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("token transfer failed"):
        escrow.withdraw(tok.address)
    with boa.env.prank(hexaddr(ADDR["outsider"])), boa.reverts("nothing to withdraw"):
        escrow.withdraw(tok.address)
    # The renter can send its credit elsewhere, or wait for the block to lift.
    with boa.env.prank(hexaddr(t.renter)):
        escrow.withdrawTo(tok.address, hexaddr(ADDR["renter2"]))
    assert tok.balanceOf(hexaddr(ADDR["renter2"])) == t.deposit - 1_000
    assert escrow.credits(tok.address, hexaddr(t.renter)) == 0
    assert tok.balanceOf(escrow.address) == 0


REJECTER = """
# pragma version 0.4.3
# pragma evm-version cancun
interface Escrow:
    def recover(terms: Bytes[1]): nonpayable
accept_coin: public(bool)
reenter_target: public(address)
reenter_data: public(Bytes[1024])
reentered: public(bool)

@external
@payable
def __default__():
    if self.reenter_target != empty(address):
        self.reentered = raw_call(self.reenter_target, self.reenter_data, revert_on_failure=False)
    assert self.accept_coin, "rejecting coin"

@external
def configure(accept: bool, target: address, data: Bytes[1024]):
    self.accept_coin = accept
    self.reenter_target = target
    self.reenter_data = data

@external
@payable
def call(target: address, data: Bytes[2048]):
    raw_call(target, data, value=msg.value)
"""


def test_native_recipient_rejecting_or_reentering_gets_credit(escrow):
    wallet = boa.loads(REJECTER)
    t = make_terms(salt=b"contract renter")
    from dataclasses import replace
    t = replace(t, renter=bytes.fromhex(str(wallet.address)[2:]))
    victim = make_terms(salt=b"victim")
    open_agreement(escrow, victim)
    data = escrow.open.prepare_calldata(tup(t), consent(escrow, t))
    with boa.env.prank(hexaddr(ADDR["outsider"])):
        wallet.call(escrow.address, data, value=t.deposit)
    # The wallet re-enters (tries to recover the victim early: not allowed anyway, and locked)
    # and rejects coin: recover's refund push fails and becomes a credit.
    wallet.configure(False, escrow.address, escrow.withdraw.prepare_calldata(ZERO))
    boa.env.time_travel(seconds=t.max_seconds + t.grace + 1)
    escrow.recover(tup(t))
    assert wallet.reentered() is False
    assert escrow.credits(ZERO, wallet.address) == t.deposit
    assert boa.env.get_balance(escrow.address) == t.deposit + victim.deposit
    wallet.configure(True, ZERO, b"")
    with boa.env.prank(hexaddr(ADDR["outsider"])):
        wallet.call(escrow.address, escrow.withdraw.prepare_calldata(ZERO))
    assert boa.env.get_balance(wallet.address) == t.deposit
    assert escrow.credits(ZERO, wallet.address) == 0
    assert boa.env.get_balance(escrow.address) == victim.deposit
