"""Validation of gossiped messages: one function per type, each check tagged REJECT or IGNORE.

REJECT: the sender is at fault (malformed, forged, impossible, inconsistent): penalise it.
IGNORE: drop quietly (expired, from the future, stale, duplicate): may be clock skew or normal
gossip redundancy, no penalty. The checks are listed in the same order in specs/validation.md;
the reason codes are stable.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from .encoding import MAX_SAFE_INTEGER
from .errors import Ignore, Reject
from .identity import peer_id_from_public_key
from .eth import ZERO_ADDRESS
from .messages import SIG_TAIL, SIG_TRAILER, Binding, Offer, OfferWithdrawal, digest, key_prefix
from .money import MAX_TOKEN_DECIMALS
from .params import Params
from .verifier import VERIFIER, Verifier

UINT256_MAX = 2**256 - 1


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key: bytes) -> str:
    return peer_id_from_public_key(public_key)


class BindingCache:
    """Bounded LRU of wallet bindings already verified. A binding costs an ecrecover (~0.2 ms,
    more than the offer's own ed25519 check); every offer of a provider repeats the same one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._verified: OrderedDict[tuple, None] = OrderedDict()

    def verify(self, binding: Binding, verifier: Verifier = VERIFIER) -> None:
        key = binding.cache_key()
        if key in self._verified:
            self._verified.move_to_end(key)
            return
        binding.verify(verifier)  # raises Reject
        self._verified[key] = None
        if len(self._verified) > self.size:
            self._verified.popitem(last=False)

    def __len__(self) -> int:
        return len(self._verified)


def check_offer_static(offer: Offer, params: Params) -> None:
    """The checks that need neither the clock nor state. Also used before publishing."""
    terms = offer.terms
    # [REJECT] lifetime: created before it expires, and not longer than the maximum lifetime
    lifetime = offer.expires_ms - offer.created_ms
    if lifetime < params.offer_min_lifetime_ms or lifetime > params.offer_max_lifetime_ms:
        raise Reject("bad_lifetime", f"offer lifetime {lifetime} ms outside the allowed range")
    # [REJECT] at least one GPU, each with plausible facts, none listed twice
    if not offer.gpus:
        raise Reject("no_gpus", "an offer lists at least one GPU")
    seen: set[bytes] = set()
    for gpu in offer.gpus:
        if gpu.uuid_digest in seen:
            raise Reject("duplicate_gpu", "the same GPU is listed twice")
        seen.add(gpu.uuid_digest)
        if gpu.vram_mib == 0 or not gpu.model or gpu.cc_major == 0:
            raise Reject("bad_gpu", f"GPU {gpu.model!r} has impossible facts")
    # [REJECT] host facts
    if offer.host.cpu_cores == 0 or offer.host.ram_mib == 0:
        raise Reject("bad_host", "host has no CPU cores or no RAM")
    # [REJECT] terms: a price, a sane duration range and heartbeat, an escrow, consistent arbiter
    if terms.price_per_gpu_second == 0:
        raise Reject("bad_terms", "price must be positive")
    if not 1 <= terms.min_duration_s <= terms.max_duration_s <= params.max_rental_s:
        raise Reject("bad_terms", "durations must satisfy 1 <= min <= max <= max_rental_s")
    if not (params.min_heartbeat_interval_s <= terms.heartbeat_interval_s
            <= params.max_heartbeat_interval_s):
        raise Reject("bad_terms", "heartbeat interval outside the allowed range")
    if terms.grace_s < terms.heartbeat_interval_s:
        raise Reject("bad_terms", "grace must be at least one heartbeat interval")
    if not params.min_grace_s <= terms.grace_s <= params.max_grace_s:
        raise Reject("bad_terms", "grace outside the allowed range")
    if terms.escrow == ZERO_ADDRESS:
        raise Reject("bad_terms", "no escrow contract")
    if (terms.arbiter == ZERO_ADDRESS) != (terms.dispute_window_s == 0):
        raise Reject("bad_terms", "an arbiter needs a dispute window and vice versa")
    if terms.arbiter != ZERO_ADDRESS:
        if not params.min_dispute_window_s <= terms.dispute_window_s <= params.max_dispute_window_s:
            raise Reject("bad_terms", "dispute window outside the allowed range")
        if terms.arbiter == offer.binding.wallet:
            raise Reject("bad_terms", "the arbiter is the provider's own wallet")
    if terms.token_decimals > MAX_TOKEN_DECIMALS:
        raise Reject("bad_terms", f"token decimals above {MAX_TOKEN_DECIMALS}")
    if terms.price_per_gpu_second * len(offer.gpus) * terms.max_duration_s > UINT256_MAX:
        raise Reject("bad_terms", "largest deposit overflows uint256")
    # [REJECT] interruptible sets: each names GPUs of this offer, none in two sets, at least
    # one, a positive notice no two sets share (a proposal names its set by the notice), and a
    # price below on-demand (a renter takes the risk of a preemption for less)
    spot: set[bytes] = set()
    notices: set[int] = set()
    for s in offer.interruptible:
        if not s.gpus or not set(s.gpus) <= seen or spot & set(s.gpus) or len(set(s.gpus)) != len(s.gpus):
            raise Reject("bad_interruptible", "an interruptible set must name distinct GPUs of "
                         "the offer, each in one set only")
        spot |= set(s.gpus)
        if s.notice_s == 0 or s.notice_s in notices:
            raise Reject("bad_interruptible", "notice_s must be positive and differ between sets")
        notices.add(s.notice_s)
        if not 0 < s.price_per_gpu_second < terms.price_per_gpu_second:
            raise Reject("bad_interruptible", "an interruptible price is positive and below on-demand")
    # [REJECT] every address names the provider's own peer id (a renter dials these: an offer
    # must not steer renters at someone else's host)
    if offer.addrs:
        suffix = "/p2p/" + peer_id_of(offer.provider)
        for addr in offer.addrs:
            if not addr.startswith("/") or not addr.endswith(suffix):
                raise Reject("bad_addrs", f"address {addr[:60]!r} is not a multiaddr of this provider")
    # [REJECT] the binding names this provider on the offer's chain
    if offer.binding.peer_key != offer.provider:
        raise Reject("binding_peer_mismatch", "binding is for another peer key")
    if offer.binding.chain_id != terms.chain_id:
        raise Reject("binding_chain_mismatch", "binding is for another chain")


def validate_offer(
    data: bytes,
    now_ms: int,
    params: Params,
    bindings: BindingCache,
    *,
    known_seq: int = -1,
    known_digest: bytes | None = None,
    withdrawn_seq: int = -1,
    chain_ids: frozenset[int] | None = None,
    verifier: Verifier = VERIFIER,
) -> tuple[Offer, bytes]:
    """Validate one gossiped offer; return it with its digest (sha256 of `data`).

    `known_seq`/`known_digest`: the latest offer this node holds from the provider (-1: none);
    `withdrawn_seq`: the highest withdrawal seen (-1: none); `chain_ids`: chains this node
    trades on (None: any); `verifier`: decodes and checks signatures (protocol/verifier.py)."""
    # [REJECT] canonical encoding of an Offer within its size limit
    offer = verifier.decode(data, Offer)
    assert isinstance(offer, Offer)
    offer_digest = digest(data)
    # [IGNORE] duplicate: exactly this offer is already held
    if offer.seq == known_seq and offer_digest == known_digest:
        raise Ignore("duplicate", "offer already held")
    # [IGNORE] from the future: created after now + clock skew
    if offer.created_ms > now_ms + params.clock_skew_ms:
        raise Ignore("from_future", "offer created in the future beyond clock skew")
    # [IGNORE] expired: expired before now - clock skew
    if offer.expires_ms + params.clock_skew_ms < now_ms:
        raise Ignore("expired", "offer has expired")
    # [IGNORE] a chain this node does not trade on
    if chain_ids is not None and offer.terms.chain_id not in chain_ids:
        raise Ignore("wrong_chain", f"chain {offer.terms.chain_id} not traded here")
    check_offer_static(offer, params)
    # [REJECT] signature by the provider key over the offer
    if not offer.signature_valid(offer.provider, data, verifier):
        raise Reject("bad_signature", "offer signature does not verify")
    # [REJECT] both binding signatures (cached once verified)
    bindings.verify(offer.binding, verifier)
    # [REJECT] equivocation: a different offer signed with a sequence number already used
    if offer.seq == known_seq:
        raise Reject("equivocation", "two different offers with the same sequence number")
    # [IGNORE] stale: older than the offer held, or withdrawn
    if offer.seq < known_seq:
        raise Ignore("stale_seq", f"seq {offer.seq} older than held {known_seq}")
    if offer.seq <= withdrawn_seq:
        raise Ignore("withdrawn", f"provider withdrew offers up to seq {withdrawn_seq}")
    return offer, offer_digest


# ------------------------------------------------------------------------------------------------
# Re-announcements: the same offer body under a new header
#
# A provider re-announces its offer (new seq, created_ms, expires_ms, signature) long before it
# expires, and its GPUs, host, terms, binding and addresses rarely change between two. Those
# fields are encoded back to back between `expires_ms` and the signature (the "body"). When the
# body's bytes equal those of the offer the book holds from the same provider, every check of
# `validate_offer` that reads only the body has already passed (on the same bytes, with the same
# params and provider), and the message is canonical exactly when its header integers are
# minimally encoded. `validate_reannouncement` runs the remaining checks in `validate_offer`'s
# order, so it returns what `validate_offer` would, without decoding the body or building an
# `Offer`. Anything not in the expected shape takes the full path (`offer_header` -> None).

_OFFER_HEAD = key_prefix(Offer)
_UINT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # uint8/16/32/64 headers


def _uint_at(data: bytes, i: int) -> tuple[int, int]:
    """The minimally encoded msgpack unsigned integer at data[i], and the index after it.
    Raises ValueError for any other encoding (the caller falls back to the full decoder)."""
    b = data[i]
    if b < 0x80:
        return b, i + 1
    size = _UINT_SIZES.get(b)
    if size is None or i + 1 + size > len(data):
        raise ValueError
    value = int.from_bytes(data[i + 1:i + 1 + size], "big")
    if value < (0x80 if size == 1 else 1 << (4 * size)):  # a smaller header would fit
        raise ValueError
    return value, i + 1 + size


def offer_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(seq, created_ms, expires_ms, body_at) of an offer with the canonical head and tail
    shape, where data[body_at:-SIG_TAIL] is its body; None when the bytes are shaped otherwise."""
    if (data[:5] != _OFFER_HEAD or len(data) > Offer.MAX_SIZE
            or data[-SIG_TAIL:-SIG_TAIL + len(SIG_TRAILER)] != SIG_TRAILER):
        return None
    try:
        seq, i = _uint_at(data, 37)
        created_ms, i = _uint_at(data, i)
        expires_ms, i = _uint_at(data, i)
    except (ValueError, IndexError):
        return None
    if max(seq, created_ms, expires_ms) > MAX_SAFE_INTEGER or i > len(data) - SIG_TAIL:
        return None
    return seq, created_ms, expires_ms, i


def validate_reannouncement(
    data: bytes,
    header: tuple[int, int, int, int],
    now_ms: int,
    params: Params,
    *,
    known_seq: int,
    known_digest: bytes,
    known_chain_id: int,
    withdrawn_seq: int = -1,
    chain_ids: frozenset[int] | None = None,
    verifier: Verifier = VERIFIER,
) -> bytes:
    """`validate_offer` for an offer whose body (see above) is byte for byte the body of the
    offer held from the same provider (`known_*`), which passed `validate_offer` with these
    params. `header` is `offer_header(data)`. Returns the digest; raises what `validate_offer`
    raises, in its order."""
    seq, created_ms, expires_ms, _ = header
    # [REJECT] canonical encoding: the header integers are minimal (offer_header) and the body
    # and signature encodings are those of an offer that decoded
    offer_digest = digest(data)
    # [IGNORE] duplicate
    if seq == known_seq and offer_digest == known_digest:
        raise Ignore("duplicate", "offer already held")
    # [IGNORE] from the future / expired
    if created_ms > now_ms + params.clock_skew_ms:
        raise Ignore("from_future", "offer created in the future beyond clock skew")
    if expires_ms + params.clock_skew_ms < now_ms:
        raise Ignore("expired", "offer has expired")
    # [IGNORE] a chain this node does not trade on
    if chain_ids is not None and known_chain_id not in chain_ids:
        raise Ignore("wrong_chain", f"chain {known_chain_id} not traded here")
    # [REJECT] lifetime: the one static check that reads the header (the rest read the body)
    lifetime = expires_ms - created_ms
    if lifetime < params.offer_min_lifetime_ms or lifetime > params.offer_max_lifetime_ms:
        raise Reject("bad_lifetime", f"offer lifetime {lifetime} ms outside the allowed range")
    # [REJECT] signature by the provider key (the binding is the held offer's: verified)
    if not Offer.wire_signature_valid(data[5:37], data, verifier):
        raise Reject("bad_signature", "offer signature does not verify")
    # [REJECT] equivocation; [IGNORE] stale, withdrawn
    if seq == known_seq:
        raise Reject("equivocation", "two different offers with the same sequence number")
    if seq < known_seq:
        raise Ignore("stale_seq", f"seq {seq} older than held {known_seq}")
    if seq <= withdrawn_seq:
        raise Ignore("withdrawn", f"provider withdrew offers up to seq {withdrawn_seq}")
    return offer_digest


def validate_withdrawal(
    data: bytes, now_ms: int, params: Params, *, withdrawn_seq: int = -1,
    verifier: Verifier = VERIFIER,
) -> OfferWithdrawal:
    # [REJECT] canonical encoding of an OfferWithdrawal within its size limit
    msg = verifier.decode(data, OfferWithdrawal)
    assert isinstance(msg, OfferWithdrawal)
    # [IGNORE] from the future
    if msg.created_ms > now_ms + params.clock_skew_ms:
        raise Ignore("from_future", "withdrawal created in the future beyond clock skew")
    # [IGNORE] too old to matter: older than the longest offer lifetime
    if msg.created_ms + params.offer_max_lifetime_ms + params.clock_skew_ms < now_ms:
        raise Ignore("expired", "withdrawal older than any live offer")
    # [IGNORE] already applied
    if msg.seq <= withdrawn_seq:
        raise Ignore("duplicate", "withdrawal already applied")
    # [REJECT] signature by the provider key
    if not msg.signature_valid(msg.provider, data, verifier):
        raise Reject("bad_signature", "withdrawal signature does not verify")
    return msg
