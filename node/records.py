"""What a node keeps about each agreement: in memory, a :class:`Rental` (an open or resumed
rental, either role) or a :class:`PendingAgreement` (provider: accepted, escrow not yet open);
on disk, the agreement record (the store's ``agreements`` blob: the terms, the details and both
wallet bindings, in canonical encoding), which restart reads back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.agreement import AgreementTerms, EscrowDomain
from protocol.encoding import Struct, encode_struct, pack, unpack_canonical
from protocol.messages import AgreementDetails, Binding, TermsWire

if TYPE_CHECKING:
    from .chain import TxResult
    from .rentals import ProviderSession, RenterSession


@dataclass
class Rental:
    """One agreement as this node sees it (either role)."""

    role: str
    terms: AgreementTerms
    details: AgreementDetails
    session: ProviderSession | RenterSession | None = None
    opened: TxResult | None = None
    started_s: int | None = None
    access: str | None = None  # what the provider's access hook printed
    events: list[str] = field(default_factory=list)
    closed_end_s: int | None = None  # the end the escrow recorded when the renter closed early
    provider_binding: Binding | None = None  # both bindings go into the evidence bundle
    renter_binding: Binding | None = None

    @property
    def agreement_id(self) -> bytes:
        return self.terms.agreement_id()


@dataclass(frozen=True)
class PendingAgreement:
    """Provider: accepted in negotiation, the escrow not yet seen open."""

    terms: AgreementTerms
    details: AgreementDetails
    domain: EscrowDomain
    accepted_ms: int
    renter_binding: Binding | None = None  # for the evidence bundle


def encode_agreement(terms: AgreementTerms, details: AgreementDetails,
                     provider_binding: Binding | None = None,
                     renter_binding: Binding | None = None) -> bytes:
    """[TermsWire struct bytes, details bytes, provider binding bytes, renter binding bytes]
    (a binding not known: empty bytes)."""
    return pack([encode_struct(TermsWire.from_terms(terms)), details.encode(),
                 encode_struct(provider_binding) if provider_binding else b"",
                 encode_struct(renter_binding) if renter_binding else b""])


def decode_bindings(blob: bytes) -> tuple[Binding | None, Binding | None]:
    """The provider's and the renter's bindings from an agreement record (absent: None)."""
    parts = unpack_canonical(blob)
    out: list[Binding | None] = []
    for raw in (parts[2:4] if len(parts) >= 4 else [b"", b""]):
        out.append(Struct(Binding).from_wire(unpack_canonical(raw)) if raw else None)
    return out[0], out[1]


def decode_agreement(blob: bytes) -> tuple[AgreementTerms, AgreementDetails]:
    """The inverse of :func:`encode_agreement`: [TermsWire struct bytes, details bytes,
    provider binding bytes, renter binding bytes] (the bindings may be absent)."""
    terms_raw, details_raw = unpack_canonical(blob)[:2]
    terms = Struct(TermsWire).from_wire(unpack_canonical(terms_raw)).to_terms()
    details = Struct(AgreementDetails).from_wire(unpack_canonical(details_raw))
    return terms, details


__all__ = ["Rental", "PendingAgreement", "encode_agreement", "decode_agreement", "decode_bindings"]
