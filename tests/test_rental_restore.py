"""Rebuilding the rental machines from their own stored records (ProviderRental.restore,
RenterRental.restore): a node killed at any moment resumes the rental where its store left it."""

import random

import pytest

from protocol.effects import EscrowCall, Persist, Send
from protocol.errors import LocalProtocolError
from protocol.messages import Heartbeat, UsageReceipt
from protocol.rental import ProviderRental, RenterRental

from tests.rental_fixtures import TEST_PARAMS, make_agreement

T0 = 1_700_000_000_000
S = 1000


class Side:
    """One machine plus what it stored (as a node's store would hold it)."""

    def __init__(self, machine):
        self.m = machine
        self.heartbeats: list[tuple[Heartbeat, int]] = []
        self.receipts: list[UsageReceipt] = []
        self.calls: list[EscrowCall] = []

    def apply(self, effects, now):
        out = []
        for e in effects:
            if isinstance(e, Persist):
                (self.heartbeats.append((e.message, now)) if isinstance(e.message, Heartbeat)
                 else self.receipts.append(e.message))
            elif isinstance(e, Send):
                out.append(e.message.encode())
            elif isinstance(e, EscrowCall):
                self.calls.append(e)
        return out


def pair(a, seed=3):
    p = Side(ProviderRental(a.terms, a.details, a.domain, a.provider, T0, TEST_PARAMS))
    r = Side(RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key, T0,
                          random.Random(seed), TEST_PARAMS))
    p.apply(p.m.start(), T0)
    return p, r


def tick(p, r, now, *, deliver_hb=True, deliver_rc=True):
    """Provider timer at `now`; its heartbeat to the renter; the receipt back."""
    for hb in p.apply(p.m.on_timer(now), now):
        if not deliver_hb:
            continue
        for rc in r.apply(r.m.receive_data(hb, now), now):
            if deliver_rc:
                p.apply(p.m.receive_data(rc, now), now)


def restored_provider(a, p, now):
    latest = max(p.receipts, key=lambda rc: rc.heartbeat_seq, default=None)
    m = ProviderRental.restore(a.terms, a.details, a.domain, a.provider, T0, TEST_PARAMS,
                               heartbeats=[hb for hb, _ in p.heartbeats], latest_receipt=latest,
                               now_ms=now)
    side = Side(m)
    side.heartbeats, side.receipts = list(p.heartbeats), list(p.receipts)
    return side


def restored_renter(a, r, *, closed_ms=None, seed=99):
    m = RenterRental.restore(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key, T0,
                             random.Random(seed), TEST_PARAMS, heartbeats=r.heartbeats,
                             receipts=r.receipts, closed_ms=closed_ms)
    side = Side(m)
    side.heartbeats, side.receipts = list(r.heartbeats), list(r.receipts)
    return side


def test_provider_restore__unsent_heartbeat_and_restart__rental_runs_to_full_claim():
    a = make_agreement(max_seconds=60, interval=10)
    p, r = pair(a)
    for k in range(3):
        tick(p, r, T0 + k * 10 * S)
    tick(p, r, T0 + 30 * S, deliver_hb=False)  # stored, then the process died before Send
    p = restored_provider(a, p, T0 + 33 * S)
    assert p.m.state == "serving" and len(p.m.sent) == 4 and p.m.next_deadline() == T0 + 40 * S
    for t in (40, 50, 60):
        tick(p, r, T0 + t * S)
    assert p.m.state == "done" and r.m.rejections == {} and p.m.rejections == {}
    # the gap over the lost heartbeat 3 is capped at I + tol; the rest is paid in full
    cap_s = (10 * S + TEST_PARAMS.heartbeat_late_tolerance_ms) // S
    assert p.calls[-1].args["acked_seconds"] == 20 + cap_s + 20
    assert [hb.seq for hb, _ in r.heartbeats] == [0, 1, 2, 4, 5, 6]


def test_provider_restore__stop_timer_restarts_at_restore_and_claims_the_stored_receipt():
    a = make_agreement(max_seconds=600, interval=10)
    p, r = pair(a)
    for k in range(4):
        tick(p, r, T0 + k * 10 * S)
    restart = T0 + 200 * S  # down long after the renter stopped paying
    p = restored_provider(a, p, restart)
    n = TEST_PARAMS.provider_stop_after_missed_receipts
    assert p.m.stop_deadline_ms() == restart + n * 10 * S + TEST_PARAMS.heartbeat_late_tolerance_ms
    now, beats = restart, 0
    for _ in range(10):  # the driver: on_timer at max(clock, deadline)
        if p.m.state == "done":
            break
        now = max(now, p.m.next_deadline())
        beats += len(p.apply(p.m.on_timer(now), now))
    assert p.m.state == "done" and now == p.m.stop_deadline_ms()
    assert beats == 4  # heartbeats at restart + 0, 10, 20, 30 s went unanswered
    assert p.calls == [EscrowCall("claim", a.agreement_id, {
        "acked_seconds": 30, "receipt_sig": r.receipts[-1].wallet_sig})]


def test_renter_restore__receipt_stored_but_lost__older_nonce_still_accepted():
    a = make_agreement(max_seconds=60, interval=10)
    p, r = pair(a)
    for k in range(3):
        tick(p, r, T0 + k * 10 * S)
    tick(p, r, T0 + 30 * S, deliver_rc=False)  # stored and signed, never reached the provider
    before = r.m.acked_seconds
    r = restored_renter(a, r)
    assert r.m.acked_seconds == before == 30 and r.m.last_seq == 3
    assert len(r.m.nonces) == 2  # the nonce heartbeat 3 echoed, and the one we issued after it
    for t in (40, 50, 60):
        tick(p, r, T0 + t * S)
    assert r.m.rejections == {} and p.m.rejections == {}
    assert p.m.state == "done" and p.calls[-1].args["acked_seconds"] == 60


def test_renter_restore__acked_seconds_never_below_the_last_signed_receipt():
    a = make_agreement(max_seconds=60, interval=10)
    p, r = pair(a)
    for k in range(3):
        tick(p, r, T0 + k * 10 * S)
    # accept times lost their precision on disk: the replay must not undercut what we signed
    r.heartbeats = [(hb, t - 1) if i == 2 else (hb, t) for i, (hb, t) in enumerate(r.heartbeats)]
    again = restored_renter(a, r)
    assert again.m.acked_seconds == r.m.acked_seconds == 20


def test_renter_restore__nonce_issued_by_a_receipt_never_stored_is_rejected():
    a = make_agreement(max_seconds=60, interval=10)
    p, r = pair(a)
    for k in range(3):
        tick(p, r, T0 + k * 10 * S)
    forgotten = r.receipts.pop()  # as if the crash came before its Persist: it was never sent
    again = restored_renter(a, r)
    assert forgotten.next_nonce not in again.m.nonces
    assert r.receipts[-1].next_nonce in again.m.nonces


def test_renter_restore__closed_escrow__recovers_after_grace():
    a = make_agreement(max_seconds=600, interval=10, grace=30)
    p, r = pair(a)
    tick(p, r, T0)
    closed = T0 + 5 * S
    r = restored_renter(a, r, closed_ms=closed)
    due = closed + 30 * S + S + TEST_PARAMS.clock_skew_ms
    assert r.m.state == "closed" and r.m.next_deadline() == due
    assert r.m.on_timer(due) == [EscrowCall("recover", a.agreement_id)]


def test_restore__records_of_another_agreement_are_a_local_error():
    a, b = make_agreement(1, max_seconds=60, interval=10), make_agreement(2, max_seconds=60, interval=10)
    p, r = pair(b)
    tick(p, r, T0)
    with pytest.raises(LocalProtocolError):
        restored_provider(a, p, T0 + S)
    with pytest.raises(LocalProtocolError):
        restored_renter(a, r)
