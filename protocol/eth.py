"""secp256k1 / EIP-712 primitives shared by agreements, receipts and wallet bindings.

Signatures are 65 bytes `r || s || v` with v in {27, 28}, the layout `ecrecover` takes. Only
low-s signatures are accepted (s <= n/2), on-chain and off-chain alike, so a signature has exactly
one valid encoding and cannot be re-used in a malleated form.
"""

from __future__ import annotations

import functools

import coincurve
import sha3  # safe-pysha3
from eth_abi import encode as abi_encode

from .errors import LocalProtocolError, Reject


def keccak(data: bytes) -> bytes:
    """keccak256 (Ethereum's, not NIST SHA3-256). safe-pysha3's C keccak directly: ~1.5 us
    against ~15-22 us through eth_utils and eth-hash's pycryptodome backend, and every
    receipt, heartbeat check and recovered address takes one or more."""
    return sha3.keccak_256(data).digest()


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
ZERO_ADDRESS = b"\x00" * 20

DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE)
# A domain with no contract: used where a signature is bound to a chain but not one contract.
CHAIN_DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId)"
CHAIN_DOMAIN_TYPEHASH = keccak(CHAIN_DOMAIN_TYPE)


def check_address(value: bytes, what: str = "address") -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 20:
        raise LocalProtocolError("bad_address", f"{what} must be 20 bytes")
    return bytes(value)


def contract_domain_separator(name: str, version: str, chain_id: int, contract: bytes) -> bytes:
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [DOMAIN_TYPEHASH, keccak(name.encode()), keccak(version.encode()), chain_id,
             check_address(contract, "verifyingContract")],
        )
    )


def chain_domain_separator(name: str, version: str, chain_id: int) -> bytes:
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256"],
            [CHAIN_DOMAIN_TYPEHASH, keccak(name.encode()), keccak(version.encode()), chain_id],
        )
    )


def typed_digest(domain_separator: bytes, struct_hash: bytes) -> bytes:
    """The EIP-712 digest a wallet signs: keccak256(0x1901 || domainSeparator || hashStruct)."""
    return keccak(b"\x19\x01" + domain_separator + struct_hash)


# libsecp256k1 through coincurve, directly: eth-keys wraps the same calls (with coincurve
# installed) in objects and checks that cost more than the curve work. Measured per call:
# sign 319 -> ~80 us, recover 180 -> ~70 us. Same bytes: RFC 6979 nonces, low-s normalised.


def _address(public_key: coincurve.PublicKey) -> bytes:
    return keccak(public_key.format(compressed=False)[1:])[12:]


@functools.lru_cache(maxsize=16384)
def _signer(private_key: bytes) -> coincurve.PrivateKey:
    # Building a coincurve key derives two public keys (~80 us); a node signs with one wallet
    # key, the simulator with one per agent, so the ones in use are kept (in this process's
    # memory, where the wallet holds them anyway). Room for a 10,000-node simulation: at 1,024
    # its renters' keys thrashed the cache (38,814 rebuilt keys in a 3,000-node, 900 s run).
    return coincurve.PrivateKey(private_key)


def private_key_address(private_key: bytes) -> bytes:
    return _address(_signer(bytes(private_key)).public_key)


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """Sign a 32-byte digest; returns r||s||v (v = 27/28), always low-s."""
    if len(digest) != 32:
        raise LocalProtocolError("bad_digest", "digest must be 32 bytes")
    sig = _signer(bytes(private_key)).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])  # libsecp256k1: low-s, recovery id 0/1


def recover_signer(digest: bytes, signature: bytes) -> bytes:
    """Return the 20-byte address that signed `digest`; Reject on malformed or high-s input."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 65:
        raise Reject("bad_signature_length", "secp256k1 signature must be 65 bytes")
    r = int.from_bytes(signature[0:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v not in (27, 28):
        raise Reject("bad_signature_v", f"v must be 27 or 28, got {v}")
    if not (0 < r < SECP256K1_N) or not (0 < s <= SECP256K1_HALF_N):
        raise Reject("bad_signature_high_s", "s must be in the lower half of the curve order")
    try:
        return _address(coincurve.PublicKey.from_signature_and_message(
            bytes(signature[:64]) + bytes([v - 27]), digest, hasher=None))
    except Exception as exc:  # no point on the curve for this r, or a malformed digest
        raise Reject("bad_signature", f"cannot recover signer: {exc}") from None
