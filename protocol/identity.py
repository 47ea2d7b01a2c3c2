"""Node identity: ed25519 keys, domain-separated signatures, libp2p peer ids, wallet bindings.

Every ed25519 signature covers `domain || canonical bytes of the message without its signature`.
Each message type has its own domain string (see `DOMAINS` in messages.py and specs/wire.md), and
the canonical bytes start with the message's type and version too, so a heartbeat's signature can
never be replayed as an offer's, nor one version's as another's.
"""

from __future__ import annotations

import functools
import hashlib

import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_sign_open as _crypto_sign_open

from .errors import LocalProtocolError, Reject
from .eth import (chain_domain_separator, keccak, recover_signer, sign_digest,
                  typed_digest)

ED25519_SIG_LEN = 64

BINDING_DOMAIN_NAME = "gpumarket-binding"
BINDING_DOMAIN_VERSION = "1"
PEER_BINDING_TYPE = b"PeerBinding(bytes32 peerKey)"

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


PEER_BINDING_TYPEHASH = keccak(PEER_BINDING_TYPE)


class PeerKey:
    """An ed25519 signing key from a 32-byte seed. The seed's storage is the node's business."""

    __slots__ = ("_signing_key", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise LocalProtocolError("bad_seed", "an ed25519 seed is 32 bytes")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.public: bytes = bytes(self._signing_key.verify_key)

    @classmethod
    def from_signing_key(cls, key: nacl.signing.SigningKey) -> "PeerKey":
        return cls(bytes(key))

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        return self._signing_key.sign(domain + payload).signature

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public)


def verify_ed25519(public_key: bytes, domain: bytes, payload: bytes, signature: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != ED25519_SIG_LEN:
        return False
    if type(public_key) is bytes and type(signature) is bytes:
        # What VerifyKey(public_key).verify(domain + payload, signature) does, minus building a
        # VerifyKey and its argument checks (done above) for every message.
        try:
            _crypto_sign_open(signature + domain + payload, public_key)
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            return False
    try:
        nacl.signing.VerifyKey(public_key).verify(domain + payload, signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return (b"1" * pad + bytes(reversed(out))).decode()


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of an ed25519 key: base58btc of the identity multihash of the
    protobuf-encoded public key (KeyType Ed25519 = 1). Matches py-libp2p's `ID.from_pubkey`."""
    if len(public_key) != 32:
        raise LocalProtocolError("bad_public_key", "an ed25519 public key is 32 bytes")
    proto = b"\x08\x01\x12\x20" + public_key
    return _b58encode(b"\x00" + bytes([len(proto)]) + proto)


def short_id(public_key: bytes) -> str:
    """A short, stable display id for a peer key (not a security boundary)."""
    return hashlib.sha256(public_key).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Wallet binding: ties a libp2p identity (ed25519) to an EVM wallet (secp256k1) both ways.


def binding_digest(peer_key: bytes, chain_id: int) -> bytes:
    """EIP-712 digest the wallet signs: PeerBinding(peerKey) in the domain
    {name: "gpumarket-binding", version: "1", chainId}."""
    if len(peer_key) != 32:
        raise LocalProtocolError("bad_public_key", "peer key is 32 bytes")
    struct_hash = keccak(PEER_BINDING_TYPEHASH + peer_key)
    if type(chain_id) is int:
        return typed_digest(_binding_domain_separator(chain_id), struct_hash)
    return typed_digest(
        chain_domain_separator(BINDING_DOMAIN_NAME, BINDING_DOMAIN_VERSION, chain_id), struct_hash
    )


@functools.lru_cache(maxsize=64)  # a node trades on a few chains; bounded against made-up ids
def _binding_domain_separator(chain_id: int) -> bytes:
    """The binding domain's separator for one chain, cached: building it (eth_abi encoding and
    three keccaks, 0.1-0.3 ms on the 2-core dev machine) was paid by every new provider's
    binding check; what remains is two keccaks, the peer-key ed25519 check and the ecrecover."""
    return chain_domain_separator(BINDING_DOMAIN_NAME, BINDING_DOMAIN_VERSION, chain_id)


def sign_binding(wallet_private_key: bytes, peer_key: bytes, chain_id: int) -> bytes:
    return sign_digest(wallet_private_key, binding_digest(peer_key, chain_id))


def check_wallet_signed_peer(peer_key: bytes, wallet: bytes, chain_id: int, wallet_sig: bytes) -> None:
    if recover_signer(binding_digest(peer_key, chain_id), wallet_sig) != wallet:
        raise Reject("binding_wallet_mismatch", "wallet signature does not name this peer key")
