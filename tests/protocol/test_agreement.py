"""Agreement terms, consent and receipts agree with an independent EIP-712 implementation."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from eth_account import Account
from eth_account.messages import encode_typed_data

from protocol.agreement import (
    AgreementTerms,
    EscrowDomain,
    recover_receipt_signer,
    sign_consent,
    sign_receipt,
    verify_consent,
)
from protocol.errors import LocalProtocolError, Reject
from protocol.eth import SECP256K1_N, private_key_address

PROVIDER_KEY, RENTER_KEY = b"\x11" * 32, b"\x22" * 32
DOMAIN = EscrowDomain(131277322940537, b"\x44" * 20)


def terms(**kw):
    base = dict(
        provider=private_key_address(PROVIDER_KEY), renter=private_key_address(RENTER_KEY),
        token=b"\x00" * 20, price_per_second=417, max_seconds=7200, heartbeat_interval=30,
        grace=600, arbiter=b"\x00" * 20, dispute_window=0, details_hash=b"\x33" * 32,
        open_by=1_767_225_720,
    )
    base.update(kw)
    return AgreementTerms(**base)


def eip712(primary, fields, message):
    return encode_typed_data(full_message={
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            primary: [{"name": n, "type": t} for n, t in fields],
        },
        "primaryType": primary,
        "domain": {"name": "gpumarket-escrow", "version": "1", "chainId": DOMAIN.chain_id,
                   "verifyingContract": "0x" + DOMAIN.contract.hex()},
        "message": message,
    })


def test_consent__matches_eth_account_typed_data():
    t = terms()
    fields = [("provider", "address"), ("renter", "address"), ("token", "address"),
              ("pricePerSecond", "uint256"), ("maxSeconds", "uint64"),
              ("heartbeatInterval", "uint32"), ("grace", "uint32"), ("arbiter", "address"),
              ("disputeWindow", "uint32"), ("detailsHash", "bytes32"), ("openBy", "uint64")]
    message = {name: ("0x" + v.hex() if isinstance(v, bytes) and len(v) == 20 else v)
               for (name, _), v in zip(fields, t.as_tuple())}
    expected = Account.sign_message(eip712("Agreement", fields, message), PROVIDER_KEY).signature
    assert sign_consent(PROVIDER_KEY, DOMAIN, t) == expected
    verify_consent(DOMAIN, t, expected)


def test_consent__signed_by_someone_else_rejected():
    with pytest.raises(Reject) as err:
        verify_consent(DOMAIN, terms(), sign_consent(RENTER_KEY, DOMAIN, terms()))
    assert err.value.code == "consent_signer_mismatch"


def test_receipt__matches_eth_account_and_recovers_renter():
    t = terms()
    aid = t.agreement_id()
    sig = sign_receipt(RENTER_KEY, DOMAIN, aid, 1234)
    expected = Account.sign_message(
        eip712("Receipt", [("agreementId", "bytes32"), ("ackedSeconds", "uint64")],
               {"agreementId": aid, "ackedSeconds": 1234}), RENTER_KEY).signature
    assert sig == expected
    assert recover_receipt_signer(DOMAIN, aid, 1234, sig) == t.renter


def test_receipt__bound_to_agreement_chain_and_contract():
    t = terms()
    aid = t.agreement_id()
    sig = sign_receipt(RENTER_KEY, DOMAIN, aid, 100)
    assert recover_receipt_signer(DOMAIN, aid, 101, sig) != t.renter
    assert recover_receipt_signer(DOMAIN, terms(max_seconds=7201).agreement_id(), 100, sig) != t.renter
    other_chain = EscrowDomain(DOMAIN.chain_id + 1, DOMAIN.contract)
    assert recover_receipt_signer(other_chain, aid, 100, sig) != t.renter
    other_contract = EscrowDomain(DOMAIN.chain_id, b"\x45" * 20)
    assert recover_receipt_signer(other_contract, aid, 100, sig) != t.renter


def test_receipt__high_s_twin_rejected():
    sig = sign_receipt(RENTER_KEY, DOMAIN, terms().agreement_id(), 5)
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    with pytest.raises(Reject) as err:
        recover_receipt_signer(DOMAIN, terms().agreement_id(), 5, twin)
    assert err.value.code == "bad_signature_high_s"


@pytest.mark.parametrize("change", [
    {"provider": b"\x00" * 20}, {"price_per_second": 0}, {"max_seconds": 0},
    {"heartbeat_interval": 0}, {"dispute_window": 60}, {"arbiter": b"\x01" * 20},
    {"price_per_second": 2**200, "max_seconds": 2**60}, {"details_hash": b"\x00"},
    {"open_by": 0}, {"open_by": 2**64},
    # an arbiter who is a party could award itself the deposit
    {"arbiter": private_key_address(PROVIDER_KEY), "dispute_window": 3600},
    {"arbiter": private_key_address(RENTER_KEY), "dispute_window": 3600},
])
def test_terms__impossible_terms_are_a_local_error(change):
    with pytest.raises(LocalProtocolError):
        terms(**change)


def test_terms__every_field_changes_the_id():
    base = terms()
    ids = {base.agreement_id()}
    for field, value in [("token", b"\x01" * 20), ("price_per_second", 418), ("max_seconds", 7201),
                         ("heartbeat_interval", 31), ("grace", 601), ("details_hash", b"\x34" * 32),
                         ("open_by", base.open_by + 1)]:
        ids.add(dataclasses.replace(base, **{field: value}).agreement_id())
    assert len(ids) == 8


def test_agreement__cached_escrow_separator_matches_a_fresh_one():
    from protocol.agreement import ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, EscrowDomain
    from protocol.eth import contract_domain_separator

    for chain_id, contract in ((1, b"\x01" * 20), (1, b"\x02" * 20), (8453, b"\x01" * 20),
                               (1, b"\x01" * 20)):
        assert EscrowDomain(chain_id, contract).separator() == contract_domain_separator(
            ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id, contract)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32).filter(lambda k: 0 < int.from_bytes(k, "big") < SECP256K1_N),
       st.binary(min_size=32, max_size=32))
def test_eth__secp256k1_signatures_equal_eth_keys_bytes_and_recover_alike(key, digest):
    """protocol.eth calls libsecp256k1 through coincurve directly; eth-keys is the reference."""
    from eth_keys import keys

    from protocol.eth import recover_signer, sign_digest

    ref = keys.PrivateKey(key).sign_msg_hash(digest)
    expected = ref.r.to_bytes(32, "big") + ref.s.to_bytes(32, "big") + bytes([ref.v + 27])
    assert sign_digest(key, digest) == expected
    address = keys.PrivateKey(key).public_key.to_canonical_address()
    assert private_key_address(key) == address == recover_signer(digest, expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_eth__keccak_equals_eth_utils(data):
    from eth_utils import keccak as reference

    from protocol.eth import keccak

    assert keccak(data) == reference(data)


ADDR = st.binary(min_size=20, max_size=20)


@settings(max_examples=200, deadline=None)
@given(ADDR.filter(any), ADDR.filter(any), ADDR, st.integers(1, 2**128), st.integers(1, 2**64 - 1),
       st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32),
       st.integers(1, 2**64 - 1))
def test_agreement_id__equals_the_eth_abi_struct_hash(provider, renter, token, price, seconds,
                                                      interval, grace, details, open_by):
    from eth_abi import encode as abi_encode

    from protocol.agreement import AGREEMENT_TYPEHASH
    from protocol.eth import keccak

    if provider == renter:
        renter = bytes([renter[0] ^ 1]) + renter[1:]
    t = terms(provider=provider, renter=renter, token=token, price_per_second=price,
              max_seconds=seconds, heartbeat_interval=interval, grace=grace, details_hash=details,
              open_by=open_by)
    want = keccak(abi_encode(
        ["bytes32", "address", "address", "address", "uint256", "uint64", "uint32", "uint32",
         "address", "uint32", "bytes32", "uint64"], [AGREEMENT_TYPEHASH, *t.as_tuple()]))
    assert t.agreement_id() == want
