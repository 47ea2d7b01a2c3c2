"""Agreement terms exactly as the escrow contract sees them, and the EIP-712 messages around them.

The contract stores only a hash of the terms (`agreement_id`); every call passes the terms in
calldata and the contract re-hashes them. The hash is the EIP-712 struct hash of `Agreement`, so
the same 32 bytes serve as the agreement id, the terms hash the negotiation ends with, and what
the provider's wallet signs (inside the EIP-712 digest) to consent to the terms.

Off-chain details the contract never needs (peer keys, GPUs, the offer, the renter's access key)
are committed to by `details_hash`, so the on-chain id still pins them down.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


from .errors import LocalProtocolError, Reject
from .eth import (
    ZERO_ADDRESS,
    check_address,
    contract_domain_separator,
    keccak,
    recover_signer,
    sign_digest,
    typed_digest,
)

ESCROW_DOMAIN_NAME = "gpumarket-escrow"
ESCROW_DOMAIN_VERSION = "1"

AGREEMENT_TYPE = (
    b"Agreement(address provider,address renter,address token,uint256 pricePerSecond,"
    b"uint64 maxSeconds,uint32 heartbeatInterval,uint32 grace,address arbiter,"
    b"uint32 disputeWindow,bytes32 detailsHash,uint64 openBy)"
)
AGREEMENT_TYPEHASH = keccak(AGREEMENT_TYPE)
RECEIPT_TYPE = b"Receipt(bytes32 agreementId,uint64 ackedSeconds)"
RECEIPT_TYPEHASH = keccak(RECEIPT_TYPE)

# The escrow contract's bounds on the terms (constants in node/contracts/Escrow.vy; offers are
# validated against Params, whose defaults are these: specs/parameters.md).
ESCROW_MIN_GRACE_S = 300
ESCROW_MAX_GRACE_S = 7 * 24 * 3600
ESCROW_MIN_DISPUTE_WINDOW_S = 300
ESCROW_MAX_DISPUTE_WINDOW_S = 7 * 24 * 3600

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1


@dataclass(frozen=True, slots=True)
class EscrowDomain:
    """The EIP-712 domain of one escrow deployment: chain id plus contract address."""

    chain_id: int
    contract: bytes

    def separator(self) -> bytes:
        if type(self.chain_id) is int and type(self.contract) is bytes:
            return _escrow_separator(self.chain_id, self.contract)
        return contract_domain_separator(
            ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, self.chain_id, self.contract
        )


@functools.lru_cache(maxsize=256)  # a few escrow deployments; bounded against made-up ones
def _escrow_separator(chain_id: int, contract: bytes) -> bytes:
    """Cached: building a separator costs ~0.1-0.3 ms (eth_abi plus three keccaks) and every
    consent and receipt digest needs one."""
    return contract_domain_separator(ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id, contract)


@dataclass(frozen=True, slots=True)
class AgreementTerms:
    """What the contract enforces. Amounts are in the token's smallest unit; times in seconds."""

    provider: bytes  # payee wallet (20 bytes)
    renter: bytes  # payer wallet (20 bytes)
    token: bytes  # ERC-20 address, or 20 zero bytes for the chain's native coin
    price_per_second: int  # for the whole agreement (all GPUs), smallest token unit
    max_seconds: int  # the deposit buys this many seconds
    heartbeat_interval: int  # seconds between provider heartbeats
    grace: int  # seconds after the end during which the provider may still claim
    arbiter: bytes  # 20 zero bytes: no arbiter, the receipt rule is final
    dispute_window: int  # seconds after a claim during which either side may dispute
    details_hash: bytes  # keccak256 of the canonical off-chain agreement details
    # Unix seconds: the escrow refuses to open after this (block time). The provider sets it when
    # it accepts (accept time + how long it holds the GPUs), so its consent dies with the hold.
    open_by: int

    def __post_init__(self) -> None:
        for name in ("provider", "renter", "token", "arbiter"):
            check_address(getattr(self, name), name)
        if self.provider == ZERO_ADDRESS or self.renter == ZERO_ADDRESS:
            raise LocalProtocolError("bad_terms", "provider and renter must be non-zero addresses")
        if self.provider == self.renter:
            raise LocalProtocolError("bad_terms", "provider and renter must differ")
        if not 0 < self.price_per_second <= UINT256_MAX:
            raise LocalProtocolError("bad_terms", "price_per_second must be positive")
        if not 0 < self.max_seconds <= UINT64_MAX:
            raise LocalProtocolError("bad_terms", "max_seconds must be positive")
        if self.price_per_second * self.max_seconds > UINT256_MAX:
            raise LocalProtocolError("bad_terms", "deposit overflows uint256")
        for name in ("heartbeat_interval", "grace", "dispute_window"):
            if not 0 <= getattr(self, name) <= UINT32_MAX:
                raise LocalProtocolError("bad_terms", f"{name} out of uint32 range")
        if self.heartbeat_interval == 0:
            raise LocalProtocolError("bad_terms", "heartbeat_interval must be positive")
        if (self.arbiter == ZERO_ADDRESS) != (self.dispute_window == 0):
            raise LocalProtocolError(
                "bad_terms", "an arbiter needs a dispute window, and no arbiter means none"
            )
        if self.arbiter != ZERO_ADDRESS and self.arbiter in (self.provider, self.renter):
            raise LocalProtocolError("bad_terms", "the arbiter is a party to the agreement")
        if not 0 < self.open_by <= UINT64_MAX:
            raise LocalProtocolError("bad_terms", "open_by out of uint64 range")
        if len(self.details_hash) != 32:
            raise LocalProtocolError("bad_terms", "details_hash must be 32 bytes")

    @property
    def deposit(self) -> int:
        return self.price_per_second * self.max_seconds

    @property
    def has_arbiter(self) -> bool:
        return self.arbiter != ZERO_ADDRESS

    def as_tuple(self) -> tuple:
        """Field values in ABI order, as the contract's `Terms` struct takes them."""
        return (
            self.provider, self.renter, self.token, self.price_per_second, self.max_seconds,
            self.heartbeat_interval, self.grace, self.arbiter, self.dispute_window,
            self.details_hash, self.open_by,
        )

    def agreement_id(self) -> bytes:
        """The EIP-712 struct hash of the terms; the contract's key for this agreement."""
        # abi.encode of the typehash and the fields: all static, one 32-byte word each
        # (addresses left-padded, uints big-endian); __post_init__ checked every size and
        # range. eth_abi took ~0.2 ms a call, and every negotiation message needs the id.
        pad = bytes(12)
        return keccak(b"".join((
            AGREEMENT_TYPEHASH, pad, self.provider, pad, self.renter, pad, self.token,
            self.price_per_second.to_bytes(32, "big"), self.max_seconds.to_bytes(32, "big"),
            self.heartbeat_interval.to_bytes(32, "big"), self.grace.to_bytes(32, "big"),
            pad, self.arbiter, self.dispute_window.to_bytes(32, "big"), self.details_hash,
            self.open_by.to_bytes(32, "big"),
        )))


def consent_digest(domain: EscrowDomain, terms: AgreementTerms) -> bytes:
    """What the provider's wallet signs to agree to `terms` (checked by the contract at open)."""
    return typed_digest(domain.separator(), terms.agreement_id())


def sign_consent(private_key: bytes, domain: EscrowDomain, terms: AgreementTerms) -> bytes:
    return sign_digest(private_key, consent_digest(domain, terms))


def verify_consent(domain: EscrowDomain, terms: AgreementTerms, signature: bytes) -> None:
    if recover_signer(consent_digest(domain, terms), signature) != terms.provider:
        raise Reject("consent_signer_mismatch", "consent is not signed by the provider's wallet")


def receipt_struct_hash(agreement_id: bytes, acked_seconds: int) -> bytes:
    if len(agreement_id) != 32:
        raise LocalProtocolError("bad_receipt", "agreement_id must be 32 bytes")
    if not 0 <= acked_seconds <= UINT64_MAX:
        raise LocalProtocolError("bad_receipt", "acked_seconds out of uint64 range")
    # abi.encode(bytes32, bytes32, uint64): three 32-byte words (eth_abi took 60 of 85 us)
    return keccak(RECEIPT_TYPEHASH + agreement_id + acked_seconds.to_bytes(32, "big"))


def receipt_digest(domain: EscrowDomain, agreement_id: bytes, acked_seconds: int) -> bytes:
    """What the renter's wallet signs: cumulative seconds of service acknowledged so far."""
    return typed_digest(domain.separator(), receipt_struct_hash(agreement_id, acked_seconds))


def sign_receipt(
    private_key: bytes, domain: EscrowDomain, agreement_id: bytes, acked_seconds: int
) -> bytes:
    return sign_digest(private_key, receipt_digest(domain, agreement_id, acked_seconds))


def recover_receipt_signer(
    domain: EscrowDomain, agreement_id: bytes, acked_seconds: int, signature: bytes
) -> bytes:
    return recover_signer(receipt_digest(domain, agreement_id, acked_seconds), signature)
