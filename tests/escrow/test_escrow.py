"""Escrow lifecycle: every path to the end of an agreement, access control, revert reasons."""

from __future__ import annotations

import boa
import pytest
from eth_utils import keccak

from protocol.agreement import AGREEMENT_TYPEHASH
from protocol.eth import ZERO_ADDRESS

from .helpers import (
    ADDR, ARBITRATION_TIMEOUT, ZERO, balance, claim, consent, domain_of, hexaddr, make_terms,
    open_agreement, receipt, state, tup,
)

OPEN, CLOSED, CLAIMED, DISPUTED, FINAL = 1, 2, 3, 4, 5


def now() -> int:
    return boa.env.evm.patch.timestamp


def test_domain_separator_and_agreement_id_match_python(escrow):
    t = make_terms()
    assert escrow.domainSeparator() == domain_of(escrow).separator()
    assert escrow.agreementId(tup(t)) == t.agreement_id()


def test_open_native_locks_deposit_and_records_one_slot(escrow):
    t = make_terms()
    before = balance(None, t.renter)
    open_agreement(escrow, t)
    (log,) = [e for e in escrow.get_logs() if type(e).__name__ == "Opened"]
    assert log.agreement_id == t.agreement_id() and log.deposit == t.deposit
    assert log.end == now() + t.max_seconds
    assert balance(None, escrow.address) == t.deposit
    assert balance(None, t.renter) == before - t.deposit
    assert state(escrow, t) == (OPEN, now() + t.max_seconds, 0, 0)


@pytest.mark.parametrize("who", ["provider", "outsider"])
def test_open_only_by_renter(escrow, who):
    t = make_terms()
    with boa.env.prank(hexaddr(ADDR[who])), boa.reverts("only the renter can open"):
        escrow.open(tup(t), consent(escrow, t), value=t.deposit)


@pytest.mark.parametrize("delta", [-1, 1])
def test_open_native_needs_exact_value(escrow, delta):
    t = make_terms()
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("msg.value must equal the deposit"):
        escrow.open(tup(t), consent(escrow, t), value=t.deposit + delta)


def test_open_rejects_consent_not_from_provider(escrow):
    from .helpers import KEYS
    t = make_terms()
    for bad in (consent(escrow, t, KEYS["outsider"]), consent(escrow, t, KEYS["renter"]),
                consent(escrow, make_terms(salt=b"other"))):
        with boa.env.prank(hexaddr(t.renter)), boa.reverts("consent not signed by provider"):
            escrow.open(tup(t), bad, value=t.deposit)


def test_open_twice_rejected_even_after_final(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement id already used"):
        escrow.open(tup(t), consent(escrow, t), value=t.deposit)
    claim(escrow, t, 10)
    assert state(escrow, t)[0] == FINAL
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement id already used"):
        escrow.open(tup(t), consent(escrow, t), value=t.deposit)


def _raw_terms(**over):
    fields = dict(provider=hexaddr(ADDR["provider"]), renter=hexaddr(ADDR["renter"]), token=ZERO,
                  price=10, max_seconds=100, hb=30, grace=600, arbiter=ZERO, window=0,
                  details=keccak(b"x"), open_by=2**64 - 1)
    fields.update(over)
    return tuple(fields.values())


@pytest.mark.parametrize("over, reason", [
    (dict(price=0), "price_per_second is zero"),
    (dict(max_seconds=0), "max_seconds is zero"),
    (dict(arbiter=hexaddr(ADDR["arbiter"])), "arbiter and dispute_window must be set together"),
    (dict(window=60), "arbiter and dispute_window must be set together"),
    (dict(price=2**255, max_seconds=2), "deposit overflows"),
    (dict(max_seconds=2**64 - 1), "end time overflows uint64"),
    (dict(provider=ZERO), "provider is the zero address"),
    (dict(provider=hexaddr(ADDR["renter"])), "provider is the renter"),
])
def test_open_rejects_bad_terms(escrow, over, reason):
    with boa.env.prank(hexaddr(ADDR["renter"])), boa.reverts(reason):
        escrow.open(_raw_terms(**over), b"\x00" * 65, value=0)


def test_claim_without_arbiter_pays_both_at_once(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    p0, r0 = balance(None, t.provider), balance(None, t.renter)
    boa.env.time_travel(seconds=1_000)
    claim(escrow, t, 900)
    (log,) = [e for e in escrow.get_logs() if type(e).__name__ == "Claimed"]
    assert (log.acked_seconds, log.provider_amount, log.settled) == (900, 900 * t.price_per_second, True)
    assert balance(None, t.provider) == p0 + 900 * t.price_per_second
    assert balance(None, t.renter) == r0 + t.deposit - 900 * t.price_per_second
    assert balance(None, escrow.address) == 0
    assert state(escrow, t) == (FINAL, 0, 0, 0)
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("agreement is not open"):
        escrow.claim(tup(t), 900, receipt(escrow, t, 900))
    with boa.reverts("agreement is not open"):
        escrow.recover(tup(t))


def test_claim_full_and_zero(escrow):
    t0, t1 = make_terms(salt=b"0"), make_terms(salt=b"1")
    open_agreement(escrow, t0)
    open_agreement(escrow, t1)
    r0 = balance(None, t0.renter)
    claim(escrow, t0, 0)  # provider ends the rental early with nothing owed
    assert balance(None, t0.renter) == r0 + t0.deposit
    p0 = balance(None, t1.provider)
    claim(escrow, t1, t1.max_seconds)
    assert balance(None, t1.provider) == p0 + t1.deposit
    assert balance(None, escrow.address) == 0


def test_claim_checks(escrow):
    from .helpers import KEYS
    t = make_terms()
    open_agreement(escrow, t)
    for who in ("renter", "outsider", "arbiter"):
        with boa.env.prank(hexaddr(ADDR[who])), boa.reverts("only the provider can claim"):
            escrow.claim(tup(t), 5, receipt(escrow, t, 5))
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("acked_seconds exceeds max_seconds"):
        escrow.claim(tup(t), t.max_seconds + 1, receipt(escrow, t, t.max_seconds + 1))
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("receipt not signed by renter"):
        escrow.claim(tup(t), 5, receipt(escrow, t, 5, KEYS["provider"]))
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("receipt not signed by renter"):
        escrow.claim(tup(t), 6, receipt(escrow, t, 5))  # signed for another amount


def test_claim_deadline_is_end_plus_grace_inclusive(escrow):
    t, u = make_terms(salt=b"t"), make_terms(salt=b"u")
    open_agreement(escrow, t)
    open_agreement(escrow, u)
    boa.env.time_travel(seconds=t.max_seconds + t.grace)
    claim(escrow, t, 10)  # exactly at end + grace: still allowed
    boa.env.time_travel(seconds=1)
    with boa.env.prank(hexaddr(u.provider)), boa.reverts("claim period is over"):
        escrow.claim(tup(u), 10, receipt(escrow, u, 10))


def test_close_then_claim_within_grace(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    boa.env.time_travel(seconds=100)
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("only the renter can close"):
        escrow.close(tup(t))
    with boa.env.prank(hexaddr(t.renter)):
        escrow.close(tup(t))
    assert state(escrow, t) == (CLOSED, now(), 0, 0)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement is not open"):
        escrow.close(tup(t))
    boa.env.time_travel(seconds=t.grace)
    with boa.reverts("claim period not over"):
        escrow.recover(tup(t))
    p0 = balance(None, t.provider)
    claim(escrow, t, 100)
    assert balance(None, t.provider) == p0 + 100 * t.price_per_second


def test_close_then_recover_after_grace(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    with boa.env.prank(hexaddr(t.renter)):
        escrow.close(tup(t))
    boa.env.time_travel(seconds=t.grace + 1)
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("claim period is over"):
        escrow.claim(tup(t), 1, receipt(escrow, t, 1))
    r0 = balance(None, t.renter)
    with boa.env.prank(hexaddr(ADDR["outsider"])):
        escrow.recover(tup(t))
    assert balance(None, t.renter) == r0 + t.deposit
    assert state(escrow, t) == (FINAL, 0, 0, 0)


def test_close_after_end_rejected(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    boa.env.time_travel(seconds=t.max_seconds)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement already ended"):
        escrow.close(tup(t))


def test_recover_after_end_plus_grace_by_anyone(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    boa.env.time_travel(seconds=t.max_seconds + t.grace)
    with boa.reverts("claim period not over"):
        escrow.recover(tup(t))
    boa.env.time_travel(seconds=1)
    r0, o0 = balance(None, t.renter), balance(None, ADDR["outsider"])
    with boa.env.prank(hexaddr(ADDR["outsider"])):
        escrow.recover(tup(t))
    assert balance(None, t.renter) == r0 + t.deposit
    assert balance(None, ADDR["outsider"]) == o0  # the caller gains nothing
    with boa.reverts("agreement is not open"):
        escrow.recover(tup(t))


def test_unknown_agreement_rejected_everywhere(escrow):
    t = make_terms()
    with boa.env.prank(hexaddr(t.provider)), boa.reverts("agreement is not open"):
        escrow.claim(tup(t), 1, receipt(escrow, t, 1))
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement is not open"):
        escrow.close(tup(t))
    with boa.reverts("agreement is not open"):
        escrow.recover(tup(t))
    with boa.reverts("agreement is not claimed or disputed"):
        escrow.finalize(tup(t))


# ------------------------------------------------------------------- with an arbiter

def arb_terms(window=3_600, **kw):
    return make_terms(arbiter=ADDR["arbiter"], window=window, **kw)


def test_claim_with_arbiter_waits_for_window_then_finalize(escrow):
    t = arb_terms()
    open_agreement(escrow, t)
    end = now() + t.max_seconds
    claim(escrow, t, 1_000)
    assert state(escrow, t) == (CLAIMED, end, 1_000, now())
    assert balance(None, escrow.address) == t.deposit  # nothing paid yet
    boa.env.time_travel(seconds=t.dispute_window)
    with boa.reverts("dispute window not over"):
        escrow.finalize(tup(t))
    boa.env.time_travel(seconds=1)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("dispute window is over"):
        escrow.dispute(tup(t))
    p0, r0 = balance(None, t.provider), balance(None, t.renter)
    with boa.env.prank(hexaddr(ADDR["outsider"])):
        escrow.finalize(tup(t))
    assert balance(None, t.provider) == p0 + 1_000 * t.price_per_second
    assert balance(None, t.renter) == r0 + t.deposit - 1_000 * t.price_per_second
    assert state(escrow, t)[0] == FINAL
    with boa.reverts("agreement is not claimed or disputed"):
        escrow.finalize(tup(t))


@pytest.mark.parametrize("disputer", ["renter", "provider"])
def test_dispute_then_arbitrate(escrow, disputer):
    t = arb_terms()
    open_agreement(escrow, t)
    claim(escrow, t, 1_000)
    with boa.env.prank(hexaddr(ADDR["outsider"])), boa.reverts("only a party can dispute"):
        escrow.dispute(tup(t))
    with boa.env.prank(hexaddr(t.arbiter)), boa.reverts("agreement is not disputed"):
        escrow.arbitrate(tup(t), 0)
    boa.env.time_travel(seconds=t.dispute_window)  # last second of the window
    with boa.env.prank(hexaddr(ADDR[disputer])):
        escrow.dispute(tup(t))
    assert state(escrow, t)[0] == DISPUTED
    with boa.env.prank(hexaddr(ADDR[disputer])), boa.reverts("agreement is not claimed"):
        escrow.dispute(tup(t))
    with boa.reverts("arbitration period not over"):
        escrow.finalize(tup(t))
    for who in ("provider", "renter", "outsider"):
        with boa.env.prank(hexaddr(ADDR[who])), boa.reverts("only the arbiter can arbitrate"):
            escrow.arbitrate(tup(t), 0)
    with boa.env.prank(hexaddr(t.arbiter)), boa.reverts("provider_amount exceeds the deposit"):
        escrow.arbitrate(tup(t), t.deposit + 1)
    p0, r0, a0 = balance(None, t.provider), balance(None, t.renter), balance(None, t.arbiter)
    with boa.env.prank(hexaddr(t.arbiter)):
        escrow.arbitrate(tup(t), 12_345)
    assert balance(None, t.provider) == p0 + 12_345
    assert balance(None, t.renter) == r0 + t.deposit - 12_345
    assert balance(None, t.arbiter) == a0
    assert state(escrow, t)[0] == FINAL
    with boa.env.prank(hexaddr(t.arbiter)), boa.reverts("agreement is not disputed"):
        escrow.arbitrate(tup(t), 0)


def test_absent_arbiter_finalize_after_timeout_pays_claim(escrow):
    t = arb_terms()
    open_agreement(escrow, t)
    claim(escrow, t, 2_000)
    with boa.env.prank(hexaddr(t.renter)):
        escrow.dispute(tup(t))
    boa.env.time_travel(seconds=ARBITRATION_TIMEOUT)
    with boa.reverts("arbitration period not over"):
        escrow.finalize(tup(t))
    boa.env.time_travel(seconds=1)
    with boa.env.prank(hexaddr(t.arbiter)), boa.reverts("arbitration period is over"):
        escrow.arbitrate(tup(t), 0)
    p0 = balance(None, t.provider)
    escrow.finalize(tup(t))
    assert balance(None, t.provider) == p0 + 2_000 * t.price_per_second
    assert balance(None, escrow.address) == 0


def test_arbiter_terms_claim_window_and_recover_still_apply(escrow):
    t = arb_terms()
    open_agreement(escrow, t)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement is not claimed"):
        escrow.dispute(tup(t))
    boa.env.time_travel(seconds=t.max_seconds + t.grace + 1)
    r0 = balance(None, t.renter)
    escrow.recover(tup(t))
    assert balance(None, t.renter) == r0 + t.deposit


def test_claimed_agreement_cannot_be_closed_or_recovered(escrow):
    t = arb_terms()
    open_agreement(escrow, t)
    claim(escrow, t, 1)
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("agreement is not open"):
        escrow.close(tup(t))
    boa.env.time_travel(seconds=t.max_seconds + t.grace + 1)
    with boa.reverts("agreement is not open"):
        escrow.recover(tup(t))


def test_withdraw_without_credit(escrow):
    with boa.reverts("nothing to withdraw"):
        escrow.withdraw(ZERO)
    with boa.reverts("to is the zero address"):
        escrow.withdrawTo(ZERO, ZERO)
