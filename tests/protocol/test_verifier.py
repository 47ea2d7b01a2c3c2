"""The verifier protocol code takes (protocol/verifier.py): every decode, signature and wallet
check of gossiped input goes through the one passed in, and the default is the real check."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.errors import Reject
from protocol.messages import Binding, Offer, OfferWithdrawal
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.validation import BindingCache, validate_offer
from protocol.verifier import VERIFIER, Verifier

from .book_helpers import NOW, offer, provider, withdrawal


class Recording(Verifier):
    """The real checks, recording each call; `deny` makes ed25519 say no for that domain."""

    def __init__(self, deny: bytes | None = None) -> None:
        self.calls: list[tuple] = []
        self.deny = deny

    def decode(self, data, expect=None):
        self.calls.append(("decode", expect))
        return super().decode(data, expect)

    def ed25519(self, public_key, domain, payload, signature):
        self.calls.append(("ed25519", domain))
        return domain != self.deny and super().ed25519(public_key, domain, payload, signature)

    def wallet_signed_peer(self, peer_key, wallet, chain_id, wallet_sig):
        self.calls.append(("wallet", chain_id))
        super().wallet_signed_peer(peer_key, wallet, chain_id, wallet_sig)


def test_validate_offer__decodes_and_checks_through_the_verifier_passed_in():
    v = Recording()
    data = offer(1).encode()
    validate_offer(data, NOW, Params(), BindingCache(8), verifier=v)
    assert v.calls == [("decode", Offer), ("ed25519", Offer.DOMAIN), ("ed25519", Binding.DOMAIN),
                       ("wallet", 31337)]


@pytest.mark.parametrize("domain, code", [(Offer.DOMAIN, "bad_signature"),
                                          (Binding.DOMAIN, "binding_peer_sig")])
def test_validate_offer__verdict_is_the_verifiers(domain, code):
    with pytest.raises(Reject) as err:
        validate_offer(offer(2).encode(), NOW, Params(), BindingCache(8), verifier=Recording(deny=domain))
    assert err.value.code == code


def test_offer_book__full_path_reannouncement_and_withdrawal_use_its_verifier():
    v = Recording()
    book = OfferBook(Params(), verifier=v)
    held = offer(3, seq=1)
    book.ingest_offer(held.encode(), NOW)
    v.calls.clear()
    again = dataclasses.replace(held, seq=2, created_ms=NOW + 1, expires_ms=held.expires_ms + 1)
    book.ingest_offer(again.sign(provider(3)[0]).encode(), NOW)  # same body: the shortcut
    assert v.calls == [("ed25519", Offer.DOMAIN)]
    v.calls.clear()
    book.ingest_withdrawal(withdrawal(3, seq=2), NOW)
    assert v.calls == [("decode", OfferWithdrawal), ("ed25519", OfferWithdrawal.DOMAIN)]
    assert len(book) == 0


def test_default_verifier__is_the_real_check():
    assert OfferBook(Params()).verifier is VERIFIER
    o = offer(4)
    assert o.signature_valid(o.provider) and o.signature_valid(o.provider, o.encode(), VERIFIER)
    forged = o.encode()[:-1] + bytes([o.encode()[-1] ^ 1])
    with pytest.raises(Reject):
        validate_offer(forged, NOW, Params(), BindingCache(8))
