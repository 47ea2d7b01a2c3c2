import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.effects import EscrowCall, Persist, Report, Send, StartService, StopService
from protocol.errors import LocalProtocolError
from protocol.identity import PeerKey
from protocol.messages import AccessGrant, GpuMetrics, Heartbeat, UsageReceipt
from protocol.rental import (ZERO_HASH, Event, ProviderRental, RenterRental, State, heartbeat_hash,
                             initial_nonce)
from protocol.agreement import sign_receipt
from protocol.settlement import claim_payout, recover_payout

from tests.rental_fixtures import TEST_PARAMS, RentalPair, make_agreement

T0 = 1_700_000_000_000
N = TEST_PARAMS.provider_stop_after_missed_receipts
TOL = TEST_PARAMS.heartbeat_late_tolerance_ms


def machines(a, params=TEST_PARAMS, seed=3):
    p = ProviderRental(a.terms, a.details, a.domain, a.provider, T0, params)
    r = RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key, T0,
                     random.Random(seed), params)
    return p, r


def sent(effects, cls):
    return [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, cls)]


def rejected_codes(effects):
    return [e.detail["code"] for e in effects if isinstance(e, Report) and e.event.endswith("_rejected")]


def exchange(p, r, now):
    """Provider timer at `now`, heartbeat delivered as bytes, receipt delivered back."""
    hb_fx = p.on_timer(now)
    hb = sent(hb_fx, Heartbeat)[0]
    r_fx = r.receive_data(hb.encode(), now)
    rc = sent(r_fx, UsageReceipt)[0]
    p_fx = p.receive_data(rc.encode(), now)
    return hb_fx, r_fx, p_fx


# ---------------------------------------------------------------------------------------------
# The happy path


def test_rental__full_term_pays_full_deposit_and_both_sides_settle():
    a = make_agreement(max_seconds=600, interval=10)
    pair = RentalPair(a).run()
    assert pair.payout == claim_payout(a.terms, 600)
    assert pair.provider.state == "done" and pair.renter.state == "done"
    assert pair.provider.rejections == {} and pair.renter.rejections == {}
    # 60 slot heartbeats plus the final one at the end, each stored by both sides.
    assert len(pair.records("provider", "heartbeat")) == 61
    assert pair.records("renter", "heartbeat") == pair.records("provider", "heartbeat")
    assert pair.records("renter", "receipt") == pair.records("provider", "receipt")
    assert [c[2].method for c in pair.escrow_calls] == ["claim"]


def test_provider__heartbeats_chain_and_echo_nonces_store_before_send():
    a = make_agreement()
    p, r = machines(a)
    assert p.start() == [StartService(p.agreement_id)]
    assert p.next_deadline() == T0
    hb_fx, r_fx, p_fx = exchange(p, r, T0)
    assert isinstance(hb_fx[0], Persist) and isinstance(hb_fx[1], Send)
    hb0 = hb_fx[0].message
    assert (hb0.seq, hb0.prev_hash, hb0.nonce) == (0, ZERO_HASH, initial_nonce(p.agreement_id))
    assert [type(e) for e in r_fx] == [Persist, Persist, Send]  # heartbeat, receipt, then send
    receipt = r_fx[2].message
    assert receipt.acked_seconds == 0 and receipt.heartbeat_hash == heartbeat_hash(hb0)
    assert p_fx == [Persist("receipt", p.agreement_id, receipt)]
    # Next heartbeat: one interval later, links to the first, echoes the renter's new nonce.
    assert p.next_deadline() == T0 + 10_000
    hb_fx, r_fx, _ = exchange(p, r, T0 + 10_000)
    hb1 = hb_fx[0].message
    assert (hb1.seq, hb1.prev_hash, hb1.nonce) == (1, heartbeat_hash(hb0), receipt.next_nonce)
    assert r_fx[2].message.acked_seconds == 10


def test_provider__metrics_snapshot_is_carried_in_the_heartbeat():
    a = make_agreement(gpu_count=2)
    p, _ = machines(a)
    snap = tuple(GpuMetrics(g, 97, 20000, 71, 300_000) for g in a.details.gpus)
    p.set_metrics(snap)
    assert sent(p.on_timer(T0), Heartbeat)[0].metrics == snap
    with pytest.raises(LocalProtocolError):
        p.set_metrics(["not metrics"])


def test_provider__timer_skips_missed_slots_without_drift():
    a = make_agreement(interval=10)
    p, _ = machines(a, TEST_PARAMS.replace(provider_stop_after_missed_receipts=10))
    p.on_timer(T0)
    p.on_timer(T0 + 35_000)  # the driver woke late: one heartbeat, then back on the grid
    assert p.next_deadline() == T0 + 40_000


def test_renter__gap_from_a_dropped_heartbeat_is_not_paid():
    a = make_agreement(max_seconds=100, interval=10)
    pair = RentalPair(a, drop=lambda d, i: d == "p2r" and i == 3).run()
    cap_s = 10 + TEST_PARAMS.heartbeat_late_tolerance_ms // 1000
    assert pair.payout == claim_payout(a.terms, 100 - (20 - cap_s))


def test_renter__lost_receipt_does_not_end_the_rental():
    # The provider keeps echoing the older nonce; the renter still accepts it.
    a = make_agreement(max_seconds=100, interval=10)
    pair = RentalPair(a, drop=lambda d, i: d == "r2p" and i in (2, 5, 6)).run()
    assert pair.renter.rejections == {}
    assert pair.payout == claim_payout(a.terms, 100)


# ---------------------------------------------------------------------------------------------
# Stopping


def test_provider__renter_vanishes__stops_after_missed_receipts_and_claims_latest():
    a = make_agreement(max_seconds=600, interval=10)
    pair = RentalPair(a, renter_vanish_ms=T0 + 95_000).run()
    # Last receipt answers the heartbeat at T0+90s and acks 90 s; the provider stops 3 intervals later.
    assert pair.service_stopped_ms == T0 + 90_000 + N * 10_000 + TOL
    assert pair.payout == claim_payout(a.terms, 90)
    side, _, call = pair.escrow_calls[0]
    assert (side, call.method, call.args["acked_seconds"]) == ("provider", "claim", 90)
    unpaid_ms = pair.delivered_ms() - 90_000
    assert unpaid_ms == N * 10_000 + TOL


def test_provider__service_lost__stops_claims_acked_and_sends_no_more_heartbeats():
    a = make_agreement(max_seconds=600, interval=10)
    p, r = machines(a)
    for k in range(4):  # heartbeats at 0, 10, 20, 30 s, each answered
        exchange(p, r, T0 + k * 10_000)
    fx = p.service_lost(T0 + 35_000)
    assert p.state == "done"
    assert [type(e) for e in fx] == [StopService, Report, EscrowCall]
    assert fx[0].reason == "service_lost" and fx[1].event == "service_lost"
    assert (fx[2].method, fx[2].args["acked_seconds"]) == ("claim", 30)
    assert p.next_deadline() is None and p.on_timer(T0 + 40_000) == []  # silence from here
    assert p.service_lost(T0 + 41_000) == []  # once only
    # the renter's silence rule takes it from there: withholds, then closes
    r_fx = r.on_timer(r.next_deadline())
    assert r.state == "silent" and not sent(r_fx, UsageReceipt)


def test_provider__slow_service_start_is_not_taken_for_missed_receipts():
    a = make_agreement(max_seconds=600, interval=10)
    p, r = machines(a)
    late = T0 + N * 10_000 + TOL + 5_000  # StartService took longer than the stop deadline
    p.service_started(late)
    fx = p.on_timer(late)
    assert p.state == "serving" and sent(fx, Heartbeat)  # heartbeat 0, not a stop
    assert p.stop_deadline_ms() == late + N * 10_000 + TOL
    p2, _ = machines(a)
    assert [type(e) for e in p2.on_timer(late)][0] is StopService  # without it: stopped at once


def test_provider__service_lost_after_the_end_changes_nothing():
    a = make_agreement(max_seconds=60, interval=10)
    p, _ = machines(a)
    p.on_timer(T0 + 60_000)
    assert p.state == "finishing"
    assert p.service_lost(T0 + 61_000) == [] and p.state == "finishing"


def test_provider__receipts_that_pay_nothing_more_do_not_keep_the_service():
    a = make_agreement(max_seconds=600, interval=10)
    p, r = machines(a)
    exchange(p, r, T0)
    for k in range(1, N + 1):
        t = T0 + k * 10_000
        hb = sent(p.on_timer(t), Heartbeat)[0]
        # A renter that answers every heartbeat but never acknowledges more than 0 seconds.
        stingy = UsageReceipt(p.agreement_id, 0, hb.seq, heartbeat_hash(hb), b"\x01" * 16, t,
                              sign_receipt(a.renter_wallet_key, a.domain, p.agreement_id, 0)).sign(a.renter)
        assert p.receive_data(stingy.encode(), t) == [Persist("receipt", p.agreement_id, stingy)]
    assert p.next_deadline() == T0 + N * 10_000 + TOL
    fx = p.on_timer(p.next_deadline())
    assert p.state == "done"
    assert StopService(p.agreement_id, "receipts_missed") in fx
    assert EscrowCall("claim", p.agreement_id, {"acked_seconds": 0, "receipt_sig": stingy.wallet_sig}) in fx


def test_renter__provider_silent__reports_then_closes_then_recovers():
    a = make_agreement(max_seconds=600, interval=10, grace=60)
    pair = RentalPair(a, provider_crash_ms=T0 + 45_000).run()
    events = [(e.event, t) for side, t, e in pair.reports if side == "renter" and isinstance(e, Report)]
    assert ("provider_silent", T0 + 40_000 + 2 * 10_000) in events
    calls = [(c.method, t) for side, t, c in pair.escrow_calls if side == "renter"]
    close_at = T0 + 40_000 + (2 + N) * 10_000
    assert calls[0] == ("close", close_at)
    assert calls[1][0] == "recover" and calls[1][1] > close_at + 60_000
    assert pair.payout == recover_payout(a.terms)  # the crashed provider never claimed


def test_renter__silent_provider_that_resumes_is_paid_only_the_capped_window():
    a = make_agreement(max_seconds=600, interval=10)
    p, r = machines(a)
    exchange(p, r, T0)
    exchange(p, r, T0 + 10_000)
    fx = r.on_timer(r.next_deadline())  # 2 intervals of silence
    assert [e.event for e in fx] == ["provider_silent"] and r.state == "silent"
    # The provider resumes after 25 s: the renter pays at most interval + tolerance.
    hb = sent(p.on_timer(T0 + 35_000), Heartbeat)[0]
    fx = r.receive_data(hb.encode(), T0 + 35_000)
    assert r.state == "active" and any(getattr(e, "event", "") == "provider_resumed" for e in fx)
    assert sent(fx, UsageReceipt)[0].acked_seconds == 10 + 12


def test_renter__stop_closes_escrow_and_provider_claims_on_close():
    a = make_agreement(max_seconds=600, interval=10)
    pair = RentalPair(a, renter_stop_ms=T0 + 123_000).run()
    calls = [(side, c.method) for side, _, c in pair.escrow_calls]
    assert calls == [("renter", "close"), ("provider", "claim")]
    assert pair.payout == claim_payout(a.terms, 120)
    assert pair.service_stopped_ms == T0 + 123_000
    assert pair.renter.state == "done"


def test_renter__stop_after_end_is_a_local_error():
    a = make_agreement(max_seconds=60, interval=10)
    _, r = machines(a)
    with pytest.raises(LocalProtocolError) as exc:
        r.stop(T0 + 60_000)
    assert exc.value.code == "already_ended"


def test_machines__transition_not_in_table_is_a_local_error():
    a = make_agreement()
    _, r = machines(a)
    r.escrow_settled(T0)
    assert r.state == "done"
    with pytest.raises(LocalProtocolError) as exc:
        r.stop(T0)
    assert exc.value.code == "not_running"
    with pytest.raises(LocalProtocolError) as exc:
        r._step(Heartbeat, None, T0)
    assert exc.value.code == "bad_transition"


def test_machines__every_pair_outside_the_table_is_refused_and_changes_nothing():
    """h2-style sweep over every (state, input): events outside the table raise, messages
    outside it are reported and dropped; the state stays put either way."""
    a = make_agreement()
    p, r = machines(a)
    hb = sent(p.on_timer(T0), Heartbeat)[0]
    refused = 0
    for m in (p, r):
        for state in State:
            for event in Event:
                if (state, event) in m.TRANSITIONS:
                    continue
                m.state = state
                with pytest.raises(LocalProtocolError) as exc:
                    m._step(event, None, T0)
                assert exc.value.code == "bad_transition" and m.state is state
                refused += 1
    for state in State:
        if (state, Heartbeat) in r.TRANSITIONS:
            continue
        r.state = state
        fx = r.receive_data(hb.encode(), T0)
        assert [(e.detail["code"], e.detail["verdict"]) for e in fx] == [("not_running", "ignore")]
        assert r.state is state
    assert refused >= len(State) * len(Event)  # the sweep ran: most pairs are refused


# ---------------------------------------------------------------------------------------------
# Bad heartbeats: withheld, reported, counted; the rental goes on


def _resign(hb, key, **changes):
    return dataclasses.replace(hb, **changes).sign(key)


@pytest.mark.parametrize("mutate, code", [
    (lambda hb, a, prev: _resign(hb, PeerKey(b"\x09" * 32)), "bad_signature"),
    (lambda hb, a, prev: _resign(hb, a.provider, agreement_id=b"\x01" * 32), "wrong_agreement"),
    (lambda hb, a, prev: prev, "stale_heartbeat"),
    (lambda hb, a, prev: _resign(hb, a.provider, prev_hash=b"\x02" * 32), "broken_chain"),
    (lambda hb, a, prev: _resign(hb, a.provider, nonce=b"\x03" * 16), "wrong_nonce"),
    (lambda hb, a, prev: _resign(hb, a.provider, sent_ms=hb.sent_ms + 60_000), "from_future"),
    (lambda hb, a, prev: _resign(hb, a.provider, sent_ms=prev.sent_ms - 1), "time_went_back"),
    (lambda hb, a, prev: _resign(hb, a.provider, metrics=hb.metrics[:1]), "gpu_mismatch"),
    (lambda hb, a, prev: _resign(hb, a.provider, metrics=hb.metrics[:1] * 2), "gpu_mismatch"),
    (lambda hb, a, prev: hb.encode()[:-1], "truncated"),
])
def test_renter__bad_heartbeat__withholds_and_reports(mutate, code):
    a = make_agreement(gpu_count=2)
    p, r = machines(a)
    prev = exchange(p, r, T0)[0][0].message
    hb = sent(p.on_timer(T0 + 10_000), Heartbeat)[0]
    bad = mutate(hb, a, prev)
    fx = r.receive_data(bad if isinstance(bad, bytes) else bad.encode(), T0 + 10_000)
    assert rejected_codes(fx) == [code]
    assert sent(fx, UsageReceipt) == [] and not any(isinstance(e, Persist) for e in fx)
    assert r.rejections[code] == 1
    # The genuine heartbeat is still accepted afterwards.
    assert sent(r.receive_data(hb.encode(), T0 + 10_000), UsageReceipt)[0].acked_seconds == 10


def test_renter__heartbeat_before_start_is_rejected():
    a = make_agreement()
    p, r = machines(a)
    hb = sent(p.on_timer(T0), Heartbeat)[0]
    early = _resign(hb, a.provider, sent_ms=T0 - TEST_PARAMS.clock_skew_ms - 1)
    assert rejected_codes(r.receive_data(early.encode(), T0)) == ["before_start"]


def test_renter__heartbeat_after_close_is_ignored_not_penalised():
    a = make_agreement()
    p, r = machines(a)
    exchange(p, r, T0)
    r.stop(T0 + 5_000)
    hb = sent(p.on_timer(T0 + 10_000), Heartbeat)[0]
    fx = r.receive_data(hb.encode(), T0 + 10_000)
    assert [(e.detail["code"], e.detail["verdict"]) for e in fx] == [("not_running", "ignore")]


# ---------------------------------------------------------------------------------------------
# Access grants: on the renter's machine beside heartbeats


def test_renter__access_grant_is_kept_and_reported_but_pays_nothing():
    a = make_agreement()
    p, r = machines(a)
    exchange(p, r, T0)
    grant = AccessGrant(p.agreement_id, "ssh -p 2222 gpu@192.0.2.7", T0).sign(a.provider)
    fx = r.receive_data(grant.encode(), T0 + 1_000)
    assert fx == [Report("access_granted", {})] and r.access == "ssh -p 2222 gpu@192.0.2.7"
    assert r.state == "active" and r.rejections == {}
    # A grant is not a heartbeat: no receipt, and it does not hold off the silence.
    assert r.next_deadline() == T0 + TEST_PARAMS.renter_heartbeat_timeout_intervals * 10_000
    # The provider re-sends it on each stream it attaches; the latest one is kept.
    again = AccessGrant(p.agreement_id, "ssh -p 2200 gpu@192.0.2.8", T0 + 2_000).sign(a.provider)
    assert r.receive_data(again.encode(), T0 + 2_000) == [Report("access_granted", {})]
    assert r.access == "ssh -p 2200 gpu@192.0.2.8"


@pytest.mark.parametrize("forge, code", [
    (lambda a, aid: AccessGrant(aid, "ssh evil", T0).sign(a.renter), "bad_signature"),
    (lambda a, aid: AccessGrant(b"\x07" * 32, "ssh evil", T0).sign(a.provider), "wrong_agreement"),
])
def test_renter__forged_access_grant__rejected_and_access_unchanged(forge, code):
    a = make_agreement()
    p, r = machines(a)
    fx = r.receive_data(forge(a, p.agreement_id).encode(), T0)
    assert [(e.event, e.detail["code"], e.detail["verdict"]) for e in fx] == \
        [("access_rejected", code, "reject")]
    assert r.access is None and r.rejections[code] == 1


def test_renter__access_grant_after_the_rental_is_ignored():
    a = make_agreement()
    p, r = machines(a)
    r.escrow_settled(T0)
    grant = AccessGrant(p.agreement_id, "ssh late", T0).sign(a.provider)
    fx = r.receive_data(grant.encode(), T0)
    assert [(e.event, e.detail["code"], e.detail["verdict"]) for e in fx] == \
        [("access_rejected", "not_running", "ignore")]
    assert r.access is None


def test_provider__access_grant_on_its_stream_is_rejected():
    a = make_agreement()
    p, _ = machines(a)
    grant = AccessGrant(p.agreement_id, "ssh", T0).sign(a.provider)
    assert rejected_codes(p.receive_data(grant.encode(), T0)) == ["unexpected_type"]


# ---------------------------------------------------------------------------------------------
# Bad receipts: rejected, counted; the machine keeps running


def _receipt(a, p, hb, acked, *, wallet_key=None, key=None, **changes):
    rc = UsageReceipt(p.agreement_id, acked, hb.seq, heartbeat_hash(hb), b"\x05" * 16, hb.sent_ms,
                      sign_receipt(wallet_key or a.renter_wallet_key, a.domain, p.agreement_id, acked))
    return dataclasses.replace(rc, **changes).sign(key or a.renter)


@pytest.mark.parametrize("make_bad, code", [
    (lambda a, p, hb: _receipt(a, p, hb, 10, key=PeerKey(b"\x07" * 32)), "bad_signature"),
    (lambda a, p, hb: _receipt(a, p, hb, 10, wallet_key=b"\x08" * 32), "bad_wallet_signature"),
    (lambda a, p, hb: _receipt(a, p, hb, 10, wallet_sig=b"\x00" * 65), "bad_wallet_signature"),
    (lambda a, p, hb: _receipt(a, p, hb, 10, heartbeat_hash=b"\x09" * 32), "unknown_heartbeat"),
    (lambda a, p, hb: _receipt(a, p, hb, 10, heartbeat_seq=7), "unknown_heartbeat"),
    (lambda a, p, hb: _receipt(a, p, hb, 601), "acked_exceeds_max"),
    (lambda a, p, hb: _receipt(a, p, hb, 3), "acked_decreased"),
    (lambda a, p, hb: _receipt(a, p, hb, 10, agreement_id=b"\x04" * 32), "wrong_agreement"),
    (lambda a, p, hb: hb.encode(), "unexpected_type"),
])
def test_provider__bad_receipt__rejected_counted_and_rental_continues(make_bad, code):
    a = make_agreement(max_seconds=600)
    p, r = machines(a)
    exchange(p, r, T0)
    exchange(p, r, T0 + 10_000)  # latest receipt acks 10 s for heartbeat 1
    hb2 = sent(p.on_timer(T0 + 20_000), Heartbeat)[0]
    bad = make_bad(a, p, hb2)
    fx = p.receive_data(bad if isinstance(bad, bytes) else bad.encode(), T0 + 20_000)
    assert rejected_codes(fx) == [code] and p.rejections[code] == 1
    assert p.state == "serving" and p.acked_seconds == 10
    good = sent(r.receive_data(hb2.encode(), T0 + 20_000), UsageReceipt)[0]
    assert p.receive_data(good.encode(), T0 + 20_000) == [Persist("receipt", p.agreement_id, good)]
    assert p.acked_seconds == 20


def test_provider__older_receipt_arriving_late_is_ignored():
    a = make_agreement()
    p, r = machines(a)
    _, r_fx0, _ = exchange(p, r, T0)
    exchange(p, r, T0 + 10_000)
    fx = p.receive_data(sent(r_fx0, UsageReceipt)[0].encode(), T0 + 11_000)
    assert [(e.detail["code"], e.detail["verdict"]) for e in fx] == [("stale_receipt", "ignore")]


# ---------------------------------------------------------------------------------------------
# Hypothesis: tampering and loss bounds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_single_byte_change_to_a_signed_heartbeat_or_receipt_is_rejected(data):
    a = _SHARED
    p, r = machines(a)
    hb0 = sent(p.on_timer(T0), Heartbeat)[0]
    wire_hb = hb0.encode()
    i = data.draw(st.integers(0, len(wire_hb) - 1))
    v = data.draw(st.integers(0, 255).filter(lambda v: v != wire_hb[i]))
    tampered = wire_hb[:i] + bytes([v]) + wire_hb[i + 1:]
    fx = r.receive_data(tampered, T0)
    assert sent(fx, UsageReceipt) == [] and len(rejected_codes(fx)) == 1
    # The untampered heartbeat gets a receipt; now tamper with that.
    receipt = sent(r.receive_data(wire_hb, T0), UsageReceipt)[0]
    wire_rc = receipt.encode()
    j = data.draw(st.integers(0, len(wire_rc) - 1))
    w = data.draw(st.integers(0, 255).filter(lambda w: w != wire_rc[j]))
    fx = p.receive_data(wire_rc[:j] + bytes([w]) + wire_rc[j + 1:], T0)
    assert len(rejected_codes(fx)) == 1 and p.latest is None
    assert p.receive_data(wire_rc, T0) == [Persist("receipt", p.agreement_id, receipt)]


_SHARED = make_agreement(5, max_seconds=600, interval=10)
MAX_DELAY_MS = 1_500  # below heartbeat_late_tolerance_ms


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drop_rate=st.sampled_from([0.0, 0.1, 0.3]),
    seed=st.integers(0, 2**32),
    crash=st.one_of(st.none(), st.integers(0, 200_000)),
    vanish=st.one_of(st.none(), st.integers(0, 200_000)),
)
def test_random_loss_and_delay__renter_never_pays_beyond_delivered_plus_one_delay(drop_rate, seed, crash, vanish):
    a = make_agreement(6, max_seconds=200, interval=10)
    rng = random.Random(seed)
    fates = {}

    def fate(d, i):
        if (d, i) not in fates:
            fates[(d, i)] = (rng.random() < drop_rate, rng.randrange(MAX_DELAY_MS + 1))
        return fates[(d, i)]

    pair = RentalPair(a, drop=lambda d, i: fate(d, i)[0], delay_ms=lambda d, i: fate(d, i)[1],
                      provider_crash_ms=None if crash is None else T0 + crash,
                      renter_vanish_ms=None if vanish is None else T0 + vanish).run()
    acked = max(pair.renter.acked_seconds, pair.provider.acked_seconds)
    assert pair.provider.acked_seconds <= pair.renter.acked_seconds
    assert acked * 1000 <= pair.delivered_ms() + MAX_DELAY_MS
    # Whatever happened, the escrow paid out exactly the deposit, once.
    if pair.payout is not None:
        assert pair.payout.total == a.terms.deposit
        assert pair.payout.provider <= claim_payout(a.terms, acked).provider


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vanish=st.integers(1, 250_000), seed=st.integers(0, 2**32))
def test_renter_vanishes__provider_serves_at_most_n_intervals_unpaid(vanish, seed):
    a = make_agreement(8, max_seconds=300, interval=10)
    rng = random.Random(seed)
    delays = {}
    delay = lambda d, i: delays.setdefault((d, i), rng.randrange(MAX_DELAY_MS + 1))  # noqa: E731
    pair = RentalPair(a, renter_vanish_ms=T0 + vanish, delay_ms=delay).run()
    unpaid_ms = pair.delivered_ms() - pair.provider.acked_seconds * 1000
    # N intervals and the late tolerance, the first heartbeat's and the last receipt's delays,
    # and the rounding down to whole seconds.
    assert unpaid_ms < N * 10_000 + TOL + 2 * MAX_DELAY_MS + 1000
    assert pair.service_stopped_ms is not None
