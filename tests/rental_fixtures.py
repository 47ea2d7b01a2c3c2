"""Agreements built directly (the negotiation is someone else's module): keys, terms, details,
bindings, and a pair of rental machines wired by a virtual clock."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from protocol.agreement import AgreementTerms, EscrowDomain
from protocol.eth import ZERO_ADDRESS, private_key_address
from protocol.identity import PeerKey
from protocol.messages import AgreementDetails, Binding

CHAIN_ID = 31337
ESCROW = b"\xee" * 20
TOKEN = b"\x70" * 20


@dataclass
class Agreement:
    terms: AgreementTerms
    details: AgreementDetails
    domain: EscrowDomain
    provider: PeerKey
    renter: PeerKey
    provider_wallet_key: bytes
    renter_wallet_key: bytes
    provider_binding: Binding
    renter_binding: Binding

    @property
    def agreement_id(self) -> bytes:
        return self.terms.agreement_id()


def make_agreement(
    seed: int = 1,
    *,
    max_seconds: int = 600,
    interval: int = 10,
    grace: int = 300,
    price: int = 7,
    gpu_count: int = 2,
    arbiter: bytes = ZERO_ADDRESS,
    dispute_window: int = 0,
) -> Agreement:
    rng = random.Random(seed)
    provider, renter = PeerKey(rng.randbytes(32)), PeerKey(rng.randbytes(32))
    pw, rw = rng.randbytes(32), rng.randbytes(32)
    gpus = tuple(hashlib.sha256(b"gpu-%d-%d" % (seed, i)).digest() for i in range(gpu_count))
    details = AgreementDetails(
        negotiation_id=rng.randbytes(16),
        offer_digest=rng.randbytes(32),
        provider_key=provider.public,
        renter_key=renter.public,
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        gpus=gpus,
        access_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample renter@host",
    )
    terms = AgreementTerms(
        provider=private_key_address(pw),
        renter=private_key_address(rw),
        token=TOKEN,
        price_per_second=price,
        max_seconds=max_seconds,
        heartbeat_interval=interval,
        grace=grace,
        arbiter=arbiter,
        dispute_window=dispute_window,
        details_hash=details.details_hash(),
    )
    return Agreement(
        terms=terms,
        details=details,
        domain=EscrowDomain(CHAIN_ID, ESCROW),
        provider=provider,
        renter=renter,
        provider_wallet_key=pw,
        renter_wallet_key=rw,
        provider_binding=Binding.create(provider, pw, CHAIN_ID),
        renter_binding=Binding.create(renter, rw, CHAIN_ID),
    )
