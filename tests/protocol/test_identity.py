"""Keys, domain-separated signatures, peer ids and the two-way wallet binding."""

import dataclasses
import random

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from protocol.errors import Reject
from protocol.identity import PeerKey, binding_digest, peer_id_from_public_key, verify_ed25519
from protocol.messages import Binding, Heartbeat, Offer, OfferWithdrawal, _unsigned_from_wire


def test_identity__peer_id_matches_py_libp2p():
    libp2p = pytest.importorskip("libp2p")
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    seed = bytes(range(32))
    ours = PeerKey(seed)
    private = Ed25519PrivateKey.from_bytes(seed)
    assert libp2p is not None
    assert peer_id_from_public_key(ours.public) == ID.from_pubkey(private.get_public_key()).to_base58()


def test_signature__domain_separates_message_types():
    key = PeerKey(b"\x05" * 32)
    w = OfferWithdrawal(key.public, 3, 1000).sign(key)
    assert w.signature_valid(key.public)
    # The same bytes signed under another type's domain do not verify as a withdrawal.
    forged = dataclasses.replace(w, signature=key.sign(Heartbeat.DOMAIN, w.unsigned_bytes()))
    assert not forged.signature_valid(key.public)
    assert not verify_ed25519(key.public, Offer.DOMAIN, w.unsigned_bytes(), w.signature)


def test_signature__other_key_fails():
    key, other = PeerKey(b"\x05" * 32), PeerKey(b"\x06" * 32)
    w = OfferWithdrawal(key.public, 3, 1000).sign(key)
    assert not w.signature_valid(other.public)


def test_signature__wire_slice_equals_reencoding():
    key = PeerKey(b"\x05" * 32)
    w = OfferWithdrawal(key.public, 3, 1000).sign(key)
    data = w.encode()
    assert _unsigned_from_wire(data, 4) == w.unsigned_bytes()
    assert w.signature_valid(key.public, data)
    # a changed field byte changes the signed payload sliced from the wire
    tampered = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    assert not w.signature_valid(key.public, tampered)


def test_binding__verifies_and_wallet_digest_matches_eth_account():
    rng = random.Random(3)
    peer = PeerKey(rng.randbytes(32))
    wallet_key = rng.randbytes(32)
    binding = Binding.create(peer, wallet_key, 137)
    binding.verify()
    typed = encode_typed_data(full_message={
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "PeerBinding": [{"name": "peerKey", "type": "bytes32"}],
        },
        "primaryType": "PeerBinding",
        "domain": {"name": "gpumarket-binding", "version": "1", "chainId": 137},
        "message": {"peerKey": peer.public},
    })
    assert Account.sign_message(typed, wallet_key).signature == binding.wallet_sig
    assert len(binding_digest(peer.public, 137)) == 32


@pytest.mark.parametrize("field, value, code", [
    ("chain_id", 1, "binding_peer_sig"),
    ("wallet", b"\x01" * 20, "binding_peer_sig"),
    ("peer_key", PeerKey(b"\x09" * 32).public, "binding_peer_sig"),
    ("wallet_sig", b"\x00" * 65, "bad_signature_v"),
])
def test_binding__tampering_rejected(field, value, code):
    rng = random.Random(4)
    peer = PeerKey(rng.randbytes(32))
    binding = dataclasses.replace(Binding.create(peer, rng.randbytes(32), 137), **{field: value})
    with pytest.raises(Reject) as err:
        binding.verify()
    assert err.value.code == code


def test_binding__wallet_signature_for_other_peer_rejected():
    rng = random.Random(5)
    peer, other = PeerKey(rng.randbytes(32)), PeerKey(rng.randbytes(32))
    wallet_key = rng.randbytes(32)
    good = Binding.create(peer, wallet_key, 137)
    stolen = Binding.create(other, wallet_key, 137)
    # peer signs honestly, but the wallet signature belongs to another peer's binding
    mixed = dataclasses.replace(good, wallet_sig=stolen.wallet_sig)
    with pytest.raises(Reject) as err:
        mixed.verify()
    assert err.value.code == "binding_wallet_mismatch"


def test_binding__eth_account_address_is_the_wallet():
    rng = random.Random(6)
    wallet_key = rng.randbytes(32)
    binding = Binding.create(PeerKey(rng.randbytes(32)), wallet_key, 1)
    assert binding.wallet.hex() == Account.from_key(wallet_key).address[2:].lower()


def test_identity__cached_binding_domain_matches_a_fresh_one_per_chain():
    from eth_utils import keccak

    from protocol.eth import chain_domain_separator, typed_digest
    from protocol.identity import PEER_BINDING_TYPEHASH, binding_digest

    peer = b"\x07" * 32
    for chain_id in (1, 8453, 31337, 1):  # 1 twice: the second comes from the cache
        fresh = chain_domain_separator("gpumarket-binding", "1", chain_id)
        assert binding_digest(peer, chain_id) == typed_digest(
            fresh, keccak(PEER_BINDING_TYPEHASH + peer))
