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

import msgpack

from protocol.agreement import AgreementTerms, EscrowDomain, consent_digest, receipt_digest, sign_consent, sign_receipt
from protocol.encoding import pack
from protocol.eth import CHAIN_DOMAIN_TYPE, CHAIN_DOMAIN_TYPEHASH, keccak
from protocol.identity import (
    BINDING_DOMAIN_NAME, BINDING_DOMAIN_VERSION, PEER_BINDING_TYPE, PEER_BINDING_TYPEHASH, PeerKey,
    _binding_domain_separator, binding_digest, peer_id_from_public_key,
)
from protocol.messages import (
    AccessGrant, Accept, AgreementDetails, Binding, CounterProposal, EvidenceBundle, GpuMetrics,
    Heartbeat, InterruptibleGpus, NegotiationReject, Offer, OfferWithdrawal, PreemptionNotice,
    Proposal, TermsWire, UsageReceipt, digest,
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
    spot_offer = dataclasses.replace(offer, interruptible=(
        InterruptibleGpus((offer.gpus[1].uuid_digest,), 60, 100),)).sign(provider)
    image_offer = dataclasses.replace(
        offer, images=("pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", "ubuntu:24.04")).sign(provider)
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
        message_vector("offer_with_images", image_offer, provider),
        message_vector("withdrawal", OfferWithdrawal(provider.public, 7, NOW_MS + 5000).sign(provider), provider),
        message_vector("proposal", proposal, renter),
        message_vector("counter", CounterProposal(nid, 1, 1, 3600, 150, NOW_MS + 1500).sign(provider), provider),
        message_vector("accept", Accept(nid, 2, aid, (offer.gpus[0].uuid_digest,), consent,
                                        open_by, accept_ms).sign(provider), provider),
        message_vector("reject", NegotiationReject(nid, 1, 1, "price below ask", NOW_MS + 1500).sign(renter), renter),
        message_vector("heartbeat_0", hb0, provider),
        message_vector("receipt_30s", receipt, renter),
        # Interruptible capacity: the offer's second GPU as an interruptible set (60 s notice,
        # 100 < 139 per GPU-second), a proposal for it, and a preemption notice.
        message_vector("offer_one_on_demand_one_interruptible", spot_offer, provider),
        message_vector("proposal_interruptible", dataclasses.replace(
            proposal, offer_digest=digest(spot_offer.encode()), price_per_gpu_second=100,
            notice_s=60).sign(renter), renter),
        # The renter chooses the offer's second image (bound into AgreementDetails.image).
        message_vector("proposal_with_image", dataclasses.replace(
            proposal, offer_digest=digest(image_offer.encode()), image="ubuntu:24.04").sign(renter), renter),
        message_vector("preemption_notice", PreemptionNotice(
            aid, NOW_MS + 95_000, 1, "power price 412.50 USD/MWh", digest(hb0.encode()),
            NOW_MS + 35_000).sign(provider), provider),
        # unsigned itself: terms, details, both bindings and the signed messages' wire bytes
        message_vector("evidence_bundle", EvidenceBundle(
            TermsWire.from_terms(terms), details, p_binding, r_binding, (NOW_MS + 5000) // 1000,
            (hb0.encode(),), (receipt.encode(),), ()), None),
    ]

    def tamper(data: bytes, pos: int) -> str:
        return (data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]).hex()

    def with_terms(**changes) -> str:
        """The offer with other terms, signed again: only the terms check can fail."""
        changed = dataclasses.replace(offer, terms=dataclasses.replace(offer.terms, **changes))
        return changed.sign(provider).encode().hex()

    def with_spot(*sets) -> str:
        return dataclasses.replace(offer, interruptible=sets).sign(provider).encode().hex()

    g0, g1 = offer.gpus[0].uuid_digest, offer.gpus[1].uuid_digest
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
        {"name": "wrong_chain", "wire_hex": offer_bytes.hex(), "now_ms": NOW_MS,
         "chain_ids": [1, 8453], "verdict": "ignore", "code": "wrong_chain"},
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
        # interruptible sets (specs/validation.md)
        {"name": "interruptible_price_not_below_on_demand", "wire_hex": with_spot(InterruptibleGpus((g1,), 60, 139)),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_interruptible"},
        {"name": "interruptible_zero_notice", "wire_hex": with_spot(InterruptibleGpus((g1,), 0, 100)),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_interruptible"},
        {"name": "interruptible_gpu_not_in_offer", "wire_hex": with_spot(InterruptibleGpus((b"\x05" * 32,), 60, 100)),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_interruptible"},
        {"name": "interruptible_gpu_in_two_sets",
         "wire_hex": with_spot(InterruptibleGpus((g1,), 60, 100), InterruptibleGpus((g0, g1), 120, 90)),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_interruptible"},
        {"name": "interruptible_same_notice_twice",
         "wire_hex": with_spot(InterruptibleGpus((g0,), 60, 100), InterruptibleGpus((g1,), 60, 90)),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_interruptible"},
        {"name": "arbiter_is_the_provider_wallet",
         "wire_hex": with_terms(arbiter=p_binding.wallet, dispute_window_s=3600),
         "now_ms": NOW_MS, "verdict": "reject", "code": "bad_terms"},
        *more_offer_verdicts(offer, provider, p_binding, r_binding),
    ]
    agreement = {
        "chain_id": CHAIN_ID, "escrow": ESCROW.hex(),
        "terms": jsonable(terms),
        "details_wire_hex": details.encode().hex(),
        "details_hash": details.details_hash().hex(),
        # The same details for the proposal_with_image vector: only image (and the offer) differ.
        "details_with_image": {
            "wire_hex": (di := dataclasses.replace(details, offer_digest=digest(image_offer.encode()),
                                                   image="ubuntu:24.04")).encode().hex(),
            "details_hash": di.details_hash().hex()},
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
        "decoding.json": {"keys": keys, "cases": decoding_cases(provider)},
        "text.json": {"keys": keys, "rule": TEXT_RULE, "now_ms": NOW_MS,
                      "cases": text_cases(provider, offer)},
        "binding.json": {"keys": keys, "binding": binding_vector(provider, p_binding)},
        "wire.json": {"keys": keys, "valid": valid, "ed25519_edges": ed25519_edge_cases()},
        "validation.json": {"keys": keys, "params": {"clock_skew_ms": 30_000}, "offers": invalid,
                            "withdrawals": withdrawal_verdicts(provider)},
        "agreement.json": {"keys": keys, "agreement": agreement},
    }


def _unrecoverable_r() -> int:
    """The smallest r that is no secp256k1 point's x coordinate (ecrecover fails for it)."""
    from protocol.eth import SECP256K1_HALF_N
    p = 2**256 - 2**32 - 977
    r = 1
    while pow((r**3 + 7) % p, (p - 1) // 2, p) == 1:
        r += 1
    assert r < SECP256K1_HALF_N
    return r


def more_offer_verdicts(offer: Offer, provider: PeerKey, p_binding: Binding, r_binding: Binding) -> list[dict]:
    """One case per row of specs/validation.md's offer table not covered above (each offer
    signed again after the change, so the row under test is its first fault), the order of
    rows where an offer has two faults, the binding's sub-checks with their codes, and the rows
    that need what the node holds from the provider (known_seq, known_digest, withdrawn_seq)."""
    from protocol.eth import SECP256K1_N
    from protocol.identity import sign_binding

    def signed(o: Offer) -> str:
        return o.sign(provider).encode().hex()

    def case(name: str, wire_hex: str, verdict: str, code: str | None, **extra) -> dict:
        return {"name": name, "wire_hex": wire_hex, "now_ms": NOW_MS, "verdict": verdict, "code": code, **extra}

    def terms(**changes) -> str:
        return signed(dataclasses.replace(offer, terms=dataclasses.replace(offer.terms, **changes)))

    def gpu0(**changes) -> str:
        return signed(dataclasses.replace(offer, gpus=(dataclasses.replace(offer.gpus[0], **changes), *offer.gpus[1:])))

    def binding(**changes) -> str:
        return signed(dataclasses.replace(offer, binding=dataclasses.replace(p_binding, **changes)))

    sig = p_binding.wallet_sig
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the malleated twin
    peer_id = provider.peer_id
    bad_peer_sig = p_binding.peer_sig[:-1] + bytes([p_binding.peer_sig[-1] ^ 1])
    data = bytes.fromhex(signed(offer))
    offer_digest = digest(data).hex()
    return [
        case("accept", signed(offer), "accept", None),
        case("lifetime_below_min", signed(dataclasses.replace(offer, expires_ms=offer.created_ms + 59_999)), "reject", "bad_lifetime"),
        case("lifetime_min", signed(dataclasses.replace(offer, expires_ms=offer.created_ms + 60_000)), "accept", None),
        case("lifetime_above_max", signed(dataclasses.replace(offer, expires_ms=offer.created_ms + 7_200_001)), "reject", "bad_lifetime"),
        case("expires_before_created", signed(dataclasses.replace(offer, expires_ms=offer.created_ms - 1)), "reject", "bad_lifetime"),
        case("no_gpus", signed(dataclasses.replace(offer, gpus=())), "reject", "no_gpus"),
        case("duplicate_gpu", signed(dataclasses.replace(offer, gpus=(offer.gpus[0], offer.gpus[0]))), "reject", "duplicate_gpu"),
        # a duplicate GPU is found before the second copy's facts are checked
        case("duplicate_gpu_before_bad_gpu", signed(dataclasses.replace(offer, gpus=(
            offer.gpus[0], dataclasses.replace(offer.gpus[0], vram_mib=0)))), "reject", "duplicate_gpu"),
        case("gpu_vram_zero", gpu0(vram_mib=0), "reject", "bad_gpu"),
        case("gpu_model_empty", gpu0(model=""), "reject", "bad_gpu"),
        case("gpu_cc_major_zero", gpu0(cc_major=0), "reject", "bad_gpu"),
        case("host_no_cpu", signed(dataclasses.replace(offer, host=dataclasses.replace(offer.host, cpu_cores=0))), "reject", "bad_host"),
        case("host_no_ram", signed(dataclasses.replace(offer, host=dataclasses.replace(offer.host, ram_mib=0))), "reject", "bad_host"),
        case("price_zero", terms(price_per_gpu_second=0), "reject", "bad_terms"),
        case("min_duration_zero", terms(min_duration_s=0), "reject", "bad_terms"),
        case("min_duration_above_max", terms(min_duration_s=604_801), "reject", "bad_terms"),
        case("max_duration_above_max_rental", terms(max_duration_s=2_592_001), "reject", "bad_terms"),
        case("heartbeat_below_min", terms(heartbeat_interval_s=4), "reject", "bad_terms"),
        case("heartbeat_above_max", terms(heartbeat_interval_s=601, grace_s=700), "reject", "bad_terms"),
        case("grace_below_heartbeat", terms(heartbeat_interval_s=600, grace_s=599), "reject", "bad_terms"),
        case("escrow_zero", terms(escrow=b"\x00" * 20), "reject", "bad_terms"),
        case("arbiter_without_window", terms(arbiter=bytes([0xab] * 20)), "reject", "bad_terms"),
        case("window_without_arbiter", terms(dispute_window_s=3600), "reject", "bad_terms"),
        case("arbiter_with_window", terms(arbiter=bytes([0xab] * 20), dispute_window_s=3600), "accept", None),
        case("token_decimals_37", terms(token_decimals=37), "reject", "bad_terms"),
        case("token_decimals_36", terms(token_decimals=36), "accept", None),
        # price * len(gpus) * max_duration_s must stay below 2^256 (the largest deposit)
        case("deposit_overflows", terms(price_per_gpu_second=2**256 // (2 * 604_800) + 1), "reject", "bad_terms"),
        case("deposit_largest", terms(price_per_gpu_second=(2**256 - 1) // (2 * 604_800)), "accept", None),
        case("addr_own_peer_id", signed(dataclasses.replace(offer, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",))), "accept", None),
        case("addr_relayed", signed(dataclasses.replace(offer, addrs=(
            f"/ip4/10.0.0.1/tcp/4001/p2p/{PeerKey(RENTER_SEED).peer_id}/p2p-circuit/p2p/{peer_id}",))), "accept", None),
        case("addr_other_peer_id", signed(dataclasses.replace(offer, addrs=(
            f"/ip4/127.0.0.1/tcp/4001/p2p/{PeerKey(RENTER_SEED).peer_id}",))), "reject", "bad_addrs"),
        case("addr_not_starting_with_slash", signed(dataclasses.replace(offer, addrs=(f"ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",))), "reject", "bad_addrs"),
        # the address rule comes after the interruptible sets, the binding rows after it
        case("bad_addrs_before_binding_peer_mismatch", signed(dataclasses.replace(
            offer, binding=r_binding, addrs=("/ip4/127.0.0.1/tcp/4001",))), "reject", "bad_addrs"),
        case("binding_of_another_key", signed(dataclasses.replace(offer, binding=r_binding)), "reject", "binding_peer_mismatch"),
        case("binding_for_another_chain", signed(dataclasses.replace(
            offer, binding=Binding.create(provider, PROVIDER_WALLET_KEY, 1))), "reject", "binding_chain_mismatch"),
        # the static rows come before the signature: a bad offer is blamed for what it says
        case("bad_terms_before_bad_signature", tamper_last(terms(price_per_gpu_second=0)), "reject", "bad_terms"),
        # row 15, in its order: zero wallet, then the peer signature, then the wallet signature
        case("binding_zero_wallet", binding(wallet=b"\x00" * 20, peer_sig=bad_peer_sig), "reject", "binding_zero_wallet"),
        case("binding_peer_sig_flipped", binding(peer_sig=bad_peer_sig), "reject", "binding_peer_sig"),
        case("binding_peer_sig_before_wallet_sig", binding(peer_sig=bad_peer_sig, wallet_sig=sig[:64] + b"\x1d"), "reject", "binding_peer_sig"),
        case("binding_wallet_sig_v_29", binding(wallet_sig=sig[:64] + b"\x1d"), "reject", "bad_signature_v"),
        case("binding_wallet_sig_v_1", binding(wallet_sig=sig[:64] + bytes([v - 27])), "reject", "bad_signature_v"),
        case("binding_wallet_sig_high_s", binding(wallet_sig=high_s), "reject", "bad_signature_high_s"),
        case("binding_wallet_sig_r_zero", binding(wallet_sig=bytes(32) + sig[32:]), "reject", "bad_signature_high_s"),
        case("binding_wallet_sig_s_zero", binding(wallet_sig=r + bytes(32) + sig[64:]), "reject", "bad_signature_high_s"),
        case("binding_wallet_sig_r_is_n", binding(wallet_sig=SECP256K1_N.to_bytes(32, "big") + sig[32:]), "reject", "bad_signature_high_s"),
        case("binding_wallet_sig_unrecoverable", binding(wallet_sig=_unrecoverable_r().to_bytes(32, "big") + sig[32:]), "reject", "bad_signature"),
        case("binding_signed_by_another_wallet", binding(wallet_sig=sign_binding(RENTER_WALLET_KEY, provider.public, CHAIN_ID)), "reject", "binding_wallet_mismatch"),
        # rows 2 and 16-18: what the node holds from this provider
        case("duplicate", data.hex(), "ignore", "duplicate", known_seq=offer.seq, known_digest=offer_digest),
        case("duplicate_even_if_expired", data.hex(), "ignore", "duplicate", known_seq=offer.seq, known_digest=offer_digest,
             now_ms=offer.expires_ms + 30_001),
        case("equivocation", signed(dataclasses.replace(offer, expires_ms=offer.expires_ms - 1)), "reject", "equivocation",
             known_seq=offer.seq, known_digest=offer_digest),
        case("stale_seq", data.hex(), "ignore", "stale_seq", known_seq=offer.seq + 1, known_digest="00" * 32),
        case("withdrawn", data.hex(), "ignore", "withdrawn", withdrawn_seq=offer.seq),
        case("withdrawn_below", data.hex(), "accept", None, withdrawn_seq=offer.seq - 1),
        case("newer_than_held", data.hex(), "accept", None, known_seq=offer.seq - 1, known_digest="00" * 32),
        # a bad signature is a REJECT even when the offer is stale (the signature row comes first)
        case("bad_signature_before_stale_seq", tamper_last(data.hex()), "reject", "bad_signature", known_seq=offer.seq + 1,
             known_digest="00" * 32),
    ]


def withdrawal_verdicts(provider: PeerKey) -> list[dict]:
    """specs/validation.md, OfferWithdrawal: each row, its edges and the rows' order."""
    w = OfferWithdrawal(provider.public, 7, NOW_MS).sign(provider).encode().hex()
    live = NOW_MS + 7_200_000 + 30_000  # created_ms + offer_max_lifetime_ms + clock_skew_ms

    def case(name: str, wire_hex: str, now_ms: int, verdict: str, code: str | None, **extra) -> dict:
        return {"name": name, "wire_hex": wire_hex, "now_ms": now_ms, "verdict": verdict, "code": code, **extra}

    return [
        case("accept", w, NOW_MS, "accept", None),
        case("accept_at_skew", w, NOW_MS - 30_000, "accept", None),
        case("from_future", w, NOW_MS - 30_001, "ignore", "from_future"),
        case("accept_last_ms", w, live, "accept", None),
        case("expired", w, live + 1, "ignore", "expired"),
        case("duplicate", w, NOW_MS, "ignore", "duplicate", withdrawn_seq=7),
        case("newer_than_applied", w, NOW_MS, "accept", None, withdrawn_seq=6),
        case("bad_signature", tamper_last(w), NOW_MS, "reject", "bad_signature"),
        case("duplicate_before_bad_signature", tamper_last(w), NOW_MS, "ignore", "duplicate", withdrawn_seq=8),
        case("oversized", w + "00" * (257 - len(w) // 2), NOW_MS, "reject", "oversized"),
        # type 1 (an Offer's) with a withdrawal's fields: the wrong type is found before the fields
        case("offer_type_is_unexpected", "9601" + w[4:], NOW_MS, "reject", "unexpected_type"),
    ]


def tamper_last(wire_hex: str) -> str:
    """The message with the last byte of its signature flipped."""
    data = bytes.fromhex(wire_hex)
    return (data[:-1] + bytes([data[-1] ^ 1])).hex()


def resign(value: list, cls, signer: PeerKey) -> bytes:
    """The canonical bytes of a message given as a raw msgpack list (possibly holding values our
    encoder refuses), signed again so that its only fault is the one put in on purpose."""
    unsigned = pack(value[:-1])
    return pack(value[:-1] + [signer.sign(cls.DOMAIN, unsigned)])


def decoding_cases(provider: PeerKey) -> list[dict]:
    """Inputs to `decode` and the error code each must give (specs/wire.md, Decoding errors)."""
    w = OfferWithdrawal(provider.public, 7, NOW_MS, b"\x00" * 64).sign(provider)
    good = w.encode()
    fields = [2, 1, provider.public, 7, NOW_MS, w.signature]

    def with_field(index: int, raw: bytes) -> str:
        # `raw` spliced in as the encoded value of fields[index]: built by hand, since our
        # packer would not produce most of these
        head = bytes([0x90 | len(fields)])
        return (head + b"".join(raw if i == index else pack(v) for i, v in enumerate(fields))).hex()

    def nested(depth: int) -> bytes:
        return b"\x91" * depth + b"\x00"

    cases = [
        ("valid_withdrawal", good.hex(), None, None),
        ("float64_in_a_field", with_field(3, bytes.fromhex("cb401c000000000000")), None, "malformed"),
        ("float32_in_a_field", with_field(3, bytes.fromhex("ca40e00000")), None, "malformed"),
        ("empty_map_in_a_field", with_field(3, b"\x80"), None, "malformed"),
        ("map_in_a_field", with_field(3, b"\x81\x01\x02"), None, "malformed"),
        ("ext_in_a_field", with_field(3, b"\xd4\x05\x00"), None, "malformed"),
        ("timestamp_ext_in_a_field", with_field(3, b"\xd6\xff\x00\x00\x00\x01"), None, "malformed"),
        # an invalid timestamp stops parsing where it is met; a valid one does not
        ("invalid_timestamp_then_truncated", "93c703ff000000", None, "malformed"),
        ("timestamp_nanoseconds_over_1e9", "92d7ff" + "ff" * 8, None, "malformed"),
        ("valid_timestamp_then_truncated", "93d6ffffffffff", None, "truncated"),
        ("float_top_level", "cb3ff8000000000000", None, "malformed"),
        ("map_top_level", "81a16101", None, "malformed"),
        ("float_after_a_bad_field", (bytes([0x96]) + pack(2) + pack(1) + pack(b"short") + bytes.fromhex("cb401c000000000000") + pack(NOW_MS) + pack(w.signature)).hex(), None, "malformed"),
        ("float_in_unknown_type", "9363" "01" "cb3ff8000000000000", None, "malformed"),
        ("map_then_truncated", "930180", None, "truncated"),
        ("map_then_trailing_bytes", "92018000", None, "malformed"),
        ("trailing_bytes", (good + b"\x00").hex(), None, "trailing_bytes"),
        ("empty", "", None, "truncated"),
        ("truncated_in_signature", good[:-1].hex(), None, "truncated"),
        ("array_header_longer_than_input", "9c01", None, "truncated"),
        # a header announcing more than the whole input can hold is truncated at once; one that
        # could fit goes on parsing, and the 0xc1 after it decides
        ("array_count_over_input_length", "930199c100000000", None, "truncated"),
        ("array_count_equal_to_input_length", "930198c100000000", None, "malformed"),
        ("map_pairs_over_half_input_length", "930185c10000000000", None, "truncated"),
        ("map_pairs_half_input_length", "930184c10000000000", None, "malformed"),
        ("bin_longer_than_rest", "9302c4ff00", None, "truncated"),
        ("byte_c1_then_truncated", "9302c1", None, "malformed"),
        ("invalid_utf8_str", "9302a1ff", None, "malformed"),
        ("utf8_surrogate_str", "9202a3eda080", None, "malformed"),
        ("utf8_overlong_str", "9202a2c0af", None, "malformed"),
        ("valid_utf8_non_ascii_text_is_bad_field",  # NegotiationReject.detail = "é"
         pack([13, 1, bytes(16), 1, 1, "\u00e9", NOW_MS, bytes(64)]).hex(), None, "bad_field"),
        # an Offer (16 KiB) holding arrays nested 1 + 1023 = 1024 deep: parses, wrong fields
        ("nesting_1024_then_bad_field", (b"\x93\x01\x01" + nested(1023)).hex(), None, "bad_field"),
        ("nesting_1025", (b"\x93\x01\x01" + nested(1024)).hex(), None, "malformed"),
        # the 1025th level's header is malformed before its count is looked at: even a count
        # over the whole input (truncated at any other level) or an input ending right there
        ("nesting_1025_with_count_over_input", (b"\x93\x01\x01" + b"\x91" * 1023 + b"\xdd\xff\xff\xff\xff").hex(), None, "malformed"),
        ("nesting_1025_map_with_count_over_input", (b"\x93\x01\x01" + b"\x91" * 1023 + b"\xdf\xff\xff\xff\xff").hex(), None, "malformed"),
        ("nesting_1025_header_at_end_of_input", (b"\x93\x01\x01" + b"\x91" * 1024).hex(), None, "malformed"),
        ("nesting_1024_with_count_over_input", (b"\x93\x01\x01" + b"\x91" * 1022 + b"\xdd\xff\xff\xff\xff").hex(), None, "truncated"),
        ("padded_integer", with_field(3, b"\xce\x00\x00\x00\x07"), None, "non_canonical"),
        ("str8_for_short_text", "9202d90161", None, "non_canonical"),
        ("bool_in_a_field", with_field(3, b"\xc3"), None, "bad_field"),
        ("nil_in_a_field", with_field(3, b"\xc0"), None, "bad_field"),
        ("str_where_bin_expected", with_field(2, pack("x" * 32)), None, "bad_field"),
        ("integer_above_2_53", with_field(3, pack(2**53)), None, "bad_field"),
        ("negative_integer", with_field(3, b"\xff"), None, "bad_field"),
        ("type_not_integer", "92a16101", None, "malformed"),
        ("one_element", "9102", None, "malformed"),
        ("unknown_type", "92fa01", None, "unknown_type"),
        ("unsupported_version", with_field(1, b"\x02"), None, "unsupported_version"),
        ("unexpected_type", good.hex(), "Offer", "unexpected_type"),
        ("oversized_for_expected_type", (good + b"\x00" * 256).hex(), "OfferWithdrawal", "oversized"),
        ("oversized_type_limit", "93" "02" "01" "c5" "0100" + "00" * 256, None, "oversized"),
    ]
    return [{"name": n, "wire_hex": h, "expect": e, "code": c} for n, h, e, c in cases]


TEXT_RULE = ("a text field is a msgpack str whose every character is in U+0020..U+007E "
             "(printable ASCII; one byte each); anything else is bad_field")
TEXT_EDGES = (0x00, 0x09, 0x0A, 0x1F, 0x20, 0x21, 0x7E, 0x7F, 0x80, 0x9F, 0xA0, 0xAD, 0xE9,
              0x2028, 0x202E, 0x3000, 0xFEFF, 0xE000, 0x1FAE8)


def text_cases(provider: PeerKey, offer) -> list[dict]:
    """Offers whose region is "eu" + one edge character (signed, so the character is the only
    fault), then one non-ASCII character (U+00A0) in every other text field."""
    cases = []

    def case(name: str, cls, value: list, where: str, ch: str, signer: PeerKey) -> None:
        ok = 0x20 <= ord(ch) <= 0x7E
        cases.append({"name": name, "message": cls.__name__, "field": where,
                      "codepoint": f"U+{ord(ch):04X}", "wire_hex": resign(value, cls, signer).hex(),
                      "valid": ok, "code": None if ok else "bad_field"})

    for cp in TEXT_EDGES:
        v = msgpack_list(offer)
        v[7][4] = "eu" + chr(cp)
        case(f"offer_region_U+{cp:04X}", Offer, v, "host.region", chr(cp), provider)
    nbsp = "\u00a0"
    for path, where in (((6, 0, 0), "gpus[0].model"), ((6, 0, 5), "gpus[0].driver_version"),
                        ((8, 2), "terms.token_symbol")):
        v = msgpack_list(offer)
        target = v
        for i in path[:-1]:
            target = target[i]
        target[path[-1]] = target[path[-1]][:8] + nbsp
        case(f"offer_{where}_U+00A0", Offer, v, where, nbsp, provider)
    v = msgpack_list(offer)
    v[10] = ["/ip4/127.0.0.1/tcp/4001" + nbsp + "/p2p/" + provider.peer_id]
    case("offer_addrs_U+00A0", Offer, v, "addrs[0]", nbsp, provider)
    v = msgpack_list(offer)
    v[11] = ["ubuntu" + nbsp + ":24.04"]
    case("offer_images_U+00A0", Offer, v, "images[0]", nbsp, provider)
    image_offer = dataclasses.replace(
        offer, images=("pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", "ubuntu:24.04")).sign(provider)
    nid = bytes(range(16))
    reject = msgpack_list(NegotiationReject(nid, 1, 1, "price below ask", NOW_MS).sign(provider))
    reject[5] = "price" + nbsp + "below ask"
    case("reject_detail_U+00A0", NegotiationReject, reject, "detail", nbsp, provider)
    grant = msgpack_list(AccessGrant(b"\x01" * 32, "ssh -p 2222 user@host", NOW_MS).sign(provider))
    grant[3] = "ssh -p 2222 user@host" + nbsp
    case("access_grant_U+00A0", AccessGrant, grant, "access", nbsp, provider)
    grant[3] = "ssh -p 2222 user@host\n"
    case("access_grant_line_feed", AccessGrant, grant, "access", "\n", provider)
    return cases


def msgpack_list(msg) -> list:
    return msgpack.unpackb(msg.encode(), raw=False)


def binding_vector(provider: PeerKey, binding: Binding) -> dict:
    """The binding's two signatures, with every intermediate value of the EIP-712 digest."""
    domain_sep = _binding_domain_separator(binding.chain_id)
    struct_hash = keccak(PEER_BINDING_TYPEHASH + binding.peer_key)
    payload = pack([binding.peer_key, binding.wallet, binding.chain_id])
    return {
        "binding_wire_hex": pack([binding.peer_key, binding.wallet, binding.chain_id,
                                  binding.wallet_sig, binding.peer_sig]).hex(),
        "peer_key": binding.peer_key.hex(), "wallet": binding.wallet.hex(),
        "chain_id": binding.chain_id,
        "eip712": {
            "domain": {"name": BINDING_DOMAIN_NAME, "version": BINDING_DOMAIN_VERSION,
                       "chainId": binding.chain_id},
            "domain_type": CHAIN_DOMAIN_TYPE.decode(), "domain_typehash": CHAIN_DOMAIN_TYPEHASH.hex(),
            "struct_type": PEER_BINDING_TYPE.decode(), "struct_typehash": PEER_BINDING_TYPEHASH.hex(),
            "domain_separator": domain_sep.hex(), "struct_hash": struct_hash.hex(),
            "digest": binding_digest(binding.peer_key, binding.chain_id).hex(),
        },
        "wallet_sig": binding.wallet_sig.hex(),
        "peer_sig_domain_hex": Binding.DOMAIN.hex(), "peer_sig_payload_hex": payload.hex(),
        "peer_sig": binding.peer_sig.hex(), "peer_public_key": provider.public.hex(),
    }


# ed25519 edge cases (specs/wire.md, "Verification rules"): crafted with plain affine Edwards
# arithmetic, since no signing library makes these signatures.
_ED_P = 2**255 - 19
_ED_L = 2**252 + 27742317777372353535851937790883648493
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P


def _ed_add(P: tuple, Q: tuple) -> tuple:
    (x1, y1), (x2, y2) = P, Q
    t = _ED_D * x1 * x2 * y1 * y2 % _ED_P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, _ED_P) % _ED_P,
            (y1 * y2 + x1 * x2) * pow(1 - t, -1, _ED_P) % _ED_P)


def _ed_mul(k: int, P: tuple) -> tuple:
    out = (0, 1)
    while k:
        if k & 1:
            out = _ed_add(out, P)
        P, k = _ed_add(P, P), k >> 1
    return out


def _ed_decode(b: bytes) -> tuple:
    y = int.from_bytes(b, "little") & (2**255 - 1)
    u, v = (y * y - 1) % _ED_P, (_ED_D * y * y + 1) % _ED_P
    x = pow(u * pow(v, -1, _ED_P), (_ED_P + 3) // 8, _ED_P)
    if (v * x * x - u) % _ED_P:
        x = x * pow(2, (_ED_P - 1) // 4, _ED_P) % _ED_P
    assert (v * x * x - u) % _ED_P == 0, "not a point"
    if x & 1 != b[31] >> 7:
        x = -x % _ED_P
    return x, y


def _ed_encode(P: tuple) -> bytes:
    x, y = P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def ed25519_edge_cases() -> list[dict]:
    """Signatures where an RFC 8032 verifier may differ from ours (libsodium's rules): each with
    the verdict of protocol.identity.verify_ed25519 and the rule that decides it."""
    import hashlib

    from protocol.identity import verify_ed25519

    B = _ed_decode((4 * pow(5, -1, _ED_P) % _ED_P).to_bytes(32, "little"))
    T = _ed_decode(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"))
    assert _ed_mul(8, T) == (0, 1) and _ed_mul(4, T) != (0, 1)  # order 8
    a, r = 0x1234567890ABCDEF1234567890ABCDEF, 0xFEDCBA0987654321FEDCBA0987654321
    A = _ed_mul(a, B)
    Ab, Rb = _ed_encode(A), _ed_encode(_ed_mul(r, B))
    Am = _ed_encode(_ed_add(A, T))  # mixed order: A plus a point of order 8

    def k_of(R: bytes, key: bytes, msg: bytes) -> int:
        return int.from_bytes(hashlib.sha512(R + key + msg).digest(), "little") % _ED_L

    def sig(R: bytes, S: int) -> bytes:
        return R + S.to_bytes(32, "little")

    def message_where(pred, R_of, key: bytes, start: int) -> tuple[bytes, bytes, int]:
        for i in range(start, start + 1000):
            msg = f"gpumarket edge {i}".encode()
            R = R_of(i)
            k = k_of(R, key, msg)
            if pred(k, i):
                return msg, R, k
        raise AssertionError("no message found")

    cases = []

    def add(name: str, key: bytes, msg: bytes, signature: bytes, valid: bool, why: str) -> None:
        got = verify_ed25519(key, b"", msg, signature)
        assert got == valid, (name, got)
        cases.append({"name": name, "public_key": key.hex(), "message_hex": msg.hex(),
                      "signature": signature.hex(), "valid": valid, "why": why})

    m0 = b"gpumarket edge 0"
    good = sig(Rb, (r + k_of(Rb, Ab, m0) * a) % _ED_L)
    add("valid", Ab, m0, good, True, "an ordinary signature")
    add("s_plus_l", Ab, m0, sig(Rb, int.from_bytes(good[32:], "little") + _ED_L), False, "rule 1: S >= L")
    msg, _, _ = message_where(lambda k, i: k % 8 != 0, lambda i: Rb, Am, 100)
    add("mixed_order_key", Am, msg, sig(Rb, (r + k_of(Rb, Am, msg) * a) % _ED_L), False,
        "rule 5: the cofactored equation holds, the cofactorless one does not (k not a multiple of 8)")
    msg, _, _ = message_where(lambda k, i: k % 8 == 0, lambda i: Rb, Am, 100)
    add("mixed_order_key_k_multiple_of_8", Am, msg, sig(Rb, (r + k_of(Rb, Am, msg) * a) % _ED_L), True,
        "a mixed-order key is not refused as such: both equations hold when 8 divides k")
    Tb = _ed_encode(T)
    add("small_order_r", Ab, m0, sig(Tb, k_of(Tb, Ab, m0) * a % _ED_L), False,
        "rules 2 and 5: R of order 8; only the cofactored equation holds")
    ident = _ed_encode((0, 1))
    # R the identity over a mixed-order key, S = k a: [S]B - [k]A' = -[k]T = identity = R when
    # 8 | k, so only rule 2 refuses it
    msg, _, k = message_where(lambda k, i: k % 8 == 0, lambda i: ident, Am, 300)
    add("identity_r_cofactorless_holds", Am, msg, sig(ident, k * a % _ED_L), False,
        "rule 2 alone: R is the identity (small order) although the cofactorless equation holds")
    # a small-order key T with S = 0 and R = -[k]T: the cofactorless equation holds; rule 3 refuses
    msg, R, _ = message_where(lambda k, i: _ed_mul(-k % 8, T) == _ed_mul(i % 8, T),
                              lambda i: _ed_encode(_ed_mul(i % 8, T)), Tb, 400)
    add("small_order_key", Tb, msg, sig(R, 0), False,
        "rule 3 (and rule 2 for R): the key has order 8 although the cofactorless equation holds")
    y3 = (3 + _ED_P).to_bytes(32, "little")  # y = 3 is a point; p + 3 fits in 255 bits
    add("non_canonical_key", y3, m0, good, False, "rule 3: y(A) >= p")
    return cases


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
