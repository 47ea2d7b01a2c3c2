"""Every message on the wire, as frozen typed dataclasses (specs/wire.md is the prose twin).

Times on the wire are integer unix milliseconds (`*_ms`); durations of a rental are seconds
(`*_s`), the unit the escrow contract counts in. Token amounts are `Amount` (uint256).

Signed messages end with a 64-byte ed25519 `signature` over
`DOMAIN || canonical encoding of [type, version, every field but the signature]`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Self


from .agreement import AgreementTerms
from .encoding import (
    Amount,
    FixedBytes,
    ListOf,
    Message,
    Struct,
    Text,
    UInt,
    VarBytes,
    array_header,
    encode_struct,
    pack,
    register,
    wire,
)
from .errors import Reject
from .eth import ZERO_ADDRESS, keccak
from .identity import ED25519_SIG_LEN, PeerKey, sign_binding
from .verifier import VERIFIER, Verifier

B16, B20, B32, B64, B65 = (FixedBytes(n) for n in (16, 20, 32, 64, 65))
U8, U16, U32, U53 = UInt(8), UInt(16), UInt(32), UInt(53)

MAX_GPUS_PER_OFFER = 64
MAX_INTERRUPTIBLE_SETS = 8  # interruptible GPU sets per offer
MAX_OFFER_ADDRS = 4
MAX_ADDR_LEN = 256  # a relayed address names two peer ids (about 155 characters)
MAX_OFFER_IMAGES = 8  # container images a provider offers (specs/runtime.md)
MAX_IMAGE_LEN = 128
KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Signing


class Signed(Message):
    """A message whose last field is an ed25519 `signature` under the class's DOMAIN."""

    __slots__ = ()
    DOMAIN: ClassVar[bytes]

    def unsigned_bytes(self) -> bytes:
        return pack([self.TYPE, self.VERSION, *self.wire_fields()[:-1]])

    def sign(self, key: PeerKey) -> Self:
        return dataclasses.replace(self, signature=key.sign(self.DOMAIN, self.unsigned_bytes()))

    def signature_valid(self, public_key: bytes, data: bytes | None = None,
                        verifier: Verifier = VERIFIER) -> bool:
        """Check the signature. Pass the message's wire bytes as `data` when you have them:
        the unsigned bytes are then sliced out instead of re-encoded."""
        payload = _unsigned_from_wire(data, len(_field_names(type(self)))) if data else None
        if payload is None:
            payload = self.unsigned_bytes()
        return verifier.ed25519(public_key, self.DOMAIN, payload, self.signature)  # type: ignore[attr-defined]

    @classmethod
    def wire_signature_valid(cls, public_key: bytes, data: bytes,
                             verifier: Verifier = VERIFIER) -> bool:
        """The signature check on a message's canonical wire bytes, without decoding them."""
        payload = _unsigned_from_wire(data, len(_field_names(cls)))
        return payload is not None and verifier.ed25519(public_key, cls.DOMAIN, payload, data[-64:])


SIG_TRAILER = b"\xc4\x40"  # msgpack bin8 header of a 64-byte signature
SIG_TAIL = len(SIG_TRAILER) + ED25519_SIG_LEN  # the encoded signature: a signed message's end


def key_prefix(cls: type) -> bytes:
    """The first bytes of every canonical message of `cls` whose first field is a 32-byte key:
    array header, type, version, bin8(32). Derived from the class, so a new field cannot make
    a peek at the key disagree with the layout."""
    return array_header(2 + len(dataclasses.fields(cls))) + bytes([cls.TYPE, cls.VERSION, 0xC4, 0x20])


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _unsigned_from_wire(data: bytes, n_fields: int) -> bytes | None:
    # The canonical array is header + element encodings; dropping the last element (the
    # 66-byte encoded signature) and rewriting the count gives the unsigned encoding.
    if data[-SIG_TAIL:-ED25519_SIG_LEN] != SIG_TRAILER:
        return None
    head = array_header(2 + n_fields)
    return array_header(1 + n_fields) + data[len(head):-SIG_TAIL]


def digest(data: bytes) -> bytes:
    """Content hash of a message's wire bytes (offer ids, heartbeat chaining)."""
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------------------------------------
# Structs embedded in messages


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as the provider's NVML probe reports it."""

    model: str = wire(Text(64))  # NVML name, e.g. "NVIDIA GeForce RTX 4090"
    uuid_digest: bytes = wire(B32)  # sha256 of the NVML UUID string: stable, not the raw UUID
    vram_mib: int = wire(U32)
    cc_major: int = wire(U8)  # CUDA compute capability
    cc_minor: int = wire(U8)
    driver_version: str = wire(Text(32))
    cuda_version: int = wire(U32)  # as NVML reports it: major * 1000 + minor * 10
    pcie_gen: int = wire(U8)
    pcie_width: int = wire(U8)
    power_limit_w: int = wire(U16)


@dataclass(frozen=True, slots=True)
class HostInfo:
    cpu_cores: int = wire(U16)
    ram_mib: int = wire(U32)
    disk_gib: int = wire(U32)
    bandwidth_mbps: int = wire(U32)
    region: str = wire(Text(32))  # coarse, e.g. "eu-frankfurt"; self-reported


@dataclass(frozen=True, slots=True)
class OfferTerms:
    chain_id: int = wire(U53)
    token: bytes = wire(B20)  # ERC-20 address; 20 zero bytes = the chain's native coin
    token_symbol: str = wire(Text(12))
    token_decimals: int = wire(U8)
    price_per_gpu_second: int = wire(Amount())  # smallest token unit
    escrow: bytes = wire(B20)
    min_duration_s: int = wire(U32)
    max_duration_s: int = wire(U32)
    heartbeat_interval_s: int = wire(U32)
    grace_s: int = wire(U32)
    arbiter: bytes = wire(B20)  # 20 zero bytes: no arbiter
    dispute_window_s: int = wire(U32)

    def price_per_gpu_hour(self) -> int:
        return self.price_per_gpu_second * 3600


@dataclass(frozen=True, slots=True)
class InterruptibleGpus:
    """A set of the offer's GPUs sold as interruptible: the provider may stop them before the
    agreement's end, after a PreemptionNotice at least `notice_s` seconds ahead, and sells them
    for less than on-demand. GPUs of an offer in no such set are on-demand."""

    gpus: tuple = wire(ListOf(B32, MAX_GPUS_PER_OFFER))  # uuid digests, each a GPU of the offer
    notice_s: int = wire(U32)  # the least notice promised before a preemption, >= 1
    price_per_gpu_second: int = wire(Amount())  # below the on-demand price (terms)


@dataclass(frozen=True, slots=True)
class Binding:
    """A two-way binding of a peer key and an EVM wallet on one chain: the wallet signs the peer
    key (EIP-712 PeerBinding), the peer key signs [peer_key, wallet, chain_id] (ed25519)."""

    DOMAIN: ClassVar[bytes] = b"gpumarket/binding/v1\x00"

    peer_key: bytes = wire(B32)
    wallet: bytes = wire(B20)
    chain_id: int = wire(U53)
    wallet_sig: bytes = wire(B65)
    peer_sig: bytes = wire(B64)

    @staticmethod
    def _peer_payload(peer_key: bytes, wallet: bytes, chain_id: int) -> bytes:
        return pack([peer_key, wallet, chain_id])

    @classmethod
    def create(cls, peer: PeerKey, wallet_private_key: bytes, chain_id: int) -> "Binding":
        from .eth import private_key_address

        wallet = private_key_address(wallet_private_key)
        return cls(
            peer_key=peer.public,
            wallet=wallet,
            chain_id=chain_id,
            wallet_sig=sign_binding(wallet_private_key, peer.public, chain_id),
            peer_sig=peer.sign(cls.DOMAIN, cls._peer_payload(peer.public, wallet, chain_id)),
        )

    def verify(self, verifier: Verifier = VERIFIER) -> None:
        """Raise Reject unless both signatures hold. Costs one ecrecover (~0.2 ms): cache by
        `cache_key()` where bindings repeat (every offer of a provider carries the same one)."""
        if self.wallet == ZERO_ADDRESS:
            raise Reject("binding_zero_wallet", "binding names the zero address")
        payload = self._peer_payload(self.peer_key, self.wallet, self.chain_id)
        if not verifier.ed25519(self.peer_key, self.DOMAIN, payload, self.peer_sig):
            raise Reject("binding_peer_sig", "peer signature over the wallet is invalid")
        verifier.wallet_signed_peer(self.peer_key, self.wallet, self.chain_id, self.wallet_sig)

    def cache_key(self) -> tuple:
        return (self.peer_key, self.wallet, self.chain_id, self.wallet_sig, self.peer_sig)


@dataclass(frozen=True, slots=True)
class GpuMetrics:
    """A live snapshot of one GPU, carried in every heartbeat."""

    uuid_digest: bytes = wire(B32)
    util_pct: int = wire(U8)
    mem_used_mib: int = wire(U32)
    temp_c: int = wire(U8)
    power_mw: int = wire(U32)


@dataclass(frozen=True, slots=True)
class TermsWire:
    """`AgreementTerms` on the wire (in evidence bundles)."""

    provider: bytes = wire(B20)
    renter: bytes = wire(B20)
    token: bytes = wire(B20)
    price_per_second: int = wire(Amount())
    max_seconds: int = wire(U53)
    heartbeat_interval: int = wire(U32)
    grace: int = wire(U32)
    arbiter: bytes = wire(B20)
    dispute_window: int = wire(U32)
    details_hash: bytes = wire(B32)
    open_by: int = wire(U53)  # unix seconds (uint64 on chain; a date fits 53 bits)

    @classmethod
    def from_terms(cls, terms: AgreementTerms) -> "TermsWire":
        return cls(*terms.as_tuple())

    def to_terms(self) -> AgreementTerms:
        return AgreementTerms(*dataclasses.astuple(self))


@dataclass(frozen=True, slots=True)
class AgreementDetails:
    """The off-chain half of an agreement; the contract sees only keccak256(encoding)."""

    negotiation_id: bytes = wire(B16)
    offer_digest: bytes = wire(B32)
    provider_key: bytes = wire(B32)
    renter_key: bytes = wire(B32)
    chain_id: int = wire(U53)
    escrow: bytes = wire(B20)
    gpus: tuple = wire(ListOf(B32, MAX_GPUS_PER_OFFER))  # uuid digests of the rented GPUs
    access_key: str = wire(Text(1024))  # the renter's public key for access (e.g. ssh-ed25519)
    # 0: on-demand. Otherwise interruptible: the provider may preempt after a PreemptionNotice
    # at least this many seconds ahead (bound into details_hash, hence the agreement id).
    notice_s: int = wire(U32, default=0)
    # The container image the rental runs in: the proposal's image, or the offer's first (its
    # default) when the proposal named none; "" when the offer lists no images (specs/negotiation.md).
    image: str = wire(Text(MAX_IMAGE_LEN), default="")

    def encode(self) -> bytes:
        return encode_struct(self)

    def details_hash(self) -> bytes:
        return keccak(self.encode())


# --------------------------------------------------------------------------------------------
# Gossip: offers


@register
@dataclass(frozen=True, slots=True)
class Offer(Signed):
    """A provider's whole inventory and terms, gossiped on the offer topic."""

    TYPE: ClassVar[int] = 1
    MAX_SIZE: ClassVar[int] = 16 * KIB
    DOMAIN: ClassVar[bytes] = b"gpumarket/offer/v1\x00"

    provider: bytes = wire(B32)  # ed25519 public key = libp2p identity
    seq: int = wire(U53)  # strictly increasing per provider; the highest wins
    created_ms: int = wire(U53)
    expires_ms: int = wire(U53)
    gpus: tuple = wire(ListOf(Struct(GpuInfo), MAX_GPUS_PER_OFFER))
    host: HostInfo = wire(Struct(HostInfo))
    terms: OfferTerms = wire(Struct(OfferTerms))
    binding: Binding = wire(Struct(Binding))
    # Where to dial the provider (multiaddrs ending in /p2p/<its peer id>): gossip relays do not
    # pass addresses on, so without these a renter reaches only providers it is connected to.
    addrs: tuple = wire(ListOf(Text(MAX_ADDR_LEN), MAX_OFFER_ADDRS), default=())
    # Container images a renter gets its rental in (the first: the default); empty for a
    # provider whose access is its own hook. Renters filter on them (`image=`).
    images: tuple = wire(ListOf(Text(MAX_IMAGE_LEN), MAX_OFFER_IMAGES), default=())
    # GPU sets sold as interruptible (specs/wire.md, "Offer classes"); the rest are on-demand.
    interruptible: tuple = wire(ListOf(Struct(InterruptibleGpus), MAX_INTERRUPTIBLE_SETS), default=())
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)

    def interruptible_set(self, notice_s: int) -> "InterruptibleGpus | None":
        """The interruptible set with exactly this notice (0, or none such: None)."""
        for s in self.interruptible:
            if s.notice_s == notice_s:
                return s
        return None

    def on_demand_gpus(self) -> tuple[bytes, ...]:
        """uuid digests of the GPUs in no interruptible set."""
        spot = {g for s in self.interruptible for g in s.gpus}
        return tuple(g.uuid_digest for g in self.gpus if g.uuid_digest not in spot)

    def class_gpus(self, notice_s: int) -> tuple[bytes, ...]:
        """The GPUs a proposal with `notice_s` may rent: on-demand ones for 0, else the set's."""
        if notice_s == 0:
            return self.on_demand_gpus()
        s = self.interruptible_set(notice_s)
        return () if s is None else tuple(s.gpus)

    def class_price(self, notice_s: int) -> int:
        """The advertised price per GPU-second of a class (0 for a notice with no set)."""
        if notice_s == 0:
            return self.terms.price_per_gpu_second
        s = self.interruptible_set(notice_s)
        return 0 if s is None else s.price_per_gpu_second


@register
@dataclass(frozen=True, slots=True)
class OfferWithdrawal(Signed):
    """Withdraws every offer of `provider` with sequence number <= `seq`."""

    TYPE: ClassVar[int] = 2
    MAX_SIZE: ClassVar[int] = 256
    DOMAIN: ClassVar[bytes] = b"gpumarket/withdrawal/v1\x00"

    provider: bytes = wire(B32)
    seq: int = wire(U53)
    created_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


# --------------------------------------------------------------------------------------------
# Negotiation (renter <-> provider stream)


@register
@dataclass(frozen=True, slots=True)
class Proposal(Signed):
    """Renter -> provider: rent `gpu_count` GPUs of an offer for `duration_s` at a price."""

    TYPE: ClassVar[int] = 10
    MAX_SIZE: ClassVar[int] = 4 * KIB
    DOMAIN: ClassVar[bytes] = b"gpumarket/proposal/v1\x00"

    negotiation_id: bytes = wire(B16)  # chosen at random by the renter
    round: int = wire(U8)
    offer_digest: bytes = wire(B32)  # sha256 of the offer's wire bytes the renter saw
    provider: bytes = wire(B32)
    renter: bytes = wire(B32)
    renter_binding: Binding = wire(Struct(Binding))
    gpu_count: int = wire(U8)
    duration_s: int = wire(U32)
    price_per_gpu_second: int = wire(Amount())
    access_key: str = wire(Text(1024))
    sent_ms: int = wire(U53)
    # 0: on-demand GPUs; otherwise the notice_s of the offer's interruptible set asked for.
    notice_s: int = wire(U32, default=0)
    # One of the offer's `images` to run the rental in; "": the offer's default (its first).
    image: str = wire(Text(MAX_IMAGE_LEN), default="")
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


@register
@dataclass(frozen=True, slots=True)
class CounterProposal(Signed):
    """Provider -> renter: these terms instead. The renter accepts by proposing them."""

    TYPE: ClassVar[int] = 11
    MAX_SIZE: ClassVar[int] = 512
    DOMAIN: ClassVar[bytes] = b"gpumarket/counter/v1\x00"

    negotiation_id: bytes = wire(B16)
    round: int = wire(U8)
    gpu_count: int = wire(U8)
    duration_s: int = wire(U32)
    price_per_gpu_second: int = wire(Amount())
    sent_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


@register
@dataclass(frozen=True, slots=True)
class Accept(Signed):
    """Provider -> renter: agreed. Carries the agreement id (the terms hash) and the provider
    wallet's EIP-712 consent signature the renter needs to open the escrow."""

    TYPE: ClassVar[int] = 12
    MAX_SIZE: ClassVar[int] = 512
    DOMAIN: ClassVar[bytes] = b"gpumarket/accept/v1\x00"

    negotiation_id: bytes = wire(B16)
    round: int = wire(U8)
    agreement_id: bytes = wire(B32)
    gpus: tuple = wire(ListOf(B32, MAX_GPUS_PER_OFFER))  # uuid digests assigned to the renter
    consent_sig: bytes = wire(B65)
    # Unix seconds: the terms' open_by (part of the agreement id and the consent): the renter
    # must open the escrow by then; afterwards the provider frees the GPUs.
    open_by: int = wire(U53)
    sent_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


@register
@dataclass(frozen=True, slots=True)
class NegotiationReject(Signed):
    """Either side ends the negotiation, with a reason code (specs/negotiation.md)."""

    TYPE: ClassVar[int] = 13
    MAX_SIZE: ClassVar[int] = 512
    DOMAIN: ClassVar[bytes] = b"gpumarket/reject/v1\x00"

    negotiation_id: bytes = wire(B16)
    round: int = wire(U8)
    reason: int = wire(U16)
    detail: str = wire(Text(200))
    sent_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


# --------------------------------------------------------------------------------------------
# Rental (heartbeat stream)


@register
@dataclass(frozen=True, slots=True)
class Heartbeat(Signed):
    """Provider -> renter every interval. Chained by `prev_hash` (sha256 of the previous
    heartbeat's wire bytes; zeros for seq 0) and fresh by echoing the renter's latest nonce."""

    TYPE: ClassVar[int] = 20
    MAX_SIZE: ClassVar[int] = 4 * KIB
    DOMAIN: ClassVar[bytes] = b"gpumarket/heartbeat/v1\x00"

    agreement_id: bytes = wire(B32)
    seq: int = wire(U32)
    sent_ms: int = wire(U53)
    nonce: bytes = wire(B16)
    prev_hash: bytes = wire(B32)
    metrics: tuple = wire(ListOf(Struct(GpuMetrics), MAX_GPUS_PER_OFFER))
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


@register
@dataclass(frozen=True, slots=True)
class UsageReceipt(Signed):
    """Renter -> provider after each good heartbeat: cumulative seconds acknowledged.
    `wallet_sig` is the EIP-712 Receipt(agreementId, ackedSeconds) the contract verifies;
    the ed25519 signature covers everything, including which heartbeat it answers."""

    TYPE: ClassVar[int] = 21
    MAX_SIZE: ClassVar[int] = 512
    DOMAIN: ClassVar[bytes] = b"gpumarket/receipt/v1\x00"

    agreement_id: bytes = wire(B32)
    acked_seconds: int = wire(U53)
    heartbeat_seq: int = wire(U32)
    heartbeat_hash: bytes = wire(B32)
    next_nonce: bytes = wire(B16)
    sent_ms: int = wire(U53)
    wallet_sig: bytes = wire(B65)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


@register
@dataclass(frozen=True, slots=True)
class AccessGrant(Signed):
    """Provider -> renter once, when the agreement opens: how to reach the rented GPUs (what the
    provider's access hook printed, e.g. an SSH host, port and user for the renter's key)."""

    TYPE: ClassVar[int] = 22
    MAX_SIZE: ClassVar[int] = 8 * KIB
    DOMAIN: ClassVar[bytes] = b"gpumarket/access/v1\x00"

    agreement_id: bytes = wire(B32)
    access: str = wire(Text(4096))
    sent_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)


class PreemptionReason(enum.IntEnum):
    """Why a provider preempts an interruptible rental (u8 on the wire; append only)."""

    POWER_PRICE = 1  # the provider's power price crossed its curtailment threshold
    PROVIDER_USE = 2  # the provider needs the GPUs itself
    OTHER = 3  # anything else; `detail` says what


@register
@dataclass(frozen=True, slots=True)
class PreemptionNotice(Signed):
    """Provider -> renter on the rental stream, interruptible agreements only: service stops at
    `stop_ms`. `after_heartbeat` is the hash of the last heartbeat the provider sent before the
    notice (zeros if none): the notice cannot be dated before that heartbeat (evidence)."""

    TYPE: ClassVar[int] = 23
    MAX_SIZE: ClassVar[int] = 512
    DOMAIN: ClassVar[bytes] = b"gpumarket/preemption/v1\x00"

    agreement_id: bytes = wire(B32)
    stop_ms: int = wire(U53)  # unix ms, provider's clock: when service stops
    reason: int = wire(U8)  # PreemptionReason
    detail: str = wire(Text(200))
    after_heartbeat: bytes = wire(B32)
    sent_ms: int = wire(U53)
    signature: bytes = wire(B64, default=b"\x00" * ED25519_SIG_LEN)

    @property
    def notice_ms(self) -> int:
        """The notice given, by the notice's own signed times."""
        return self.stop_ms - self.sent_ms


# --------------------------------------------------------------------------------------------
# Evidence


@register
@dataclass(frozen=True, slots=True)
class EvidenceBundle(Message):
    """Everything needed to recompute an agreement's verdict offline. Unsigned itself: every
    part is signed by its author. Heartbeats and receipts are their exact wire bytes."""

    TYPE: ClassVar[int] = 30
    MAX_SIZE: ClassVar[int] = 16 * MIB

    terms: TermsWire = wire(Struct(TermsWire))
    details: AgreementDetails = wire(Struct(AgreementDetails))
    provider_binding: Binding = wire(Struct(Binding))
    renter_binding: Binding = wire(Struct(Binding))
    started_s: int = wire(U53)  # block timestamp of the escrow's Opened event
    heartbeats: tuple = wire(ListOf(VarBytes(Heartbeat.MAX_SIZE), 200_000))
    receipts: tuple = wire(ListOf(VarBytes(UsageReceipt.MAX_SIZE), 200_000))
    notices: tuple = wire(ListOf(VarBytes(PreemptionNotice.MAX_SIZE), 64), default=())
