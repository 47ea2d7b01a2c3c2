"""The agreement record a node stores for each agreement (the store's ``agreements.blob``):
the terms, the details and both wallet bindings, in canonical encoding. Restart reads it back."""

from __future__ import annotations

from protocol.agreement import AgreementTerms
from protocol.encoding import Struct, encode_struct, pack, unpack_canonical
from protocol.messages import AgreementDetails, Binding, TermsWire


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


__all__ = ["encode_agreement", "decode_agreement", "decode_bindings"]
