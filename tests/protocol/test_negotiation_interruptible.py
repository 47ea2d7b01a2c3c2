"""Negotiation of interruptible GPUs: the renter names the class by its notice, the provider
assigns GPUs of that set only, at its price floor, and the notice is bound into the agreement."""

from __future__ import annotations

import dataclasses
import pytest

from protocol.errors import LocalProtocolError
from protocol.messages import InterruptibleGpus, digest
from protocol.negotiation import Reason, State

from tests.protocol.test_negotiation import (
    GPUS, NOW, OFFER, PROVIDER_KEY, RENTER_KEY, negotiate, provider_for, renter_for,
)

SPOT_PRICE = 60  # below the on-demand ASK of 100
SPOT = dataclasses.replace(OFFER, interruptible=(
    InterruptibleGpus(GPUS[2:], 120, SPOT_PRICE),)).sign(PROVIDER_KEY)
SPOT_DIGEST = digest(SPOT.encode())


def test_interruptible__agreed_on_the_sets_gpus_at_its_price_and_bound_in_the_agreement():
    pair = negotiate(renter_for(SPOT, SPOT_DIGEST, max_price=SPOT_PRICE, notice_s=120),
                     provider_for(SPOT, SPOT_DIGEST))
    r, p = pair.renter, pair.provider
    assert r.state is State.AGREED and p.state is State.AGREED and r.terms == p.terms
    assert set(r.details.gpus) <= set(GPUS[2:]) and r.details.notice_s == 120
    assert r.terms.price_per_second == 2 * SPOT_PRICE
    on_demand = dataclasses.replace(r.details, notice_s=0)
    assert on_demand.details_hash() != r.terms.details_hash  # the class is in the agreement id


def test_interruptible__on_demand_proposal_gets_only_on_demand_gpus():
    pair = negotiate(renter_for(SPOT, SPOT_DIGEST, max_price=100), provider_for(SPOT, SPOT_DIGEST))
    assert pair.renter.state is State.AGREED
    assert set(pair.renter.details.gpus) == set(GPUS[:2]) and pair.renter.details.notice_s == 0


def test_interruptible__more_gpus_than_the_set_holds__countered_down_to_the_set():
    pair = negotiate(renter_for(SPOT, SPOT_DIGEST, gpu_count=3, min_gpu_count=1, max_price=SPOT_PRICE,
                                notice_s=120), provider_for(SPOT, SPOT_DIGEST))
    assert pair.types("provider")[0] == "CounterProposal" and pair.sent["provider"][0].gpu_count == 2
    assert pair.renter.state is State.AGREED and len(pair.renter.details.gpus) == 2


def test_interruptible__a_notice_the_offer_does_not_have__refused_locally_and_by_the_provider():
    with pytest.raises(LocalProtocolError):
        renter_for(SPOT, SPOT_DIGEST, notice_s=30)
    provider = provider_for(SPOT, SPOT_DIGEST)
    renter = renter_for(SPOT, SPOT_DIGEST, max_price=SPOT_PRICE, notice_s=120)
    bad = dataclasses.replace(renter._proposal(1, 1, 3600, SPOT_PRICE, NOW), notice_s=30).sign(RENTER_KEY)
    provider.receive_data(bad.encode(), NOW)
    assert provider.state is State.FAILED and provider.failure.reason == Reason.INVALID_MESSAGE


def test_interruptible__none_of_the_set_free__declined_no_capacity():
    renter = renter_for(SPOT, SPOT_DIGEST, gpu_count=1, max_price=SPOT_PRICE, notice_s=120)
    provider = provider_for(SPOT, SPOT_DIGEST, free=GPUS[:1])  # only an on-demand GPU free
    negotiate(renter, provider)
    # The provider has none of the set free: it declines, it never assigns the wrong class.
    assert provider.failure.reason == Reason.NO_CAPACITY and renter.state is State.FAILED
