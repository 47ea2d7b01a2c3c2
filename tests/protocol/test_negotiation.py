"""Negotiation state machines: wired together with no socket, every message through the wire
format (encode on send, protocol.encoding.decode on receipt), time passed in, never slept."""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol.agreement import AgreementTerms, sign_consent, verify_consent
from protocol.effects import EscrowCall, Report, Send
from protocol.encoding import decode
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.eth import private_key_address
from protocol.messages import (
    Accept,
    AgreementDetails,
    Binding,
    CounterProposal,
    Heartbeat,
    NegotiationReject,
    Proposal,
    digest,
)
from protocol.negotiation import (
    TERMINAL,
    Fault,
    FirstAgreementWins,
    ProviderNegotiation,
    Reason,
    RenterNegotiation,
    State,
    build_agreement,
    escrow_domain,
)
from protocol.params import Params
from protocol.samples import make_offer, make_provider

NOW = 1_760_000_000_000
PARAMS = Params()
STEP = PARAMS.negotiation_step_timeout_ms
OPEN_BY = NOW // 1000 + 120  # what a provider with the default 120 s hold puts in at NOW

PROVIDER_KEY, PROVIDER_WALLET, PROVIDER_BINDING = make_provider(random.Random("provider"))
RENTER_KEY, RENTER_WALLET, RENTER_BINDING = make_provider(random.Random("renter"))
OTHER_KEY, OTHER_WALLET, OTHER_BINDING = make_provider(random.Random("someone else"))
ASK = 100  # the offer's price per GPU-second
OFFER = make_offer(PROVIDER_KEY, PROVIDER_BINDING, random.Random("offer"), NOW, gpu_count=4,
                   price_per_gpu_second=ASK)
OFFER_DIGEST = digest(OFFER.encode())
GPUS = tuple(g.uuid_digest for g in OFFER.gpus)
ACCESS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdwdW1hcmtldCB0ZXN0IGtleQ renter@test"
MIN_DURATION = OFFER.terms.min_duration_s  # 600
MAX_DURATION = OFFER.terms.max_duration_s


def renter_for(offer=OFFER, offer_digest=OFFER_DIGEST, *, gpu_count=2, duration_s=3600,
               max_price=ASK, params=PARAMS, seed=0, key=RENTER_KEY, binding=RENTER_BINDING,
               **limits) -> RenterNegotiation:
    return RenterNegotiation(offer, offer_digest, key, binding, gpu_count, duration_s, max_price,
                             ACCESS_KEY, params, random.Random(seed), **limits)


def provider_for(offer=OFFER, offer_digest=OFFER_DIGEST, *, free=GPUS, floor=ASK, params=PARAMS,
                 key=PROVIDER_KEY, wallet=PROVIDER_WALLET) -> ProviderNegotiation:
    return ProviderNegotiation(offer, offer_digest, key, wallet, free, floor, params)


class ConnectionPair:
    """h11's ConnectionPair idea: two machines, a FIFO stream each way, no socket. Every Send is
    encoded to bytes and decoded by the receiving machine (`receive_data`)."""

    def __init__(self, renter: RenterNegotiation, provider: ProviderNegotiation) -> None:
        self.renter, self.provider = renter, provider
        self.to = {"renter": deque(), "provider": deque()}  # wire bytes on the way
        self.effects = {"renter": [], "provider": []}
        self.sent = {"renter": [], "provider": []}  # messages each side sent, in order

    def machine(self, role):
        return self.renter if role == "renter" else self.provider

    def absorb(self, role: str, effects) -> list:
        self.effects[role].extend(effects)
        other = "provider" if role == "renter" else "renter"
        for effect in effects:
            if isinstance(effect, Send):
                assert effect.to == self.machine(other)._key.public
                self.sent[role].append(effect.message)
                self.to[other].append(effect.message.encode())
        return effects

    def start(self, now=NOW):
        return self.absorb("renter", self.renter.start(now))

    def deliver(self, role: str, now: int) -> list:
        """Deliver the next message waiting for `role`."""
        return self.absorb(role, self.machine(role).receive_data(self.to[role].popleft(), now))

    def run(self, now=NOW, step_ms=5) -> int:
        """Deliver everything in flight, alternating, `step_ms` apart. Returns the time."""
        while self.to["renter"] or self.to["provider"]:
            for role in ("provider", "renter"):
                if self.to[role]:
                    now += step_ms
                    self.deliver(role, now)
        return now

    def types(self, role):
        return [type(m).__name__ for m in self.sent[role]]


def negotiate(renter, provider, now=NOW) -> ConnectionPair:
    pair = ConnectionPair(renter, provider)
    pair.start(now)
    pair.run(now)
    return pair


def assert_agreed_identically(pair: ConnectionPair) -> None:
    r, p = pair.renter, pair.provider
    assert r.state is State.AGREED and p.state is State.AGREED
    assert r.terms == p.terms and r.details == p.details and r.consent_sig == p.consent_sig
    assert r.terms.agreement_id() == p.accept.agreement_id
    # What the escrow contract checks with ecrecover at open:
    verify_consent(escrow_domain(OFFER), r.terms, r.consent_sig)
    opens = [e for e in pair.effects["renter"] if isinstance(e, EscrowCall)]
    assert len(opens) == 1 and opens[0].method == "open"
    assert opens[0].agreement_id == r.terms.agreement_id()
    assert opens[0].args["terms"] == r.terms and opens[0].args["consent_sig"] == r.consent_sig


# --------------------------------------------------------------------------------------------
# Hand-made messages (a misbehaving or scripted peer)


def proposal(nid: bytes, round_: int = 1, *, price=ASK, gpu_count=2, duration_s=3600,
             key=RENTER_KEY, binding=RENTER_BINDING, sent_ms=NOW, offer_digest=OFFER_DIGEST,
             provider=PROVIDER_KEY.public, renter=None, sign_with=None) -> Proposal:
    return Proposal(
        negotiation_id=nid, round=round_, offer_digest=offer_digest, provider=provider,
        renter=renter or key.public, renter_binding=binding, gpu_count=gpu_count,
        duration_s=duration_s, price_per_gpu_second=price, access_key=ACCESS_KEY, sent_ms=sent_ms,
    ).sign(sign_with or key)


def counter(nid: bytes, round_: int, *, price=ASK, gpu_count=2, duration_s=3600, sent_ms=NOW,
            key=PROVIDER_KEY) -> CounterProposal:
    return CounterProposal(negotiation_id=nid, round=round_, gpu_count=gpu_count,
                           duration_s=duration_s, price_per_gpu_second=price,
                           sent_ms=sent_ms).sign(key)


def accept_for(prop: Proposal, *, sent_ms=NOW, key=PROVIDER_KEY, wallet=PROVIDER_WALLET,
               tamper_terms=False, open_by=OPEN_BY, claimed_open_by=None) -> Accept:
    gpus = GPUS[: prop.gpu_count]
    terms, _ = build_agreement(OFFER, OFFER_DIGEST, prop, gpus, open_by)
    if tamper_terms:  # the provider signs other terms than the proposal's (twice the price)
        terms = dataclasses.replace(terms, price_per_second=terms.price_per_second * 2)
    return Accept(negotiation_id=prop.negotiation_id, round=prop.round,
                  agreement_id=terms.agreement_id(), gpus=gpus,
                  consent_sig=sign_consent(wallet, escrow_domain(OFFER), terms),
                  open_by=open_by if claimed_open_by is None else claimed_open_by,
                  sent_ms=sent_ms).sign(key)


def reject(nid: bytes, round_: int, reason=Reason.CANCELLED, *, key=RENTER_KEY, sent_ms=NOW):
    return NegotiationReject(negotiation_id=nid, round=round_, reason=int(reason), detail="test",
                             sent_ms=sent_ms).sign(key)


def nid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def failed_with(machine, reason: Reason, fault: Fault, *, violation: bool | None = None):
    assert machine.state is State.FAILED, machine.state
    assert machine.failure is not None
    assert (machine.failure.reason, machine.failure.fault) == (reason, fault), machine.failure
    if violation is not None:
        assert (machine.failure.error is not None) is violation, machine.failure
        if violation:
            assert isinstance(machine.failure.error, RemoteProtocolError)
            assert machine.failure.error.code == reason.name.lower()


def sent_reject(effects, reason: Reason, key: bytes) -> NegotiationReject:
    sends = [e for e in effects if isinstance(e, Send)]
    assert len(sends) == 1, effects
    msg = decode(sends[0].message.encode())
    assert isinstance(msg, NegotiationReject) and msg.reason == reason
    assert msg.signature_valid(key)
    return msg


# --------------------------------------------------------------------------------------------
# build_agreement


def test_build_agreement__maps_offer_and_proposal_field_by_field():
    prop = proposal(nid(7), price=123, gpu_count=3, duration_s=7200)
    terms, details = build_agreement(OFFER, OFFER_DIGEST, prop, GPUS[1:4], OPEN_BY)
    t = OFFER.terms
    assert terms == AgreementTerms(
        provider=PROVIDER_BINDING.wallet, renter=RENTER_BINDING.wallet, token=t.token,
        price_per_second=123 * 3, max_seconds=7200, heartbeat_interval=t.heartbeat_interval_s,
        grace=t.grace_s, arbiter=t.arbiter, dispute_window=t.dispute_window_s,
        details_hash=details.details_hash(), open_by=OPEN_BY,
    )
    assert details == AgreementDetails(
        negotiation_id=nid(7), offer_digest=OFFER_DIGEST, provider_key=PROVIDER_KEY.public,
        renter_key=RENTER_KEY.public, chain_id=t.chain_id, escrow=t.escrow, gpus=GPUS[1:4],
        access_key=ACCESS_KEY,
    )
    assert terms.provider == private_key_address(PROVIDER_WALLET)
    assert terms.renter == private_key_address(RENTER_WALLET)
    assert escrow_domain(OFFER).chain_id == t.chain_id and escrow_domain(OFFER).contract == t.escrow


def test_build_agreement__gpus_change_the_agreement_id():
    prop = proposal(nid(7))
    a, _ = build_agreement(OFFER, OFFER_DIGEST, prop, GPUS[:2], OPEN_BY)
    b, _ = build_agreement(OFFER, OFFER_DIGEST, prop, GPUS[2:4], OPEN_BY)
    assert a.agreement_id() != b.agreement_id()


def test_build_agreement__refuses_wrong_number_of_gpus():
    with pytest.raises(LocalProtocolError):
        build_agreement(OFFER, OFFER_DIGEST, proposal(nid(7), gpu_count=2), GPUS[:3], OPEN_BY)


# --------------------------------------------------------------------------------------------
# Happy paths


def test_negotiation__accept_at_ask_in_one_round():
    pair = negotiate(renter_for(), provider_for())
    assert pair.types("renter") == ["Proposal"] and pair.types("provider") == ["Accept"]
    assert_agreed_identically(pair)
    r = pair.renter
    assert r.terms.price_per_second == ASK * 2 and r.terms.max_seconds == 3600
    assert r.details.gpus == GPUS[:2]
    # The provider makes its records durable before the consent leaves.
    kinds = [type(e).__name__ for e in pair.effects["provider"]]
    assert kinds == ["Persist", "Persist", "Send", "Report"]
    assert r.next_deadline() is None and pair.provider.next_deadline() is None


def test_negotiation__renter_asking_less_than_the_offer_gets_it_above_the_floor():
    pair = negotiate(renter_for(max_price=80), provider_for(floor=70))
    assert_agreed_identically(pair)
    assert pair.renter.terms.price_per_second == 80 * 2


def test_negotiation__counter_on_price_then_accept():
    pair = negotiate(renter_for(max_price=120, opening_price_per_gpu_second=50),
                     provider_for(floor=90))
    assert pair.types("renter") == ["Proposal", "Proposal"]
    assert pair.types("provider") == ["CounterProposal", "Accept"]
    c, second = pair.sent["provider"][0], pair.sent["renter"][1]
    assert (c.round, c.price_per_gpu_second) == (1, 90)
    # The renter takes a counter by proposing exactly its values in the next round.
    assert (second.round, second.gpu_count, second.duration_s, second.price_per_gpu_second) == \
        (2, c.gpu_count, c.duration_s, c.price_per_gpu_second)
    assert_agreed_identically(pair)
    assert pair.renter.terms.price_per_second == 90 * 2


def test_negotiation__counter_on_gpu_count_within_the_renters_minimum():
    pair = negotiate(renter_for(gpu_count=6, min_gpu_count=3), provider_for(free=GPUS[1:]))
    assert pair.sent["provider"][0].gpu_count == 3
    assert_agreed_identically(pair)
    assert pair.renter.details.gpus == GPUS[1:4]


def test_negotiation__counter_on_duration_into_the_offers_range():
    pair = negotiate(renter_for(duration_s=300, max_duration_s=3600), provider_for())
    assert pair.sent["provider"][0].duration_s == MIN_DURATION
    assert_agreed_identically(pair)
    assert pair.renter.terms.max_seconds == MIN_DURATION


def test_negotiation__capacity_shrinking_between_rounds_gives_another_counter():
    renter = renter_for(gpu_count=4, min_gpu_count=1, max_price=150,
                        opening_price_per_gpu_second=10)
    provider = provider_for()
    pair = ConnectionPair(renter, provider)
    pair.start()
    pair.deliver("provider", NOW + 1)  # counter on price
    provider.set_free_gpus(GPUS[:1])  # another negotiation took three GPUs
    pair.run(NOW + 1)
    assert pair.types("provider") == ["CounterProposal", "CounterProposal", "Accept"]
    assert_agreed_identically(pair)
    assert renter.details.gpus == GPUS[:1] and renter.round == 3


# --------------------------------------------------------------------------------------------
# Each reject reason


def test_negotiation__reject_price_too_high_when_the_counter_exceeds_the_renters_limit():
    pair = negotiate(renter_for(max_price=80), provider_for(floor=90))
    assert pair.types("provider") == ["CounterProposal"]
    failed_with(pair.renter, Reason.PRICE_TOO_HIGH, Fault.LOCAL, violation=False)
    failed_with(pair.provider, Reason.PRICE_TOO_HIGH, Fault.REMOTE, violation=False)


def test_negotiation__reject_price_too_low_when_no_round_is_left_to_counter():
    one_round = PARAMS.replace(negotiation_max_rounds=1)
    pair = negotiate(renter_for(max_price=80, params=one_round), provider_for(floor=90,
                                                                             params=one_round))
    assert pair.types("provider") == ["NegotiationReject"]
    failed_with(pair.provider, Reason.PRICE_TOO_LOW, Fault.LOCAL, violation=False)
    failed_with(pair.renter, Reason.PRICE_TOO_LOW, Fault.REMOTE, violation=False)


def test_negotiation__reject_no_capacity_when_no_gpu_is_free():
    pair = negotiate(renter_for(), provider_for(free=()))
    failed_with(pair.provider, Reason.NO_CAPACITY, Fault.LOCAL, violation=False)
    failed_with(pair.renter, Reason.NO_CAPACITY, Fault.REMOTE, violation=False)


def test_negotiation__reject_no_capacity_when_the_counter_is_below_the_renters_minimum():
    pair = negotiate(renter_for(gpu_count=4, min_gpu_count=3), provider_for(free=GPUS[:2]))
    assert pair.sent["provider"][0].gpu_count == 2
    failed_with(pair.renter, Reason.NO_CAPACITY, Fault.LOCAL, violation=False)
    failed_with(pair.provider, Reason.NO_CAPACITY, Fault.REMOTE)


def test_negotiation__reject_no_capacity_in_the_last_round():
    one_round = PARAMS.replace(negotiation_max_rounds=1)
    pair = negotiate(renter_for(gpu_count=4, params=one_round),
                     provider_for(free=GPUS[:2], params=one_round))
    failed_with(pair.provider, Reason.NO_CAPACITY, Fault.LOCAL, violation=False)


def test_negotiation__reject_bad_duration_when_the_counter_is_outside_the_renters_range():
    pair = negotiate(renter_for(duration_s=300), provider_for())  # offer minimum is 600 s
    assert pair.sent["provider"][0].duration_s == MIN_DURATION
    failed_with(pair.renter, Reason.BAD_DURATION, Fault.LOCAL, violation=False)
    failed_with(pair.provider, Reason.BAD_DURATION, Fault.REMOTE)


def test_negotiation__reject_bad_duration_in_the_last_round():
    one_round = PARAMS.replace(negotiation_max_rounds=1)
    pair = negotiate(renter_for(duration_s=MAX_DURATION + 1, params=one_round),
                     provider_for(params=one_round))
    failed_with(pair.provider, Reason.BAD_DURATION, Fault.LOCAL, violation=False)
    failed_with(pair.renter, Reason.BAD_DURATION, Fault.REMOTE)


def test_negotiation__reject_offer_stale_when_the_provider_has_republished():
    newer = make_offer(PROVIDER_KEY, PROVIDER_BINDING, random.Random("offer"), NOW + 60_000,
                       seq=2, gpu_count=4, price_per_gpu_second=ASK)
    pair = negotiate(renter_for(), provider_for(newer, digest(newer.encode())))
    failed_with(pair.provider, Reason.OFFER_STALE, Fault.LOCAL, violation=False)
    failed_with(pair.renter, Reason.OFFER_STALE, Fault.REMOTE, violation=False)


def test_negotiation__too_many_rounds_when_the_provider_counters_in_the_renters_last_round():
    # The provider runs with more rounds than the renter: its counter in round 2 leaves the
    # renter no round to take it.
    renter = renter_for(gpu_count=4, min_gpu_count=1, max_price=150,
                        opening_price_per_gpu_second=10,
                        params=PARAMS.replace(negotiation_max_rounds=2))
    provider = provider_for()
    pair = ConnectionPair(renter, provider)
    pair.start()
    pair.deliver("provider", NOW + 1)
    provider.set_free_gpus(GPUS[:1])
    pair.run(NOW + 1)
    assert pair.types("provider") == ["CounterProposal", "CounterProposal"]
    failed_with(renter, Reason.TOO_MANY_ROUNDS, Fault.REMOTE, violation=True)
    failed_with(provider, Reason.TOO_MANY_ROUNDS, Fault.REMOTE, violation=False)


def test_negotiation__too_many_rounds_against_a_provider_that_always_counters():
    renter = renter_for(max_price=10**6, opening_price_per_gpu_second=1)
    effects = renter.start(NOW)
    for round_ in range(1, PARAMS.negotiation_max_rounds + 1):
        assert renter.state is State.PROPOSED and renter.round == round_
        (send,) = effects
        price = send.message.price_per_gpu_second + 1  # always a little more
        effects = renter.handle(counter(renter.negotiation_id, round_, price=price), NOW)
    failed_with(renter, Reason.TOO_MANY_ROUNDS, Fault.REMOTE, violation=True)
    sent_reject(effects, Reason.TOO_MANY_ROUNDS, RENTER_KEY.public)


# --------------------------------------------------------------------------------------------
# Deadlines: reached through next_deadline() / on_timer(), never by sleeping


def test_negotiation__renter_times_out_when_the_provider_is_silent():
    renter = renter_for()
    renter.start(NOW)
    deadline = renter.next_deadline()
    assert deadline == NOW + STEP
    assert renter.on_timer(deadline - 1) == [] and renter.state is State.PROPOSED
    effects = renter.on_timer(deadline)
    failed_with(renter, Reason.TIMEOUT, Fault.REMOTE, violation=False)
    sent_reject(effects, Reason.TIMEOUT, RENTER_KEY.public)
    assert renter.next_deadline() is None


def test_negotiation__provider_times_out_after_its_counter_and_the_renter_learns_why():
    pair = ConnectionPair(renter_for(max_price=150, opening_price_per_gpu_second=10),
                          provider_for())
    pair.start()
    pair.deliver("provider", NOW + 1)  # counter is now on the way to the renter
    provider = pair.provider
    assert provider.state is State.COUNTERED and provider.next_deadline() == NOW + 1 + STEP
    pair.absorb("provider", provider.on_timer(provider.next_deadline()))
    failed_with(provider, Reason.TIMEOUT, Fault.REMOTE, violation=False)
    # The renter reads the counter, proposes round 2, then reads the provider's round-1 reject.
    pair.run(NOW + 2)
    failed_with(pair.renter, Reason.TIMEOUT, Fault.REMOTE, violation=False)
    assert any(isinstance(e, Report) and e.event == "negotiation_message_after_end"
               for e in pair.effects["provider"])


def test_negotiation__a_message_after_the_deadline_is_late_even_before_on_timer():
    renter = renter_for()
    (send,) = renter.start(NOW)
    late = accept_for(send.message, sent_ms=NOW + STEP)
    effects = renter.handle(late, NOW + STEP)
    failed_with(renter, Reason.TIMEOUT, Fault.REMOTE)
    assert [e.event for e in effects if isinstance(e, Report)] == [
        "negotiation_failed", "negotiation_message_after_end"]
    assert renter.terms is None


# --------------------------------------------------------------------------------------------
# Cancel


def test_negotiation__renter_cancel_reaches_a_countering_provider():
    pair = ConnectionPair(renter_for(max_price=150, opening_price_per_gpu_second=10),
                          provider_for())
    pair.start()
    pair.deliver("provider", NOW + 1)
    pair.absorb("renter", pair.renter.cancel(NOW + 2))
    pair.run(NOW + 2)
    failed_with(pair.renter, Reason.CANCELLED, Fault.LOCAL, violation=False)
    failed_with(pair.provider, Reason.CANCELLED, Fault.REMOTE, violation=False)


def test_negotiation__cancel_crossing_the_accept_frees_the_provider():
    pair = ConnectionPair(renter_for(), provider_for())
    pair.start()
    pair.deliver("provider", NOW + 1)  # provider AGREED, its Accept is in flight
    assert pair.provider.state is State.AGREED
    pair.absorb("renter", pair.renter.cancel(NOW + 2))
    pair.run(NOW + 2)
    failed_with(pair.provider, Reason.CANCELLED, Fault.REMOTE, violation=False)
    failed_with(pair.renter, Reason.CANCELLED, Fault.LOCAL)  # the late Accept changes nothing
    assert not any(isinstance(e, EscrowCall) for e in pair.effects["renter"])
    assert pair.effects["renter"][-1].event == "negotiation_message_after_end"


def test_negotiation__cancel_before_start_tells_nobody():
    renter = renter_for()
    effects = renter.cancel(NOW)
    assert [type(e) for e in effects] == [Report]
    failed_with(renter, Reason.CANCELLED, Fault.LOCAL)


def test_negotiation__provider_cancel_after_agreement_reaches_the_renter():
    pair = negotiate(renter_for(), provider_for())
    pair.absorb("provider", pair.provider.cancel(NOW + 100, "GPU fell off the bus"))
    pair.run(NOW + 100)
    failed_with(pair.renter, Reason.CANCELLED, Fault.REMOTE, violation=False)
    assert pair.renter.failure.detail == "GPU fell off the bus"


def test_negotiation__long_or_unprintable_cancel_detail_is_clipped_to_fit_the_wire():
    renter = renter_for()
    renter.start(NOW)
    effects = renter.cancel(NOW, "é" * 150 + "\n" + "x" * 300)
    msg = sent_reject(effects, Reason.CANCELLED, RENTER_KEY.public)
    assert len(msg.detail) == 200 and msg.detail.isascii() and msg.detail.isprintable()
    assert msg.detail == "?" * 150 + " " + "x" * 49  # wire text is printable ASCII


def test_provider__reject_renter_wallet_equal_to_the_providers():
    provider = provider_for()
    same_wallet = Binding.create(RENTER_KEY, PROVIDER_WALLET, OFFER.terms.chain_id)
    provider.handle(proposal(nid(1), binding=same_wallet), NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_negotiation__api_misuse_raises_local_protocol_error():
    renter = renter_for()
    renter.start(NOW)
    with pytest.raises(LocalProtocolError):
        renter.start(NOW)
    renter.cancel(NOW)
    with pytest.raises(LocalProtocolError):
        renter.cancel(NOW)
    with pytest.raises(LocalProtocolError):
        renter.receive_data(bytearray(b"\x90"), NOW)
    with pytest.raises(LocalProtocolError):
        renter.handle(b"not a message", NOW)
    provider = provider_for()
    with pytest.raises(LocalProtocolError):
        provider.set_free_gpus([b"\x01" * 32])  # not a GPU of the offer
    negotiate(renter_for(), provider)
    with pytest.raises(LocalProtocolError):
        provider.set_free_gpus(GPUS)  # agreement made: too late


@pytest.mark.parametrize("kwargs", [
    dict(gpu_count=0), dict(gpu_count=65), dict(gpu_count=2, min_gpu_count=3),
    dict(duration_s=0), dict(duration_s=600, min_duration_s=900), dict(max_price=0),
    dict(key=OTHER_KEY),  # binding is for another peer key
    dict(binding=Binding.create(RENTER_KEY, RENTER_WALLET, 1)),  # another chain
    dict(key=PROVIDER_KEY, binding=PROVIDER_BINDING),  # renting from oneself
    dict(offer_digest=b"\x00" * 31),
])
def test_renter__refuses_impossible_arguments(kwargs):
    with pytest.raises(LocalProtocolError):
        renter_for(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(key=OTHER_KEY), dict(wallet=OTHER_WALLET), dict(floor=0), dict(free=GPUS[:1] * 2),
])
def test_provider__refuses_impossible_arguments(kwargs):
    with pytest.raises(LocalProtocolError):
        provider_for(**kwargs)


# --------------------------------------------------------------------------------------------
# Forged, replayed and malformed input


def test_provider__reject_forged_proposal_signature():
    provider = provider_for()
    forged = proposal(nid(1), sign_with=OTHER_KEY)
    effects = provider.handle(forged, NOW)
    failed_with(provider, Reason.BAD_SIGNATURE, Fault.REMOTE, violation=True)
    # Addressed to the claimed renter, in the proposal's negotiation and round.
    msg = sent_reject(effects, Reason.BAD_SIGNATURE, PROVIDER_KEY.public)
    assert (msg.negotiation_id, msg.round) == (nid(1), 1)
    assert effects[0].to == RENTER_KEY.public


def test_renter__reject_forged_counter_and_accept():
    for forge in (lambda p: counter(p.negotiation_id, 1, price=50, key=OTHER_KEY),
                  lambda p: accept_for(p, key=OTHER_KEY)):
        renter = renter_for()
        (send,) = renter.start(NOW)
        effects = renter.handle(forge(send.message), NOW)
        failed_with(renter, Reason.BAD_SIGNATURE, Fault.REMOTE, violation=True)
        sent_reject(effects, Reason.BAD_SIGNATURE, RENTER_KEY.public)


def test_renter__reject_accept_whose_terms_differ_from_the_proposal():
    renter = renter_for()
    (send,) = renter.start(NOW)
    renter.handle(accept_for(send.message, tamper_terms=True), NOW)
    failed_with(renter, Reason.TERMS_MISMATCH, Fault.REMOTE, violation=True)
    assert renter.terms is None


def test_renter__reject_accept_whose_consent_is_not_the_provider_wallets():
    renter = renter_for()
    (send,) = renter.start(NOW)
    renter.handle(accept_for(send.message, wallet=OTHER_WALLET), NOW)
    failed_with(renter, Reason.BAD_CONSENT, Fault.REMOTE, violation=True)


@pytest.mark.parametrize("gpus", [
    (GPUS[0], b"\x05" * 32),  # not a GPU of the offer
    (GPUS[0],),  # fewer than proposed
    GPUS[:3],  # more than proposed
    (GPUS[1], GPUS[1]),  # the same GPU twice
])
def test_renter__reject_accept_with_wrong_gpus(gpus):
    renter = renter_for()
    (send,) = renter.start(NOW)
    good = accept_for(send.message)
    renter.handle(dataclasses.replace(good, gpus=gpus).sign(PROVIDER_KEY), NOW)
    failed_with(renter, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_provider__reject_forged_renter_binding():
    forged = dataclasses.replace(RENTER_BINDING, wallet_sig=OTHER_BINDING.wallet_sig)
    provider = provider_for()
    provider.handle(proposal(nid(1), binding=forged), NOW)
    failed_with(provider, Reason.BAD_BINDING, Fault.REMOTE, violation=True)


def test_provider__reject_binding_of_another_peer_key():
    provider = provider_for()
    provider.handle(proposal(nid(1), binding=OTHER_BINDING), NOW)
    failed_with(provider, Reason.BAD_BINDING, Fault.REMOTE, violation=True)


def test_provider__reject_binding_on_another_chain():
    provider = provider_for()
    provider.handle(proposal(nid(1), binding=Binding.create(RENTER_KEY, RENTER_WALLET, 1)), NOW)
    failed_with(provider, Reason.WRONG_CHAIN, Fault.REMOTE, violation=True)


def test_provider__reject_proposal_addressed_to_another_provider():
    provider = provider_for()
    provider.handle(proposal(nid(1), provider=OTHER_KEY.public), NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_provider__reject_old_proposal_replayed_to_a_fresh_negotiation():
    provider = provider_for()
    old = proposal(nid(1), sent_ms=NOW - PARAMS.clock_skew_ms - STEP - 1)
    provider.handle(old, NOW)
    failed_with(provider, Reason.STALE_MESSAGE, Fault.REMOTE, violation=True)


def test_provider__reject_proposal_replayed_from_another_negotiation():
    # Negotiation A's round-2 proposal injected into negotiation B, where round 2 is due.
    renter_a, renter_b = renter_for(seed=1), renter_for(seed=2)
    a = ConnectionPair(renter_a, provider_for())
    a.start()
    a.run()
    provider_b = provider_for()
    provider_b.handle(proposal(renter_b.negotiation_id, 1, price=10), NOW)
    assert provider_b.state is State.COUNTERED
    replay = proposal(renter_a.negotiation_id, 2)
    effects = provider_b.handle(replay, NOW + 1)
    failed_with(provider_b, Reason.WRONG_NEGOTIATION, Fault.REMOTE, violation=True)
    assert sent_reject(effects, Reason.WRONG_NEGOTIATION,
                       PROVIDER_KEY.public).negotiation_id == renter_b.negotiation_id


def test_provider__reject_proposal_that_changes_the_renter_binding_mid_negotiation():
    provider = provider_for()
    provider.handle(proposal(nid(1), 1, price=10), NOW)
    other = Binding.create(RENTER_KEY, OTHER_WALLET, OFFER.terms.chain_id)
    provider.handle(proposal(nid(1), 2, binding=other), NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_renter__reject_counter_that_repeats_the_proposal():
    renter = renter_for()
    (send,) = renter.start(NOW)
    p = send.message
    renter.handle(counter(p.negotiation_id, 1, price=p.price_per_gpu_second,
                          gpu_count=p.gpu_count, duration_s=p.duration_s), NOW)
    failed_with(renter, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


@pytest.mark.parametrize("fields", [
    dict(gpu_count=5), dict(gpu_count=0), dict(duration_s=MIN_DURATION - 1),
    dict(duration_s=MAX_DURATION + 1), dict(price=0),
])
def test_renter__reject_counter_the_offer_does_not_allow(fields):
    renter = renter_for(gpu_count=4, min_gpu_count=1, max_price=10**6)
    renter.start(NOW)
    renter.handle(counter(renter.negotiation_id, 1, **{"price": 150, **fields}), NOW)
    failed_with(renter, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_provider__reject_proposal_that_overflows_the_deposit():
    provider = provider_for()
    provider.handle(proposal(nid(1), price=2**255, gpu_count=4, duration_s=3600), NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)


def test_negotiation__undecodable_bytes_fail_the_negotiation():
    renter = renter_for()
    renter.start(NOW)
    effects = renter.receive_data(b"\x93\x0c\x01\xc0", NOW)
    failed_with(renter, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)
    sent_reject(effects, Reason.INVALID_MESSAGE, RENTER_KEY.public)
    # A provider that has not seen a proposal does not know whom to tell.
    provider = provider_for()
    effects = provider.receive_data(b"\xc1", NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)
    assert [type(e) for e in effects] == [Report]


def test_negotiation__reject_from_the_peer_keeps_an_unknown_reason_code():
    renter = renter_for()
    renter.start(NOW)
    renter.handle(reject(renter.negotiation_id, 1, 999, key=PROVIDER_KEY), NOW)
    assert renter.failure.reason == 999 and renter.failure.reason_name == "UNKNOWN_999"


# --------------------------------------------------------------------------------------------
# Every (state, message kind) pair, for both machines, against an expectation table


def _renter_in(state: str) -> RenterNegotiation:
    renter = renter_for(gpu_count=2, max_price=10**6, opening_price_per_gpu_second=50)
    if state == "IDLE":
        return renter
    renter.start(NOW)
    if state == "PROPOSED_1":
        return renter
    if state == "PROPOSED_2":
        renter.handle(counter(renter.negotiation_id, 1, price=60), NOW)
    elif state == "AGREED":
        renter.handle(accept_for(renter.proposal), NOW)
    elif state == "FAILED":
        renter.cancel(NOW)
    return renter


def _renter_input(kind: str, r: RenterNegotiation):
    """What a provider (or an attacker on its stream) could send the renter now."""
    n, rnd, prop = r.negotiation_id, r.round, r.proposal
    price = (prop.price_per_gpu_second if prop else 50) + 7
    return {
        "counter": lambda: counter(n, rnd, price=price),
        "counter_forged": lambda: counter(n, rnd, price=price, key=OTHER_KEY),
        "counter_wrong_id": lambda: counter(nid(99), rnd, price=price),
        "counter_wrong_round": lambda: counter(n, rnd + 1, price=price),
        "counter_stale": lambda: counter(n, rnd, price=price, sent_ms=NOW - 3_600_000),
        "accept": lambda: accept_for(prop or proposal(n)),
        "accept_bad_consent": lambda: accept_for(prop or proposal(n), wallet=OTHER_WALLET),
        "accept_wrong_terms": lambda: accept_for(prop or proposal(n), tamper_terms=True),
        "reject": lambda: reject(n, rnd, Reason.PRICE_TOO_LOW, key=PROVIDER_KEY),
        "reject_wrong_id": lambda: reject(nid(99), rnd, Reason.PRICE_TOO_LOW, key=PROVIDER_KEY),
        "proposal": lambda: proposal(n, rnd + 1),
        "heartbeat": lambda: Heartbeat(agreement_id=b"\x01" * 32, seq=0, sent_ms=NOW,
                                       nonce=b"\x02" * 16, prev_hash=b"\x00" * 32,
                                       metrics=()).sign(PROVIDER_KEY),
        "offer": lambda: OFFER,
        "garbage": lambda: b"\x92\x0b",
    }[kind]()


RENTER_STATES = ["IDLE", "PROPOSED_1", "PROPOSED_2", "AGREED", "FAILED"]
RENTER_KINDS = ["counter", "counter_forged", "counter_wrong_id", "counter_wrong_round",
                "counter_stale", "accept", "accept_bad_consent", "accept_wrong_terms", "reject",
                "reject_wrong_id", "proposal", "heartbeat", "offer", "garbage"]
# The expectation table, written out independently of the implementation's. Anything not listed
# for a live state: FAILED with INVALID_MESSAGE.
_PROPOSED_EXPECT = {
    "counter": ("PROPOSED", None),
    "counter_forged": ("FAILED", Reason.BAD_SIGNATURE),
    "counter_wrong_id": ("FAILED", Reason.WRONG_NEGOTIATION),
    "counter_wrong_round": ("FAILED", Reason.WRONG_ROUND),
    "counter_stale": ("FAILED", Reason.STALE_MESSAGE),
    "accept": ("AGREED", None),
    "accept_bad_consent": ("FAILED", Reason.BAD_CONSENT),
    "accept_wrong_terms": ("FAILED", Reason.TERMS_MISMATCH),
    "reject": ("FAILED", Reason.PRICE_TOO_LOW),
    "reject_wrong_id": ("FAILED", Reason.WRONG_NEGOTIATION),
}
RENTER_EXPECT = {
    "IDLE": {},
    "PROPOSED_1": _PROPOSED_EXPECT,
    "PROPOSED_2": _PROPOSED_EXPECT,
    "AGREED": {"reject": ("FAILED", Reason.PRICE_TOO_LOW),
               "reject_wrong_id": ("FAILED", Reason.WRONG_NEGOTIATION)},
}


def _provider_in(state: str) -> ProviderNegotiation:
    provider = provider_for(floor=ASK)
    if state == "COUNTERED":
        provider.handle(proposal(nid(1), 1, price=10), NOW)
    elif state == "AGREED":
        provider.handle(proposal(nid(1), 1), NOW)
    elif state == "FAILED":
        provider.handle(proposal(nid(1), 1, price=10), NOW)
        provider.cancel(NOW)
    return provider


def _provider_input(kind: str, p: ProviderNegotiation):
    """What a renter (or an attacker on its stream) could send the provider now."""
    n, nxt = nid(1), p.round + 1
    forged_binding = dataclasses.replace(RENTER_BINDING, wallet_sig=OTHER_BINDING.wallet_sig)
    return {
        "proposal": lambda: proposal(n, nxt),
        "proposal_low": lambda: proposal(n, nxt, price=20),
        "proposal_forged": lambda: proposal(n, nxt, sign_with=OTHER_KEY),
        "proposal_wrong_id": lambda: proposal(nid(99), nxt),
        "proposal_wrong_round": lambda: proposal(n, nxt + 1),
        "proposal_stale_offer": lambda: proposal(n, nxt, offer_digest=b"\x0f" * 32),
        "proposal_bad_binding": lambda: proposal(n, nxt, binding=forged_binding),
        "proposal_old": lambda: proposal(n, nxt, sent_ms=NOW - 3_600_000),
        "reject": lambda: reject(n, p.round),
        "counter": lambda: counter(n, p.round, key=RENTER_KEY),
        "accept": lambda: accept_for(proposal(n, max(p.round, 1)), key=RENTER_KEY),
        "offer": lambda: OFFER,
        "garbage": lambda: b"\xff\xff",
    }[kind]()


PROVIDER_STATES = ["IDLE", "COUNTERED", "AGREED", "FAILED"]
PROVIDER_KINDS = ["proposal", "proposal_low", "proposal_forged", "proposal_wrong_id",
                  "proposal_wrong_round", "proposal_stale_offer", "proposal_bad_binding",
                  "proposal_old", "reject", "counter", "accept", "offer", "garbage"]
PROVIDER_EXPECT = {
    "IDLE": {
        "proposal": ("AGREED", None),
        "proposal_low": ("COUNTERED", None),
        "proposal_forged": ("FAILED", Reason.BAD_SIGNATURE),
        "proposal_wrong_id": ("AGREED", None),  # a fresh negotiation takes any id
        "proposal_wrong_round": ("FAILED", Reason.WRONG_ROUND),
        "proposal_stale_offer": ("FAILED", Reason.OFFER_STALE),
        "proposal_bad_binding": ("FAILED", Reason.BAD_BINDING),
        "proposal_old": ("FAILED", Reason.STALE_MESSAGE),
    },
    "COUNTERED": {
        "proposal": ("AGREED", None),
        "proposal_low": ("COUNTERED", None),
        "proposal_forged": ("FAILED", Reason.BAD_SIGNATURE),
        "proposal_wrong_id": ("FAILED", Reason.WRONG_NEGOTIATION),
        "proposal_wrong_round": ("FAILED", Reason.WRONG_ROUND),
        "proposal_stale_offer": ("FAILED", Reason.OFFER_STALE),
        "proposal_bad_binding": ("FAILED", Reason.INVALID_MESSAGE),  # binding changed
        "proposal_old": ("FAILED", Reason.STALE_MESSAGE),
        "reject": ("FAILED", Reason.CANCELLED),
    },
    "AGREED": {"reject": ("FAILED", Reason.CANCELLED)},
}
# Failures that are the peer's protocol violation (failure.error set), as opposed to a decline
# by this side's policy or the peer's own NegotiationReject.
DECLINES = {Reason.OFFER_STALE, Reason.PRICE_TOO_LOW, Reason.NO_CAPACITY, Reason.BAD_DURATION,
            Reason.PRICE_TOO_HIGH}


def _check_pair(machine, before: str, kind: str, message, expect: dict, peer_key: bytes):
    failure_before = machine.failure
    data = message if isinstance(message, bytes) else message.encode()
    effects = machine.receive_data(data, NOW + 1)
    if before == "FAILED":
        # Over already: state and failure unchanged, nothing sent, but not silent.
        assert machine.state is State.FAILED and machine.failure is failure_before
        assert [(type(e), e.event) for e in effects] == [
            (Report, "negotiation_message_after_end")]
        return
    state, reason = expect.get(before, {}).get(kind, ("FAILED", Reason.INVALID_MESSAGE))
    assert machine.state is State[state], (before, kind, machine.state, machine.failure)
    if state != "FAILED":
        assert machine.failure is None
        assert any(isinstance(e, Send) for e in effects) or machine.ROLE == "renter"
        return
    assert machine.failure.reason == reason, (before, kind, machine.failure)
    from_peer_reject = isinstance(message, NegotiationReject) and \
        reason not in (Reason.WRONG_NEGOTIATION, Reason.INVALID_MESSAGE)
    assert (machine.failure.error is not None) == (not from_peer_reject and reason not in DECLINES)
    sends = [e for e in effects if isinstance(e, Send)]
    peer_known = before != "IDLE" or (machine.ROLE == "provider" and isinstance(message, Proposal))
    if isinstance(message, NegotiationReject) or not peer_known:
        assert sends == []  # never answer a reject; nobody to tell
    else:
        sent_reject(effects, reason, machine._key.public)
        assert sends[0].to == peer_key
    assert effects[-1].event == "negotiation_failed"


@pytest.mark.parametrize("kind", RENTER_KINDS)
@pytest.mark.parametrize("state", RENTER_STATES)
def test_renter__every_state_and_message_kind(state, kind):
    renter = _renter_in(state)
    _check_pair(renter, state, kind, _renter_input(kind, renter), RENTER_EXPECT,
                PROVIDER_KEY.public)


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@pytest.mark.parametrize("state", PROVIDER_STATES)
def test_provider__every_state_and_message_kind(state, kind):
    provider = _provider_in(state)
    _check_pair(provider, state, kind, _provider_input(kind, provider), PROVIDER_EXPECT,
                RENTER_KEY.public)


def test_transition_tables__every_pair_is_expected_exactly():
    # The tables in the module and the expectations above name the same (state, type) pairs.
    from protocol.negotiation import PROVIDER_TRANSITIONS, RENTER_TRANSITIONS

    assert set(RENTER_TRANSITIONS) == {
        (State.PROPOSED, CounterProposal), (State.PROPOSED, Accept),
        (State.PROPOSED, NegotiationReject), (State.AGREED, NegotiationReject)}
    assert set(PROVIDER_TRANSITIONS) == {
        (State.IDLE, Proposal), (State.COUNTERED, Proposal),
        (State.COUNTERED, NegotiationReject), (State.AGREED, NegotiationReject)}


# --------------------------------------------------------------------------------------------
# Hypothesis: random limits and asks; random interleavings


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpu_count=st.integers(1, 6), min_gpu_count=st.integers(1, 6),
    duration_s=st.integers(60, 3 * MIN_DURATION), duration_slack=st.integers(0, 1200),
    max_price=st.integers(1, 300), opening=st.integers(1, 300), floor=st.integers(1, 300),
    free=st.integers(0, 4), rounds=st.integers(1, 5),
)
def test_negotiation__random_limits_end_in_one_agreement_or_both_failed(
    gpu_count, min_gpu_count, duration_s, duration_slack, max_price, opening, floor, free, rounds
):
    params = PARAMS.replace(negotiation_max_rounds=rounds)
    renter = renter_for(gpu_count=gpu_count, min_gpu_count=min(min_gpu_count, gpu_count),
                        duration_s=duration_s, max_duration_s=duration_s + duration_slack,
                        max_price=max_price, opening_price_per_gpu_second=opening, params=params)
    provider = provider_for(free=GPUS[:free], floor=floor, params=params)
    pair = negotiate(renter, provider)
    assert renter.state in TERMINAL and provider.state in TERMINAL
    if renter.state is State.AGREED or provider.state is State.AGREED:
        assert_agreed_identically(pair)
        t = renter.terms
        assert t.price_per_second // len(renter.details.gpus) <= max_price
        assert t.price_per_second // len(renter.details.gpus) >= floor
        assert min(min_gpu_count, gpu_count) <= len(renter.details.gpus) <= min(gpu_count, free)
        assert MIN_DURATION <= t.max_seconds <= duration_s + duration_slack
        assert renter.round <= rounds
    else:
        assert renter.failure.reason == provider.failure.reason
        assert renter.failure.fault is not provider.failure.fault
        assert renter.failure.error is None or provider.failure.error is None
        # Honest peers with the same parameters never accuse each other.
        assert renter.failure.reason not in (Reason.BAD_SIGNATURE, Reason.TERMS_MISMATCH,
                                             Reason.WRONG_ROUND, Reason.TOO_MANY_ROUNDS)


class NegotiationInterleavings(RuleBasedStateMachine):
    """Random interleavings of delivery, time, timers, cancels and junk on an honest pair.
    Whatever happens: nothing raises, an agreement is identical on both sides, and once
    everything in flight is delivered and the deadlines fired, both machines are terminal."""

    def __init__(self):
        super().__init__()
        self.now = NOW
        renter = renter_for(gpu_count=3, min_gpu_count=1, max_price=120,
                            opening_price_per_gpu_second=60, duration_s=300, max_duration_s=900)
        self.pair = ConnectionPair(renter, provider_for(floor=90))
        self.pair.start(self.now)

    @rule(ms=st.integers(0, STEP + 100))
    def advance(self, ms):
        self.now += ms

    @precondition(lambda self: self.pair.to["provider"])
    @rule()
    def deliver_to_provider(self):
        self.pair.deliver("provider", self.now)

    @precondition(lambda self: self.pair.to["renter"])
    @rule()
    def deliver_to_renter(self):
        self.pair.deliver("renter", self.now)

    @rule(role=st.sampled_from(["renter", "provider"]))
    def fire_timer(self, role):
        machine = self.pair.machine(role)
        deadline = machine.next_deadline()
        if deadline is not None and deadline <= self.now:
            self.pair.absorb(role, machine.on_timer(self.now))
            assert machine.state is State.FAILED and machine.failure.reason == Reason.TIMEOUT

    @rule(role=st.sampled_from(["renter", "provider"]))
    def cancel(self, role):
        machine = self.pair.machine(role)
        if machine.state is not State.FAILED:
            self.pair.absorb(role, machine.cancel(self.now))
            failed_with(machine, Reason.CANCELLED, Fault.LOCAL)

    @rule(role=st.sampled_from(["renter", "provider"]),
          junk=st.sampled_from([b"\xc1", b"\x90", OFFER.encode()]))
    def junk(self, role, junk):
        self.pair.to[role].append(junk)

    @rule(capacity=st.integers(0, 4))
    def capacity_changes(self, capacity):
        if self.pair.provider.state not in TERMINAL:
            self.pair.provider.set_free_gpus(GPUS[:capacity])

    @invariant()
    def agreements_are_identical(self):
        r, p = self.pair.renter, self.pair.provider
        if r.state is State.AGREED:
            assert p.terms is not None and r.terms == p.terms and r.details == p.details
            verify_consent(escrow_domain(OFFER), r.terms, r.consent_sig)

    @invariant()
    def failures_have_reasons(self):
        for machine in (self.pair.renter, self.pair.provider):
            assert (machine.state is State.FAILED) == (machine.failure is not None)
            assert (machine.state in TERMINAL) == (machine.next_deadline() is None) or \
                machine.state is State.IDLE

    def teardown(self):
        now = self.pair.run(self.now)
        for role in ("renter", "provider"):
            machine = self.pair.machine(role)
            if machine.next_deadline() is not None:
                self.pair.absorb(role, machine.on_timer(machine.next_deadline()))
        self.pair.run(now + STEP)
        r, p = self.pair.renter, self.pair.provider
        # Once everything is delivered and every deadline fired, the two sides agree on the
        # outcome: whatever ended one side reached the other as a NegotiationReject.
        assert (r.state, p.state) in ((State.AGREED, State.AGREED), (State.FAILED, State.FAILED))
        opens = [e for e in self.pair.effects["renter"] if isinstance(e, EscrowCall)]
        if r.state is State.AGREED:
            assert [e.agreement_id for e in opens] == [p.accept.agreement_id]


TestNegotiationInterleavings = NegotiationInterleavings.TestCase
TestNegotiationInterleavings.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# A renter negotiating with several providers at once


def _second_provider(seed: str, price: int):
    key, wallet, binding = make_provider(random.Random(seed))
    offer = make_offer(key, binding, random.Random(seed), NOW, gpu_count=2,
                       price_per_gpu_second=price)
    return key, wallet, offer, digest(offer.encode())


def test_first_agreement_wins__cancels_the_rest_and_opens_one_escrow():
    providers = [_second_provider(f"p{i}", 100) for i in range(3)]
    renters, machines = [], []
    for i, (key, wallet, offer, d) in enumerate(providers):
        renters.append(renter_for(offer, d, seed=10 + i))
        free = tuple(g.uuid_digest for g in offer.gpus) if i else ()  # p0 has nothing free
        machines.append(ProviderNegotiation(offer, d, key, wallet, free, 100, PARAMS))
    group = FirstAgreementWins(renters)
    by_key = {key.public: m for (key, *_), m in zip(providers, machines)}
    effects = group.start(NOW)
    # Everything the providers answer, in order; p1 answers before p2.
    answers = []
    for e in effects:
        provider = by_key[e.to]
        answers.append((e.message.negotiation_id,
                        provider.receive_data(e.message.encode(), NOW + 1)))
    renter_effects = []
    for n_id, provider_effects in answers:
        for pe in provider_effects:
            if isinstance(pe, Send):
                renter_effects += group.receive_data(n_id, pe.message.encode(), NOW + 2)
    winner = group.winner
    assert winner is renters[1] and winner.state is State.AGREED
    opens = [e for e in renter_effects if isinstance(e, EscrowCall)]
    assert [e.agreement_id for e in opens] == [winner.terms.agreement_id()]
    assert [r.state for r in renters] == [State.FAILED, State.AGREED, State.FAILED]
    failed_with(renters[0], Reason.NO_CAPACITY, Fault.REMOTE)
    # p2's Accept was already on its way when p1 won: it meets a cancelled negotiation.
    failed_with(renters[2], Reason.CANCELLED, Fault.LOCAL)
    assert renters[2].terms is None
    assert [e.event for e in renter_effects if isinstance(e, Report)].count(
        "negotiation_message_after_end") == 1
    # The loser's provider hears the cancel and frees its GPUs.
    for e in renter_effects:
        if isinstance(e, Send):
            by_key[e.to].receive_data(e.message.encode(), NOW + 3)
    failed_with(machines[2], Reason.CANCELLED, Fault.REMOTE, violation=False)
    assert machines[1].state is State.AGREED and group.done
    assert group.next_deadline() is None


def test_first_agreement_wins__cancels_negotiations_still_in_flight():
    providers = [_second_provider(f"q{i}", 100) for i in range(2)]
    renters = [renter_for(o, d, seed=20 + i) for i, (_, _, o, d) in enumerate(providers)]
    group = FirstAgreementWins(renters)
    effects = group.start(NOW)
    assert group.next_deadline() == NOW + STEP
    key, wallet, offer, d = providers[0]
    first = ProviderNegotiation(offer, d, key, wallet, [g.uuid_digest for g in offer.gpus],
                                100, PARAMS)
    (accept,) = [e for e in first.receive_data(effects[0].message.encode(), NOW + 1)
                 if isinstance(e, Send)]
    out = group.receive_data(renters[0].negotiation_id, accept.message.encode(), NOW + 2)
    assert group.winner is renters[0]
    failed_with(renters[1], Reason.CANCELLED, Fault.LOCAL)
    cancel = [e for e in out if isinstance(e, Send)]
    assert [e.to for e in cancel] == [providers[1][0].public]
    assert group.on_timer(NOW + STEP) == [] and group.done
    with pytest.raises(LocalProtocolError):
        group.handle(nid(5), accept.message, NOW)


# --------------------------------------------------------------------------------------------
# open_by: the provider's consent dies with its hold (issue 12)


def test_open_by__provider_sets_accept_time_plus_its_hold():
    pair = negotiate(renter_for(), provider_for())
    assert_agreed_identically(pair)
    accepted_at = NOW + 5  # ConnectionPair.run delivers the proposal 5 ms after NOW
    assert pair.provider.accept.open_by == (accepted_at + 120_000) // 1000
    assert pair.renter.terms.open_by == pair.provider.terms.open_by == pair.provider.accept.open_by
    short = ProviderNegotiation(OFFER, OFFER_DIGEST, PROVIDER_KEY, PROVIDER_WALLET, GPUS, ASK,
                                PARAMS, open_hold_ms=30_000)
    pair = negotiate(renter_for(), short)
    assert_agreed_identically(pair)
    assert pair.renter.terms.open_by == (accepted_at + 30_000) // 1000


def test_open_by__is_part_of_the_agreement_id_and_the_consent():
    prop = proposal(nid(7))
    a, _ = build_agreement(OFFER, OFFER_DIGEST, prop, GPUS[:2], OPEN_BY)
    b, _ = build_agreement(OFFER, OFFER_DIGEST, prop, GPUS[:2], OPEN_BY + 1)
    assert a.agreement_id() != b.agreement_id()
    # An Accept that names another open_by than the one its consent covers does not agree.
    renter = renter_for()
    (send,) = renter.start(NOW)
    renter.handle(accept_for(send.message, open_by=OPEN_BY, claimed_open_by=OPEN_BY + 600), NOW)
    failed_with(renter, Reason.TERMS_MISMATCH, Fault.REMOTE, violation=True)


@pytest.mark.parametrize("open_by", [
    NOW // 1000 - 1,  # already past
    (NOW + PARAMS.min_open_window_ms) // 1000 - 1,  # leaves less than min_open_window_ms
])
def test_renter__reject_accept_whose_open_by_leaves_no_time_to_open(open_by):
    renter = renter_for()
    (send,) = renter.start(NOW)
    effects = renter.handle(accept_for(send.message, open_by=open_by), NOW)
    failed_with(renter, Reason.BAD_OPEN_BY, Fault.REMOTE, violation=True)
    assert not [e for e in effects if isinstance(e, EscrowCall)]
    sent_reject(effects, Reason.BAD_OPEN_BY, RENTER_KEY.public)


def test_renter__accepts_open_by_just_at_the_minimum_window():
    renter = renter_for()
    (send,) = renter.start(NOW)
    open_by = -(-(NOW + PARAMS.min_open_window_ms) // 1000)  # ceil
    renter.handle(accept_for(send.message, open_by=open_by), NOW)
    assert renter.state is State.AGREED and renter.terms.open_by == open_by


def test_provider__open_hold_must_be_positive():
    with pytest.raises(LocalProtocolError):
        ProviderNegotiation(OFFER, OFFER_DIGEST, PROVIDER_KEY, PROVIDER_WALLET, GPUS, ASK, PARAMS,
                            open_hold_ms=0)


# --------------------------------------------------------------------------------------------
# Arbiters: a party can never be the arbiter; a renter takes only arbiters it trusts (issue 12)

def offer_with_arbiter(arbiter: bytes):
    terms = dataclasses.replace(OFFER.terms, arbiter=arbiter, dispute_window_s=3600)
    return dataclasses.replace(OFFER, terms=terms).sign(PROVIDER_KEY)


ARBITER_OFFER = offer_with_arbiter(OTHER_BINDING.wallet)


def test_renter_refusal__arbiter_must_be_on_the_renters_allowlist():
    from protocol.negotiation import renter_refusal

    assert renter_refusal(OFFER, frozenset()) is None  # no arbiter: nothing to trust
    why = renter_refusal(ARBITER_OFFER, frozenset())
    assert why is not None and "trusts no arbiter" in why and OTHER_BINDING.wallet.hex() in why
    why = renter_refusal(ARBITER_OFFER, frozenset({b"\x01" * 20}))
    assert why is not None and "not in renter.arbiters" in why
    assert renter_refusal(ARBITER_OFFER, frozenset({OTHER_BINDING.wallet})) is None


def test_renter_refusal__known_rebasing_token_is_refused():
    from protocol.negotiation import renter_refusal
    from protocol.tokens import REFUSED_TOKENS

    (chain_id, token), _ = next(iter(REFUSED_TOKENS.items()))
    terms = dataclasses.replace(OFFER.terms, chain_id=chain_id, token=token)
    why = renter_refusal(dataclasses.replace(OFFER, terms=terms), frozenset())
    assert why is not None and "rebasing" in why


def test_renter__offer_whose_arbiter_is_the_renters_wallet_is_a_local_error():
    offer = offer_with_arbiter(RENTER_BINDING.wallet)
    with pytest.raises(LocalProtocolError):
        renter_for(offer, digest(offer.encode()))


def test_provider__renter_whose_wallet_is_the_arbiter_is_refused():
    offer = offer_with_arbiter(RENTER_BINDING.wallet)
    d = digest(offer.encode())
    provider = provider_for(offer, d)
    effects = provider.handle(proposal(nid(9), offer_digest=d), NOW)
    failed_with(provider, Reason.INVALID_MESSAGE, Fault.REMOTE, violation=True)
    assert "arbiter" in provider.failure.detail
    assert not [e for e in effects if isinstance(e, Send) and isinstance(e.message, Accept)]


def test_negotiation__with_a_trusted_arbiter_agrees():
    d = digest(ARBITER_OFFER.encode())
    pair = negotiate(renter_for(ARBITER_OFFER, d), provider_for(ARBITER_OFFER, d))
    assert pair.renter.state is State.AGREED
    assert pair.renter.terms.arbiter == OTHER_BINDING.wallet


# The provider's driver withholding an Accept (node checks between decision and consent)


def test_negotiation__provider_withholds_the_accept__renter_fails_with_the_providers_reason():
    renter, provider = renter_for(), provider_for()
    pair = ConnectionPair(renter, provider)
    pair.start(NOW)
    effects = provider.receive_data(pair.to["provider"].popleft(), NOW + 5)
    assert provider.state is State.AGREED  # decided, but the driver has not sent the Accept
    assert any(isinstance(e, Send) and isinstance(e.message, Accept) for e in effects)
    withheld = pair.absorb("provider", provider.withhold(NOW + 6, Reason.INSUFFICIENT_FUNDS,
                                                         "balance 0 < deposit 720000"))
    msg = sent_reject(withheld, Reason.INSUFFICIENT_FUNDS, PROVIDER_KEY.public)
    assert msg.round == 1
    failed_with(provider, Reason.INSUFFICIENT_FUNDS, Fault.LOCAL, violation=False)
    pair.deliver("renter", NOW + 10)
    failed_with(renter, Reason.INSUFFICIENT_FUNDS, Fault.REMOTE, violation=False)
    assert renter.failure.detail == "balance 0 < deposit 720000"
    assert not [e for e in pair.effects["renter"] if isinstance(e, EscrowCall)]


@pytest.mark.parametrize("reason", [Reason.TOO_MANY_PENDING, Reason.PROVIDER_BUSY])
def test_negotiation__withhold_reasons_reach_the_renter_by_code(reason):
    renter, provider = renter_for(), provider_for()
    pair = ConnectionPair(renter, provider)
    pair.start(NOW)
    provider.receive_data(pair.to["provider"].popleft(), NOW + 5)
    pair.absorb("provider", provider.withhold(NOW + 6, reason, "x"))
    pair.deliver("renter", NOW + 10)
    failed_with(renter, reason, Fault.REMOTE, violation=False)
    assert renter.failure.reason_name == reason.name


def test_negotiation__withhold_outside_agreed_or_with_a_protocol_reason_is_a_local_error():
    provider = provider_for()
    with pytest.raises(LocalProtocolError):
        provider.withhold(NOW, Reason.INSUFFICIENT_FUNDS, "not agreed yet")
    renter = renter_for()
    pair = ConnectionPair(renter, provider)
    pair.start(NOW)
    provider.receive_data(pair.to["provider"].popleft(), NOW + 5)
    with pytest.raises(LocalProtocolError):
        provider.withhold(NOW + 6, Reason.BAD_SIGNATURE, "not a reason to withhold")
    assert provider.state is State.AGREED


def test_negotiation__reason_codes_match_the_spec_table():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "specs" / "negotiation.md").read_text()
    section = text.split("## Reason codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", section, re.M)
    assert {int(code): name for code, name in rows} == {r.value: r.name for r in Reason}
