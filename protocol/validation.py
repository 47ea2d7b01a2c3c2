"""Validation of gossiped messages: one function per type, each check tagged REJECT or IGNORE.

REJECT: the sender is at fault (malformed, forged, impossible, inconsistent): penalise it.
IGNORE: drop quietly (expired, from the future, stale, duplicate): may be clock skew or normal
gossip redundancy, no penalty. The checks are listed in the same order in specs/validation.md;
the reason codes are stable.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from .encoding import decode
from .errors import Ignore, Reject
from .identity import peer_id_from_public_key
from .eth import ZERO_ADDRESS
from .messages import Binding, Offer, OfferWithdrawal, digest
from .params import Params

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

    def verify(self, binding: Binding) -> None:
        key = binding.cache_key()
        if key in self._verified:
            self._verified.move_to_end(key)
            return
        binding.verify()  # raises Reject
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
    if terms.escrow == ZERO_ADDRESS:
        raise Reject("bad_terms", "no escrow contract")
    if (terms.arbiter == ZERO_ADDRESS) != (terms.dispute_window_s == 0):
        raise Reject("bad_terms", "an arbiter needs a dispute window and vice versa")
    if terms.token_decimals > 36:
        raise Reject("bad_terms", "token decimals above 36")
    if terms.price_per_gpu_second * len(offer.gpus) * terms.max_duration_s > UINT256_MAX:
        raise Reject("bad_terms", "largest deposit overflows uint256")
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
) -> tuple[Offer, bytes]:
    """Validate one gossiped offer; return it with its digest (sha256 of `data`).

    `known_seq`/`known_digest`: the latest offer this node holds from the provider (-1: none);
    `withdrawn_seq`: the highest withdrawal seen (-1: none); `chain_ids`: chains this node
    trades on (None: any)."""
    # [REJECT] canonical encoding of an Offer within its size limit
    offer = decode(data, Offer)
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
    if not offer.signature_valid(offer.provider, data):
        raise Reject("bad_signature", "offer signature does not verify")
    # [REJECT] both binding signatures (cached once verified)
    bindings.verify(offer.binding)
    # [REJECT] equivocation: a different offer signed with a sequence number already used
    if offer.seq == known_seq:
        raise Reject("equivocation", "two different offers with the same sequence number")
    # [IGNORE] stale: older than the offer held, or withdrawn
    if offer.seq < known_seq:
        raise Ignore("stale_seq", f"seq {offer.seq} older than held {known_seq}")
    if offer.seq <= withdrawn_seq:
        raise Ignore("withdrawn", f"provider withdrew offers up to seq {withdrawn_seq}")
    return offer, offer_digest


def validate_withdrawal(
    data: bytes, now_ms: int, params: Params, *, withdrawn_seq: int = -1
) -> OfferWithdrawal:
    # [REJECT] canonical encoding of an OfferWithdrawal within its size limit
    msg = decode(data, OfferWithdrawal)
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
    if not msg.signature_valid(msg.provider, data):
        raise Reject("bad_signature", "withdrawal signature does not verify")
    return msg
