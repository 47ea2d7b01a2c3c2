"""Builds the protocol test vectors in specs/vectors/ (run: python -m tests.protocol.vectors).

Every key here is a fixed test key: never use them for real funds. The vectors hold wire bytes,
signing inputs, signatures, digests and expected verdicts, so a second implementation can check
itself against ours without running Python.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import sys

from protocol.agreement import AgreementTerms, EscrowDomain, consent_digest, receipt_digest, sign_consent, sign_receipt
from protocol.encoding import pack
from protocol.identity import PeerKey, peer_id_from_public_key
from protocol.messages import (
    Accept, AgreementDetails, Binding, CounterProposal, GpuMetrics, Heartbeat, NegotiationReject,
    Offer, OfferWithdrawal, Proposal, UsageReceipt, digest,
)
from protocol.samples import GPU_MODELS, make_offer

VECTORS_DIR = pathlib.Path(__file__).resolve().parents[2] / "specs" / "vectors"
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PROVIDER_SEED = bytes(range(1, 33))
RENTER_SEED = bytes(range(101, 133))
PROVIDER_WALLET_KEY = bytes([0x11] * 32)
RENTER_WALLET_KEY = bytes([0x22] * 32)
CHAIN_ID = 31337
ESCROW = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
TOKEN = bytes.fromhex("e7f1725e7734ce288f8367e1bb143e90bb3f0512")


def jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, int) and value > 2**53 - 1:
        return str(value)
    return value


def message_vector(name: str, msg, signer: PeerKey | None) -> dict:
    data = msg.encode()
    vec = {"name": name, "type": type(msg).__name__, "type_id": msg.TYPE, "version": msg.VERSION,
           "fields": jsonable(msg), "wire_hex": data.hex(), "sha256": digest(data).hex()}
    if signer is not None:
        vec.update(domain_hex=msg.DOMAIN.hex(), unsigned_hex=msg.unsigned_bytes().hex(),
                   signer_public_key=signer.public.hex(), signer_peer_id=signer.peer_id)
    return vec


def build() -> dict[str, dict]:
    provider, renter = PeerKey(PROVIDER_SEED), PeerKey(RENTER_SEED)
    p_binding = Binding.create(provider, PROVIDER_WALLET_KEY, CHAIN_ID)
    r_binding = Binding.create(renter, RENTER_WALLET_KEY, CHAIN_ID)
    offer = make_offer(provider, p_binding, random.Random(2026), NOW_MS, seq=7, model=GPU_MODELS[0],
                       gpu_count=2, region="eu-frankfurt", price_per_gpu_second=139,
                       escrow=ESCROW, token=TOKEN)
    offer_bytes = offer.encode()
    nid = bytes(range(16))
    proposal = Proposal(nid, 1, digest(offer_bytes), provider.public, renter.public, r_binding, 1,
                        3600, 139, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIexample renter@laptop",
                        NOW_MS + 1000).sign(renter)
    details = AgreementDetails(nid, digest(offer_bytes), provider.public, renter.public, CHAIN_ID,
                               ESCROW, (offer.gpus[0].uuid_digest,), proposal.access_key)
    accept_ms = NOW_MS + 2000
    open_by = (accept_ms + 120_000) // 1000  # the provider's hold: 120 s
    terms = AgreementTerms(p_binding.wallet, r_binding.wallet, TOKEN, 139, 3600, 30, 600,
                           b"\x00" * 20, 0, details.details_hash(), open_by)
    domain = EscrowDomain(CHAIN_ID, ESCROW)
    aid = terms.agreement_id()
    consent = sign_consent(PROVIDER_WALLET_KEY, domain, terms)
    hb0 = Heartbeat(aid, 0, NOW_MS + 30_000, aid[:16], b"\x00" * 32,
                    (GpuMetrics(offer.gpus[0].uuid_digest, 97, 20123, 71, 402_500),)).sign(provider)
    receipt = UsageReceipt(aid, 30, 0, digest(hb0.encode()), bytes(range(16, 32)), NOW_MS + 30_100,
                           sign_receipt(RENTER_WALLET_KEY, domain, aid, 30)).sign(renter)

    valid = [
        message_vector("offer_two_rtx4090", offer, provider),
        message_vector("withdrawal", OfferWithdrawal(provider.public, 7, NOW_MS + 5000).sign(provider), provider),
        message_vector("proposal", proposal, renter),
        message_vector("counter", CounterProposal(nid, 1, 1, 3600, 150, NOW_MS + 1500).sign(provider), provider),
        message_vector("accept", Accept(nid, 2, aid, (offer.gpus[0].uuid_digest,), consent,
                                        open_by, accept_ms).sign(provider), provider),
        message_vector("reject", NegotiationReject(nid, 1, 1, "price below ask", NOW_MS + 1500).sign(renter), renter),
        message_vector("heartbeat_0", hb0, provider),
        message_vector("receipt_30s", receipt, renter),
    ]

    def tamper(data: bytes, pos: int) -> str:
        return (data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]).hex()

    def with_terms(**changes) -> str:
        """The offer with other terms, signed again: only the terms check can fail."""
        changed = dataclasses.replace(offer, terms=dataclasses.replace(offer.terms, **changes))
        return changed.sign(provider).encode().hex()

    big_seq = bytearray(offer_bytes)
    invalid = [
        {"name": "signature_bit_flipped", "wire_hex": tamper(offer_bytes, len(offer_bytes) - 1),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_signature"},
        {"name": "seq_changed_not_resigned", "wire_hex": offer_bytes.replace(b"\xc4\x20" + provider.public + b"\x07", b"\xc4\x20" + provider.public + b"\x08", 1).hex(),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_signature"},
        {"name": "trailing_byte", "wire_hex": (offer_bytes + b"\x00").hex(),
         "now_ms": NOW_MS, "verdict": "reject", "code": "trailing_bytes"},
        {"name": "truncated", "wire_hex": offer_bytes[:-10].hex(),
         "now_ms": NOW_MS, "verdict": "reject", "code": "truncated"},
        {"name": "seq_as_uint32_non_canonical",
         "wire_hex": bytes(big_seq).replace(b"\xc4\x20" + provider.public + b"\x07", b"\xc4\x20" + provider.public + b"\xce\x00\x00\x00\x07", 1).hex(),
         "now_ms": NOW_MS, "verdict": "reject", "code": "non_canonical"},
        {"name": "unknown_type", "wire_hex": pack([250, 1]).hex(),
         "now_ms": NOW_MS, "verdict": "reject", "code": "unknown_type"},
        {"name": "expired", "wire_hex": offer_bytes.hex(), "now_ms": offer.expires_ms + 30_001,
         "verdict": "ignore", "code": "expired"},
        {"name": "from_future", "wire_hex": offer_bytes.hex(), "now_ms": NOW_MS - 30_001,
         "verdict": "ignore", "code": "from_future"},
        # grace and dispute window bounds (the escrow's constants, Params defaults)
        {"name": "grace_below_min", "wire_hex": with_terms(grace_s=299),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        {"name": "grace_above_max", "wire_hex": with_terms(grace_s=604_801),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        {"name": "grace_uint32_max", "wire_hex": with_terms(grace_s=2**32 - 1),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        {"name": "dispute_window_below_min",
         "wire_hex": with_terms(arbiter=bytes([0xab] * 20), dispute_window_s=299),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        {"name": "dispute_window_above_max",
         "wire_hex": with_terms(arbiter=bytes([0xab] * 20), dispute_window_s=604_801),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        {"name": "arbiter_is_the_provider_wallet",
         "wire_hex": with_terms(arbiter=p_binding.wallet, dispute_window_s=3600),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
    ]
    agreement = {
        "chain_id": CHAIN_ID, "escrow": ESCROW.hex(),
        "terms": jsonable(terms),
        "details_wire_hex": details.encode().hex(),
        "details_hash": details.details_hash().hex(),
        "agreement_id": aid.hex(),
        "domain_separator": domain.separator().hex(),
        "consent_digest": consent_digest(domain, terms).hex(),
        "consent_signature": consent.hex(),
        "receipt": {"acked_seconds": 30, "digest": receipt_digest(domain, aid, 30).hex(),
                    "signature": receipt.wallet_sig.hex()},
    }
    keys = {
        "warning": "test keys only",
        "provider_ed25519_seed": PROVIDER_SEED.hex(), "provider_peer_id": peer_id_from_public_key(provider.public),
        "renter_ed25519_seed": RENTER_SEED.hex(), "renter_peer_id": renter.peer_id,
        "provider_wallet_private_key": PROVIDER_WALLET_KEY.hex(), "provider_wallet": p_binding.wallet.hex(),
        "renter_wallet_private_key": RENTER_WALLET_KEY.hex(), "renter_wallet": r_binding.wallet.hex(),
    }
    return {
        "wire.json": {"keys": keys, "valid": valid},
        "validation.json": {"keys": keys, "params": {"clock_skew_ms": 30_000}, "offers": invalid},
        "agreement.json": {"keys": keys, "agreement": agreement},
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def main() -> int:
    VECTORS_DIR.mkdir(parents=True, exist_ok=True)
    for name, doc in build().items():
        (VECTORS_DIR / name).write_text(render(doc))
        print(f"wrote {VECTORS_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
