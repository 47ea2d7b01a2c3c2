"""The renter chooses the container image: one of the offer's `images` (or "" for its first),
bound into AgreementDetails.image and so into the agreement id; anything else is declined
IMAGE_NOT_OFFERED by the provider (specs/negotiation.md)."""

from __future__ import annotations

import dataclasses

from protocol.messages import NegotiationReject, digest
from protocol.negotiation import Fault, Reason, State

from tests.protocol.test_negotiation import (
    ASK, NOW, OFFER, OFFER_DIGEST, PROVIDER_KEY, RENTER_KEY, assert_agreed_identically, negotiate,
    provider_for, renter_for,
)

IMAGES = ("gpumarket-test/a:1", "gpumarket-test/b:1")
IMG = dataclasses.replace(OFFER, images=IMAGES).sign(PROVIDER_KEY)
IMG_DIGEST = digest(IMG.encode())


def test_image__the_second_image__agreed_and_bound_in_the_agreement_id():
    pair = negotiate(renter_for(IMG, IMG_DIGEST, image=IMAGES[1]), provider_for(IMG, IMG_DIGEST))
    r, p = pair.renter, pair.provider
    assert r.state is State.AGREED and r.details == p.details and r.terms == p.terms
    assert r.details.image == IMAGES[1] and pair.sent["renter"][0].image == IMAGES[1]
    other = dataclasses.replace(r.details, image=IMAGES[0])
    assert other.details_hash() != r.terms.details_hash  # another image: another agreement id


def test_image__none_named__the_offers_first_image_in_the_agreement():
    pair = negotiate(renter_for(IMG, IMG_DIGEST), provider_for(IMG, IMG_DIGEST))
    assert pair.renter.state is State.AGREED and pair.renter.details.image == IMAGES[0]
    assert pair.renter.details == pair.provider.details


def test_image__an_offer_without_images__empty_image_agreed():
    pair = negotiate(renter_for(), provider_for())
    assert_agreed_identically(pair)
    assert pair.renter.details.image == ""


def test_image__not_offered__declined_with_its_code_no_fault():
    for offer, digest_, image in ((IMG, IMG_DIGEST, "gpumarket-test/c:1"),
                                  (IMG, IMG_DIGEST, "gpumarket-test/a"),  # exact strings only
                                  (OFFER, OFFER_DIGEST, IMAGES[0])):  # the offer lists none
        renter, provider = renter_for(offer, digest_, image=image), provider_for(offer, digest_)
        pair = negotiate(renter, provider)
        assert provider.state is State.FAILED and renter.state is State.FAILED
        assert provider.failure.reason == Reason.IMAGE_NOT_OFFERED == 22
        assert provider.failure.fault is Fault.LOCAL and provider.failure.error is None
        reject = pair.sent["provider"][-1]
        assert isinstance(reject, NegotiationReject) and reject.reason == 22
        assert image in reject.detail
        assert renter.failure.reason == 22 and renter.failure.reason_name == "IMAGE_NOT_OFFERED"
        assert renter.failure.fault is Fault.REMOTE and renter.failure.error is None


def test_image__changed_after_a_counter__violation():
    renter = renter_for(IMG, IMG_DIGEST, image=IMAGES[1], max_price=ASK * 2,
                        opening_price_per_gpu_second=ASK // 2)
    provider = provider_for(IMG, IMG_DIGEST)
    provider.receive_data(renter._proposal(1, 2, 3600, ASK // 2, NOW).encode(), NOW)
    assert provider.state is State.COUNTERED
    changed = dataclasses.replace(renter._proposal(2, 2, 3600, ASK, NOW), image=IMAGES[0]).sign(RENTER_KEY)
    provider.receive_data(changed.encode(), NOW)
    assert provider.state is State.FAILED and provider.failure.reason == Reason.INVALID_MESSAGE
    assert provider.failure.error is not None
