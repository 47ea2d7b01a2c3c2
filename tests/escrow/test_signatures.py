"""Consent and receipt signatures: replay across agreements, contracts and chains; malleability."""

from __future__ import annotations

import boa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.agreement import EscrowDomain, receipt_digest, sign_receipt
from protocol.errors import Reject
from protocol.eth import SECP256K1_N, recover_signer

from .helpers import (
    KEYS, claim, consent, deploy_escrow, domain_of, hexaddr, make_terms, open_agreement,
    receipt, raw, tup,
)


def _claim_reverts(escrow, t, acked, sig, reason):
    with boa.env.prank(hexaddr(t.provider)), boa.reverts(reason):
        escrow.claim(tup(t), acked, sig)


def test_receipt_for_another_agreement_rejected(escrow):
    a, b = make_terms(salt=b"a"), make_terms(salt=b"b")
    open_agreement(escrow, a)
    open_agreement(escrow, b)
    _claim_reverts(escrow, b, 100, receipt(escrow, a, 100), "receipt not signed by renter")
    claim(escrow, a, 100)


def test_receipt_and_consent_for_another_contract_rejected(escrow):
    other = deploy_escrow()
    t = make_terms()
    # Consent signed for `other` does not open on `escrow`.
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("consent not signed by provider"):
        escrow.open(tup(t), consent(other, t), value=t.deposit)
    open_agreement(escrow, t)
    open_agreement(other, t)
    _claim_reverts(escrow, t, 100, receipt(other, t, 100), "receipt not signed by renter")


def test_receipt_for_another_chain_rejected(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    sig_here = receipt(escrow, t, 100)
    foreign = sign_receipt(KEYS["renter"], EscrowDomain(5, raw(escrow.address)),
                           t.agreement_id(), 100)
    _claim_reverts(escrow, t, 100, foreign, "receipt not signed by renter")
    # After a chain split (new chain id) the contract recomputes its domain: old-chain
    # signatures stop working there, new-chain ones work.
    old = boa.env.evm.patch.chain_id
    try:
        boa.env.evm.patch.chain_id = 5
        assert escrow.domainSeparator() == EscrowDomain(5, raw(escrow.address)).separator()
        _claim_reverts(escrow, t, 100, sig_here, "receipt not signed by renter")
        claim(escrow, t, 100, foreign)
    finally:
        boa.env.evm.patch.chain_id = old


def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    v = sig[64]
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])


def test_high_s_twin_rejected_on_chain_and_off(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    good = receipt(escrow, t, 100)
    twin = _high_s(good)
    digest = receipt_digest(domain_of(escrow), t.agreement_id(), 100)
    # The twin is a mathematically valid signature by the renter ...
    from eth_keys import keys
    pub = keys.Signature(vrs=(twin[64] - 27, int.from_bytes(twin[:32], "big"),
                              int.from_bytes(twin[32:64], "big"))).recover_public_key_from_msg_hash(digest)
    assert pub.to_canonical_address() == t.renter
    # ... that both the contract and the Python twin refuse.
    with pytest.raises(Reject):
        recover_signer(digest, twin)
    _claim_reverts(escrow, t, 100, twin, "signature s is in the upper half (malleable)")
    claim(escrow, t, 100, good)


def test_malformed_signatures_rejected(escrow):
    t = make_terms()
    open_agreement(escrow, t)
    good = receipt(escrow, t, 1)
    _claim_reverts(escrow, t, 1, good[:64], "signature must be 65 bytes")
    _claim_reverts(escrow, t, 1, good[:64] + b"\x1d", "signature v must be 27 or 28")
    _claim_reverts(escrow, t, 1, good[:64] + b"\x00", "signature v must be 27 or 28")
    _claim_reverts(escrow, t, 1, b"\x00" * 32 + good[32:], "signature r or s is zero")
    _claim_reverts(escrow, t, 1, good[:32] + b"\x00" * 32 + good[64:], "signature r or s is zero")
    # r not on the curve: ecrecover returns zero.
    bad_r = (SECP256K1_N - 1).to_bytes(32, "big")
    with boa.env.prank(hexaddr(t.provider)), boa.reverts():
        escrow.claim(tup(t), 1, bad_r + good[32:])
    with boa.env.prank(hexaddr(t.renter)), boa.reverts("signature must be 65 bytes"):
        escrow.open(tup(make_terms(salt=b"x")), b"", value=make_terms(salt=b"x").deposit)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(acked=st.integers(0, 3_600), signed=st.integers(0, 3_600),
       signer=st.sampled_from(["renter", "provider", "outsider"]))
def test_contract_accepts_receipt_iff_python_twin_does(escrow, acked, signed, signer):
    t = make_terms()
    with boa.env.anchor():
        open_agreement(escrow, t)
        sig = sign_receipt(KEYS[signer], domain_of(escrow), t.agreement_id(), signed)
        digest = receipt_digest(domain_of(escrow), t.agreement_id(), acked)
        python_ok = recover_signer(digest, sig) == t.renter
        assert python_ok == (signer == "renter" and acked == signed)
        if python_ok:
            claim(escrow, t, acked, sig)
            assert escrow.status(t.agreement_id())[0] == 5
        else:
            _claim_reverts(escrow, t, acked, sig, "receipt not signed by renter")
