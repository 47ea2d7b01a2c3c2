"""Interruptible agreements: the preemption notice on the rental stream, settlement at the notice's
stop, and the provider's faults the evidence proves (specs/heartbeat.md, "Preemption")."""

import dataclasses
import random

import pytest

from protocol.effects import EscrowCall, Persist, Report, Send
from protocol.errors import LocalProtocolError
from protocol.evidence import (NOTICE_BACKDATED, NOTICE_ON_DEMAND, SHORT_NOTICE, STOPPED_EARLY,
                               build_bundle, verify_bundle)
from protocol.messages import Heartbeat, PreemptionNotice, PreemptionReason, UsageReceipt
from protocol.reputation import AgreementOutcome, score_provider
from protocol.rental import ProviderRental, RenterRental, State
from protocol.settlement import claim_payout, recover_payout

from tests.rental_fixtures import TEST_PARAMS, RentalPair, make_agreement

T0 = 1_700_000_000_000
TOL = TEST_PARAMS.heartbeat_late_tolerance_ms
N = TEST_PARAMS.provider_stop_after_missed_receipts
POWER = PreemptionReason.POWER_PRICE


def machines(a, seed=3):
    p = ProviderRental(a.terms, a.details, a.domain, a.provider, T0, TEST_PARAMS)
    r = RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key, T0,
                     random.Random(seed), TEST_PARAMS)
    return p, r


def reports(pair, side, event):
    return [e.detail for s, _, e in pair.reports if s == side and isinstance(e, Report) and e.event == event]


def verdict_of(pair, sides=("provider", "renter")):
    a = pair.a
    return verify_bundle(build_bundle(
        a.terms, a.details, a.provider_binding, a.renter_binding, T0 // 1000,
        *([b for side in sides for b in pair.records(side, kind)]
          for kind in ("heartbeat", "receipt", "notice")),
    ), TEST_PARAMS)


def forged_notice(a, sent_ms, stop_ms, after=b"\x00" * 32):
    return PreemptionNotice(a.agreement_id, stop_ms, int(POWER), "price spike", after,
                            sent_ms).sign(a.provider)


# ---------------------------------------------------------------------------------------------
# The honest path


def test_preemption__renter_pays_exactly_to_the_stop_and_settles_at_once():
    a = make_agreement(max_seconds=600, interval=10, notice_s=60)
    pair = RentalPair(a, preempt=(T0 + 100_000, T0 + 160_000, POWER)).run()
    # Served until the stop, and paid exactly that: 160 s of 600, the rest back to the renter.
    assert pair.service_stopped_ms == T0 + 160_000
    assert pair.payout == claim_payout(a.terms, 160)
    assert pair.payout.renter == a.terms.price_per_second * (600 - 160)
    # Settled by the provider's claim on the final receipt at the stop: no close, no waiting
    # out the claim period (the escrow pays a claim at once when there is no arbiter).
    assert [(side, c.method) for side, _, c in pair.escrow_calls] == [("provider", "claim")]
    assert pair.escrow_calls[0][1] == T0 + 160_000
    assert pair.provider.state == "done" and pair.renter.state == "done"
    (notice,) = reports(pair, "renter", "preemption_notice")
    assert notice["stop_ms"] == T0 + 160_000 and not notice["short"] and not notice["late"]
    # The claim settled before the renter's own end-of-notice timer: noticed -> done.
    assert reports(pair, "renter", "settled") == [{"acked_seconds": 160}]
    v = verdict_of(pair)
    assert v.notice is not None and v.notice.stop_ms == T0 + 160_000 and v.notice_faults == ()
    assert v.acked_seconds == 160 and v.invalid == ()


def test_preemption__notice_binds_into_the_heartbeat_chain():
    a = make_agreement(notice_s=60)
    p, _ = machines(a)
    p.on_timer(T0)
    fx = p.preempt(T0 + 1_000, T0 + 61_000, POWER, "price 412 USD/MWh")
    assert [type(e) for e in fx] == [Persist, Send, Report]  # stored before it leaves
    n = fx[1].message
    assert isinstance(n, PreemptionNotice) and n.signature_valid(a.provider.public)
    assert n.after_heartbeat == p.sent[-1] and n.notice_ms == 60_000 and p.state == "notice"
    assert p.next_deadline() == T0 + 10_000  # heartbeats go on
    with pytest.raises(LocalProtocolError) as err:
        p.preempt(T0 + 2_000, T0 + 90_000, POWER)  # one notice per agreement
    assert err.value.code == "bad_transition"


@pytest.mark.parametrize("notice_s, stop, code", [
    (0, 70_000, "not_interruptible"),
    (60, 59_999, "notice_too_short"),
    (60, 600_000, "after_end"),
])
def test_preemption__provider_refuses_to_break_its_promise(notice_s, stop, code):
    a = make_agreement(max_seconds=600, notice_s=notice_s)
    p, _ = machines(a)
    with pytest.raises(LocalProtocolError) as err:
        p.preempt(T0, T0 + stop, POWER)
    assert err.value.code == code and p.state == "serving"


# ---------------------------------------------------------------------------------------------
# The checks' edges: late, short, forged, repeated notices


def test_preemption__notice_arriving_late__applied_reported_late_and_still_paid_to_the_stop():
    a = make_agreement(notice_s=60)
    pair = RentalPair(a, preempt=(T0 + 100_000, T0 + 160_000, POWER), notice_delay_ms=45_000).run()
    (notice,) = reports(pair, "renter", "preemption_notice")
    # Signed times promise 60 s (not short: no fault); it arrived with 15 s left (late).
    assert notice["late"] and not notice["short"] and notice["remaining_ms"] == 15_000
    assert pair.payout == claim_payout(a.terms, 160)
    assert verdict_of(pair).notice_faults == ()


def test_preemption__short_notice__renter_stops_paying_at_the_stop_and_evidence_proves_it():
    a = make_agreement(notice_s=60)
    p, r = machines(a)
    hb = p.on_timer(T0)[1].message
    r.receive_data(hb.encode(), T0)
    short = forged_notice(a, T0 + 5_000, T0 + 25_000, after=p.sent[-1])
    fx = r.receive_data(short.encode(), T0 + 5_000)
    (rep,) = [e for e in fx if isinstance(e, Report)]
    assert rep.event == "preemption_notice" and rep.detail["short"] and r.state == "noticed"
    assert r.next_deadline() == T0 + 25_000 + TOL
    fx = r.on_timer(T0 + 25_000 + TOL)
    assert r.state == "preempted" and fx[0].event == "preempted"
    v = verify_bundle(build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding,
                                   T0 // 1000, [hb.encode()], [], [short.encode()]), TEST_PARAMS)
    assert SHORT_NOTICE in v.notice_faults


def test_preemption__backdated_notice_is_a_fault():
    a = make_agreement(notice_s=60)
    p, _ = machines(a)
    hbs = [p.on_timer(T0 + k * 10_000)[1].message for k in range(3)]
    # Says it follows heartbeat 2 (sent at +20 s) but claims to be sent at +5 s.
    n = forged_notice(a, T0 + 5_000, T0 + 65_000, after=p.sent[2])
    v = verify_bundle(build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding,
                                   T0 // 1000, [h.encode() for h in hbs], [], [n.encode()]), TEST_PARAMS)
    assert NOTICE_BACKDATED in v.notice_faults and SHORT_NOTICE not in v.notice_faults


@pytest.mark.parametrize("make, code", [
    (lambda a: dataclasses.replace(forged_notice(a, T0, T0 + 60_000), stop_ms=T0 + 61_000), "bad_signature"),
    (lambda a: PreemptionNotice(b"\x01" * 32, T0 + 60_000, 1, "", b"\x00" * 32, T0).sign(a.provider), "wrong_agreement"),
    (lambda a: forged_notice(a, T0 + 60_000, T0 + 120_000), "from_future"),
    (lambda a: forged_notice(a, T0, T0 - 1), "bad_stop"),
])
def test_preemption__bad_notice__rejected_and_rental_unchanged(make, code):
    a = make_agreement(notice_s=60)
    _, r = machines(a)
    fx = r.receive_data(make(a).encode(), T0)
    assert [(e.event, e.detail["code"], e.detail["verdict"]) for e in fx] == [("notice_rejected", code, "reject")]
    assert r.state == "active" and r.notice is None and r.rejections[code] == 1


def test_preemption__notice_in_an_on_demand_agreement__rejected_and_evidence_shows_the_fault():
    a = make_agreement(notice_s=0)
    p, r = machines(a)
    n = forged_notice(a, T0, T0 + 60_000)
    fx = r.receive_data(n.encode(), T0)
    assert fx[0].detail["code"] == "not_interruptible" and r.state == "active"
    v = verify_bundle(build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding,
                                   T0 // 1000, [], [], [n.encode()]), TEST_PARAMS)
    assert v.notice_faults == (NOTICE_ON_DEMAND,)


def test_preemption__an_earlier_stop_binds_a_later_one_is_ignored():
    a = make_agreement(notice_s=60)
    _, r = machines(a)
    r.receive_data(forged_notice(a, T0, T0 + 90_000).encode(), T0)
    fx = r.receive_data(forged_notice(a, T0 + 1_000, T0 + 120_000).encode(), T0 + 1_000)
    assert fx[0].detail == {"code": "notice_not_earlier", "verdict": "ignore",
                            "detail": "the notice held already stops no later"}
    r.receive_data(forged_notice(a, T0 + 2_000, T0 + 80_000).encode(), T0 + 2_000)
    assert r.service_end_ms == T0 + 80_000 and r.notice.stop_ms == T0 + 80_000


# ---------------------------------------------------------------------------------------------
# One side stops keeping its part


def test_preemption__provider_stops_before_the_notice_time__renter_pays_only_what_came_and_fault_proven():
    a = make_agreement(max_seconds=600, interval=10, notice_s=60)
    pair = RentalPair(a, preempt=(T0 + 100_000, T0 + 160_000, POWER),
                      provider_crash_ms=T0 + 125_000).run()
    # Heartbeats up to +120 s were acknowledged; then nothing. The renter waited for the stop,
    # closed when no claim came, and recovered everything (the provider never claimed).
    assert pair.renter.acked_seconds == 120
    assert [(s, c.method) for s, _, c in pair.escrow_calls] == [("renter", "close"), ("renter", "recover")]
    assert pair.escrow_calls[0][1] == T0 + 160_000 + a.terms.grace * 1000 // 2
    assert pair.payout == recover_payout(a.terms)
    v = verdict_of(pair)
    assert v.notice_faults == (STOPPED_EARLY,) and v.last_heartbeat_ms == T0 + 120_000
    # ... and the reputation counts the agreement as failed, whatever was acknowledged.
    outcome = AgreementOutcome.from_verdict(v, a.provider.public, T0 // 1000, T0 // 1000 + 160)
    s = score_provider(a.provider.public, [outcome])
    assert s.failures == 1 and s.notice_faults == 1 and s.score < 0.5


def test_preemption__renter_withholds_receipts_after_the_notice__provider_stops_claims_no_fault():
    a = make_agreement(max_seconds=600, interval=10, notice_s=60)
    pair = RentalPair(a, preempt=(T0 + 100_000, T0 + 160_000, POWER))
    pair.drop = lambda d, i: d == "r2p" and pair.renter.state == "noticed"
    pair.run()
    # The notice left just before the heartbeat at +100 s, so the last receipt answered the one
    # at +90 s; N unanswered intervals later the provider stops (before the notice's stop) and
    # claims what it holds.
    assert reports(pair, "provider", "renter_stopped_paying") == [{"acked_seconds": 90}]
    assert pair.service_stopped_ms == T0 + 90_000 + N * 10_000 + TOL < T0 + 160_000
    assert pair.payout == claim_payout(a.terms, 90)
    # What the provider received (the renter kept its receipts back; its own store is not
    # evidence of receipts it never sent). Receipts lost in transit N times in a row would look
    # the same to the provider, which is why it stops (specs/evidence.md, "Preemption").
    v = verdict_of(pair, sides=("provider",))
    assert v.notice_faults == ()  # the renter stopped answering: trailing unanswered heartbeats
    assert v.divergence.kind == "trailing_unanswered"


def test_preemption__renter_stop_while_noticed_closes():
    a = make_agreement(max_seconds=600, interval=10, notice_s=60)
    pair = RentalPair(a, preempt=(T0 + 100_000, T0 + 160_000, POWER), renter_stop_ms=T0 + 130_000).run()
    assert [(s, c.method) for s, _, c in pair.escrow_calls][:2] == [("renter", "close"), ("provider", "claim")]
    assert pair.payout == claim_payout(a.terms, 120)  # the last heartbeat acknowledged


# ---------------------------------------------------------------------------------------------
# Restart


def test_preemption__both_sides_restore_the_notice():
    a = make_agreement(max_seconds=600, interval=10, notice_s=60)
    p, r = machines(a)
    hb = p.on_timer(T0)[1].message
    rc = [e.message for e in r.receive_data(hb.encode(), T0) if isinstance(e, Send)][0]
    p.receive_data(rc.encode(), T0)
    n = p.preempt(T0 + 1_000, T0 + 61_000, POWER)[1].message
    r.receive_data(n.encode(), T0 + 1_000)
    p2 = ProviderRental.restore(a.terms, a.details, a.domain, a.provider, T0, TEST_PARAMS,
                                heartbeats=[hb], latest_receipt=rc, now_ms=T0 + 2_000, notice=n)
    assert p2.state == "notice" and p2.next_deadline() == T0 + 10_000
    r2 = RenterRental.restore(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key, T0,
                              random.Random(1), TEST_PARAMS, heartbeats=[(hb, T0)], receipts=[rc],
                              notices=[n])
    assert r2.state == "noticed" and r2.service_end_ms == T0 + 61_000
    assert p2.on_timer(T0 + 61_000)[0].reason == "preempted" and p2.state == "finishing"


# ---------------------------------------------------------------------------------------------
# The remaining renter rows, one by one


def _noticed(a, stop_ms=T0 + 90_000):
    p, r = machines(a)
    hb = p.on_timer(T0)[1].message
    r.receive_data(hb.encode(), T0)
    r.receive_data(forged_notice(a, T0 + 1_000, stop_ms, after=p.sent[-1]).encode(), T0 + 1_000)
    assert r.state == "noticed"
    return p, r


def test_preemption__silent_renter_takes_a_notice():
    a = make_agreement(notice_s=60)
    p, r = machines(a)
    r.receive_data(p.on_timer(T0)[1].message.encode(), T0)
    r.on_timer(r.next_deadline())
    assert r.state == "silent"
    r.receive_data(forged_notice(a, T0 + 20_000, T0 + 80_000).encode(), T0 + 20_000)
    assert r.state == "noticed" and r.service_end_ms == T0 + 80_000


def test_preemption__access_grant_while_noticed_is_kept():
    from protocol.messages import AccessGrant

    a = make_agreement(notice_s=60)
    _, r = _noticed(a)
    fx = r.receive_data(AccessGrant(a.agreement_id, "ssh gpu@10.0.0.2", T0 + 2_000).sign(a.provider).encode(), T0 + 2_000)
    assert r.access == "ssh gpu@10.0.0.2" and fx[0].event == "access_granted" and r.state == "noticed"


def test_preemption__long_silence_after_a_long_notice_closes():
    a = make_agreement(max_seconds=6000, interval=10, notice_s=3000)
    _, r = _noticed(a, stop_ms=T0 + 4_000_000)
    silence = (TEST_PARAMS.renter_heartbeat_timeout_intervals + N) * 10_000
    assert r.next_deadline() == T0 + silence  # the silence comes before the notice's stop
    fx = r.on_timer(T0 + silence)
    assert r.state == "closed" and isinstance(fx[0], EscrowCall) and fx[0].method == "close"


def test_preemption__preempted_renter_settles_on_the_claim():
    a = make_agreement(notice_s=60)
    _, r = _noticed(a, stop_ms=T0 + 61_000)
    r.on_timer(T0 + 61_000 + TOL)
    assert r.state == "preempted" and r.next_deadline() == T0 + 61_000 + a.terms.grace * 500
    fx = r.escrow_settled(T0 + 62_000 + TOL)
    assert r.state == "done" and fx[0].event == "settled"


# ---------------------------------------------------------------------------------------------
# Tampering, and a random sweep of when the notice comes and whether its messages are late

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_SPOT = make_agreement(11, max_seconds=600, interval=10, notice_s=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_preemption__any_single_byte_change_to_a_notice_is_rejected_and_changes_nothing(data):
    a = _SPOT
    _, r = machines(a)
    wire = forged_notice(a, T0, T0 + 60_000).encode()
    i = data.draw(st.integers(0, len(wire) - 1))
    v = data.draw(st.integers(0, 255).filter(lambda v: v != wire[i]))
    fx = r.receive_data(wire[:i] + bytes([v]) + wire[i + 1:], T0)
    assert [e.event for e in fx] in (["notice_rejected"], ["heartbeat_rejected"])
    assert r.state == "active" and r.notice is None and r.service_end_ms == r.end_ms


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(at_s=st.integers(0, 500), extra_s=st.integers(0, 30), delay_ms=st.integers(0, 1_500),
       notice_delay_ms=st.integers(0, 50_000))
def test_preemption__random_notice_times_and_delays__paid_exactly_the_served_seconds(at_s, extra_s, delay_ms,
                                                                                  notice_delay_ms):
    a = _SPOT
    stop_ms = T0 + (at_s + 60 + extra_s) * 1000
    pair = RentalPair(a, preempt=(T0 + at_s * 1000, stop_ms, POWER),
                      delay_ms=lambda d, i: delay_ms, notice_delay_ms=notice_delay_ms).run()
    if stop_ms >= T0 + 600_000:  # the agreement ends first: the provider refuses such a notice
        assert pair.payout == claim_payout(a.terms, 600) and pair.provider.notice is None
        return
    # The final heartbeat at the stop is acknowledged: the renter pays the seconds until the
    # stop, never more, and at most one delay's worth less (the first heartbeat's delay).
    acked = pair.payout.provider // a.terms.price_per_second
    served_s = (stop_ms - T0) // 1000
    assert served_s - 2 <= acked <= served_s
    assert pair.payout.renter == a.terms.deposit - pair.payout.provider
    assert [(s, c.method) for s, _, c in pair.escrow_calls] == [("provider", "claim")]
    assert verdict_of(pair).notice_faults == ()
