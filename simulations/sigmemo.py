"""The simulator's signature memo: a `protocol.verifier.Verifier` that checks each offer,
binding and withdrawal signature, binding ecrecover and gossip decode once per run and answers
repeats of the same bytes from memory (world.py's docstring says what is and is not memoised)."""

from __future__ import annotations

from protocol.errors import Reject
from protocol.messages import Binding, Offer, OfferWithdrawal
from protocol.verifier import Verifier

_MEMO_DOMAINS = (Offer.DOMAIN, Binding.DOMAIN, OfferWithdrawal.DOMAIN)
DECODE_MEMO_SIZE = 65_536  # decoded gossip messages kept (an offer is ~2-3 KB decoded)


class MemoVerifier(Verifier):
    """Memoises offer/binding/withdrawal ed25519 checks and binding ecrecovers, and the decoding
    of gossiped offers and withdrawals (pure functions of their bytes), counting real and
    memoised checks in `stats`. The world passes it to every validation and offer book."""

    __slots__ = ("stats", "_cache", "_decoded")

    def __init__(self, stats: dict) -> None:
        self.stats = stats
        self._cache: dict = {}
        self._decoded: dict = {}

    def decode(self, data, expect=None):
        # validate_offer / validate_withdrawal decode the same bytes once per renter that
        # ingests them: the decoded (frozen) message is shared. Failures are not kept: they
        # decode again and raise afresh.
        key = (data, expect)
        decoded = self._decoded
        hit = decoded.get(key)
        if hit is None:
            self.stats["decode_real"] += 1
            hit = super().decode(data, expect)
            if len(decoded) >= DECODE_MEMO_SIZE:
                del decoded[next(iter(decoded))]  # the oldest: offers expire in publish order
            decoded[key] = hit
        else:
            self.stats["decode_memo"] += 1
        return hit

    def ed25519(self, public_key, domain, payload, signature):
        if domain not in _MEMO_DOMAINS:
            self.stats["ed25519_real"] += 1
            return super().ed25519(public_key, domain, payload, signature)
        key = (public_key, domain, payload, signature)
        hit = self._cache.get(key)
        if hit is None:
            self.stats["ed25519_real"] += 1
            hit = self._cache[key] = super().ed25519(public_key, domain, payload, signature)
        else:
            self.stats["ed25519_memo"] += 1
        return hit

    def wallet_signed_peer(self, peer_key, wallet_addr, chain_id, wallet_sig):
        key = ("w", peer_key, wallet_addr, chain_id, wallet_sig)
        hit = self._cache.get(key)
        if hit is None:
            self.stats["ecrecover_real"] += 1
            try:
                super().wallet_signed_peer(peer_key, wallet_addr, chain_id, wallet_sig)
                hit = self._cache[key] = ("ok",)
            except Reject as exc:
                hit = self._cache[key] = ("err", exc)
        else:
            self.stats["ecrecover_memo"] += 1
        if hit[0] == "err":
            raise hit[1]
