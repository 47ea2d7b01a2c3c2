"""specs/vectors/ and the code agree: regenerate and compare, then check each vector with
independent tools (plain msgpack, PyNaCl, eth-account) rather than our own decoder alone."""

import hashlib
import json

import msgpack
import nacl.exceptions
import nacl.signing
import pytest
from eth_account import Account

from eth_account.messages import encode_typed_data
from eth_utils import keccak

from protocol import messages
from protocol.encoding import decode
from protocol.errors import DecodeError, RemoteProtocolError
from protocol.params import Params
from protocol.validation import BindingCache, validate_offer, validate_withdrawal
from tests.protocol.vectors import VECTORS_DIR, build, render

VECTORS = {name: json.loads((VECTORS_DIR / name).read_text()) for name in
           ("wire.json", "validation.json", "agreement.json", "decoding.json", "text.json",
            "binding.json")}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vectors__committed_files_match_the_code(name):
    assert (VECTORS_DIR / name).read_text() == render(build()[name]), (
        f"specs/vectors/{name} is stale: run python -m tests.protocol.vectors and review the diff"
    )


@pytest.mark.parametrize("vec", VECTORS["wire.json"]["valid"], ids=lambda v: v["name"])
def test_vectors__valid_messages_check_independently(vec):
    data = bytes.fromhex(vec["wire_hex"])
    assert hashlib.sha256(data).hexdigest() == vec["sha256"]
    raw = msgpack.unpackb(data, raw=False)
    assert raw[0] == vec["type_id"] and raw[1] == vec["version"]
    assert msgpack.packb(raw, use_bin_type=True) == data  # canonical
    assert decode(data).encode() == data
    if "domain_hex" in vec:
        unsigned = msgpack.packb(raw[:-1], use_bin_type=True)
        assert unsigned.hex() == vec["unsigned_hex"]
        key = nacl.signing.VerifyKey(bytes.fromhex(vec["signer_public_key"]))
        key.verify(bytes.fromhex(vec["domain_hex"]) + unsigned, raw[-1])


@pytest.mark.parametrize("vec", VECTORS["wire.json"]["ed25519_edges"], ids=lambda v: v["name"])
def test_vectors__ed25519_edges_get_pynacl_verdict(vec):
    key = nacl.signing.VerifyKey(bytes.fromhex(vec["public_key"]))
    try:
        key.verify(bytes.fromhex(vec["message_hex"]), bytes.fromhex(vec["signature"]))
        valid = True
    except nacl.exceptions.BadSignatureError:
        valid = False
    assert valid == vec["valid"]


@pytest.mark.parametrize("vec", VECTORS["validation.json"]["offers"], ids=lambda v: v["name"])
def test_vectors__offers_get_their_verdict(vec):
    chain_ids = frozenset(vec["chain_ids"]) if "chain_ids" in vec else None
    known_digest = bytes.fromhex(vec["known_digest"]) if "known_digest" in vec else None
    try:
        validate_offer(bytes.fromhex(vec["wire_hex"]), vec["now_ms"], Params(), BindingCache(4),
                       chain_ids=chain_ids, known_seq=vec.get("known_seq", -1),
                       known_digest=known_digest, withdrawn_seq=vec.get("withdrawn_seq", -1))
        got = ("accept", None)
    except RemoteProtocolError as err:
        got = (err.verdict, err.code)
    assert got == (vec["verdict"], vec["code"])


@pytest.mark.parametrize("vec", VECTORS["validation.json"]["withdrawals"], ids=lambda v: v["name"])
def test_vectors__withdrawals_get_their_verdict(vec):
    try:
        validate_withdrawal(bytes.fromhex(vec["wire_hex"]), vec["now_ms"], Params(),
                            withdrawn_seq=vec.get("withdrawn_seq", -1))
        got = ("accept", None)
    except RemoteProtocolError as err:
        got = (err.verdict, err.code)
    assert got == (vec["verdict"], vec["code"])


def test_vectors__agreement_signatures_recover_with_eth_account():
    doc = VECTORS["agreement.json"]
    agreement, keys = doc["agreement"], doc["keys"]
    consent = Account._recover_hash(bytes.fromhex(agreement["consent_digest"]),
                                    signature=bytes.fromhex(agreement["consent_signature"]))
    assert consent.lower() == "0x" + keys["provider_wallet"]
    receipt = Account._recover_hash(bytes.fromhex(agreement["receipt"]["digest"]),
                                    signature=bytes.fromhex(agreement["receipt"]["signature"]))
    assert receipt.lower() == "0x" + keys["renter_wallet"]


# offerbook.json has its own generator and checks (tests/protocol/test_offerbook_vectors.py)
# tests/protocol/test_offerbook_vectors.py, tests/node/test_exec_vectors.py, tests/test_arbitration.py,
# tests/protocol/test_query_interruptible.py
CHECKED_ELSEWHERE = ("offerbook.json", "exec.json", "arbitration.json", "query_classes.json")


def test_vectors__every_file_is_checked_here():
    assert sorted([*VECTORS, *CHECKED_ELSEWHERE]) == sorted(p.name for p in VECTORS_DIR.glob("*.json"))


@pytest.mark.parametrize("vec", VECTORS["decoding.json"]["cases"], ids=lambda v: v["name"])
def test_vectors__decoding_errors_get_their_code(vec):
    expect = getattr(messages, vec["expect"]) if vec["expect"] else None
    data = bytes.fromhex(vec["wire_hex"])
    if vec["code"] is None:
        assert decode(data, expect).encode() == data
        return
    with pytest.raises(DecodeError) as err:
        decode(data, expect)
    assert err.value.code == vec["code"]


@pytest.mark.parametrize("vec", VECTORS["text.json"]["cases"], ids=lambda v: v["name"])
def test_vectors__text_edge_characters(vec):
    data = bytes.fromhex(vec["wire_hex"])
    ch = chr(int(vec["codepoint"][2:], 16))
    assert vec["valid"] == (0x20 <= ord(ch) <= 0x7E)  # the rule, stated without our code
    if vec["message"] == "Offer":  # gossiped: the verdict a relaying peer is scored by
        if vec["valid"]:
            validate_offer(data, VECTORS["text.json"]["now_ms"], Params(), BindingCache(4))
        else:
            with pytest.raises(RemoteProtocolError) as err:
                validate_offer(data, VECTORS["text.json"]["now_ms"], Params(), BindingCache(4))
            assert (err.value.verdict, err.value.code) == ("reject", vec["code"])
    elif vec["valid"]:
        decode(data)
    else:
        with pytest.raises(DecodeError) as err:
            decode(data)
        assert err.value.code == vec["code"]


def test_vectors__binding_digest_and_signatures_check_with_eth_account_and_nacl():
    b = VECTORS["binding.json"]["binding"]
    e = b["eip712"]
    assert keccak(text=e["domain_type"]).hex() == e["domain_typehash"]
    assert keccak(text=e["struct_type"]).hex() == e["struct_typehash"]
    full = {
        "types": {"EIP712Domain": [{"name": "name", "type": "string"},
                                   {"name": "version", "type": "string"},
                                   {"name": "chainId", "type": "uint256"}],
                  "PeerBinding": [{"name": "peerKey", "type": "bytes32"}]},
        "primaryType": "PeerBinding", "domain": e["domain"],
        "message": {"peerKey": bytes.fromhex(b["peer_key"])},
    }
    signable = encode_typed_data(full_message=full)
    assert signable.header.hex() == e["domain_separator"] and signable.body.hex() == e["struct_hash"]
    digest = keccak(b"\x19" + signable.version + signable.header + signable.body)
    assert digest.hex() == e["digest"]
    wallet = Account._recover_hash(digest, signature=bytes.fromhex(b["wallet_sig"]))
    assert wallet.lower() == "0x" + b["wallet"]
    payload = msgpack.packb([bytes.fromhex(b["peer_key"]), bytes.fromhex(b["wallet"]), b["chain_id"]],
                            use_bin_type=True)
    assert payload.hex() == b["peer_sig_payload_hex"]
    nacl.signing.VerifyKey(bytes.fromhex(b["peer_public_key"])).verify(
        bytes.fromhex(b["peer_sig_domain_hex"]) + payload, bytes.fromhex(b["peer_sig"]))
    raw = msgpack.unpackb(bytes.fromhex(b["binding_wire_hex"]))
    assert [raw[0].hex(), raw[1].hex(), raw[2], raw[3].hex(), raw[4].hex()] == [
        b["peer_key"], b["wallet"], b["chain_id"], b["wallet_sig"], b["peer_sig"]]
