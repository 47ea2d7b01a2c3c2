"""specs/vectors/ and the code agree: regenerate and compare, then check each vector with
independent tools (plain msgpack, PyNaCl, eth-account) rather than our own decoder alone."""

import hashlib
import json

import msgpack
import nacl.signing
import pytest
from eth_account import Account

from protocol.encoding import decode
from protocol.errors import RemoteProtocolError
from protocol.params import Params
from protocol.validation import BindingCache, validate_offer
from tests.protocol.vectors import VECTORS_DIR, build, render

VECTORS = {name: json.loads((VECTORS_DIR / name).read_text()) for name in
           ("wire.json", "validation.json", "agreement.json")}


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


@pytest.mark.parametrize("vec", VECTORS["validation.json"]["offers"], ids=lambda v: v["name"])
def test_vectors__invalid_offers_get_their_verdict(vec):
    with pytest.raises(RemoteProtocolError) as err:
        validate_offer(bytes.fromhex(vec["wire_hex"]), vec["now_ms"], Params(), BindingCache(4))
    assert (err.value.verdict, err.value.code) == (vec["verdict"], vec["code"])


def test_vectors__agreement_signatures_recover_with_eth_account():
    doc = VECTORS["agreement.json"]
    agreement, keys = doc["agreement"], doc["keys"]
    consent = Account._recover_hash(bytes.fromhex(agreement["consent_digest"]),
                                    signature=bytes.fromhex(agreement["consent_signature"]))
    assert consent.lower() == "0x" + keys["provider_wallet"]
    receipt = Account._recover_hash(bytes.fromhex(agreement["receipt"]["digest"]),
                                    signature=bytes.fromhex(agreement["receipt"]["signature"]))
    assert receipt.lower() == "0x" + keys["renter_wallet"]
