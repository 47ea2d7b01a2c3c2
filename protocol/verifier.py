"""The checks of untrusted bytes that are pure functions of those bytes: canonical decoding, an
ed25519 signature, a wallet binding's ecrecover.

Protocol code that checks gossiped input takes a `Verifier` (default `VERIFIER`: the real
checks, nothing kept). A caller that sees the same bytes many times can pass one that memoises
them, as the simulator does where thousands of renters validate the same offer
(simulations/sigmemo.py). A subclass must give the same answers as these methods.
"""

from __future__ import annotations

from .encoding import Message, decode
from .identity import check_wallet_signed_peer, verify_ed25519


class Verifier:
    """The real checks."""

    __slots__ = ()

    def decode(self, data: bytes, expect: type[Message] | None = None) -> Message:
        """`encoding.decode`: the message, or DecodeError for any other encoding."""
        return decode(data, expect)

    def ed25519(self, public_key: bytes, domain: bytes, payload: bytes, signature: bytes) -> bool:
        """`identity.verify_ed25519`: whether `signature` signs `domain || payload`."""
        return verify_ed25519(public_key, domain, payload, signature)

    def wallet_signed_peer(self, peer_key: bytes, wallet: bytes, chain_id: int,
                           wallet_sig: bytes) -> None:
        """`identity.check_wallet_signed_peer`: raises Reject unless the wallet signed the key."""
        check_wallet_signed_peer(peer_key, wallet, chain_id, wallet_sig)


VERIFIER = Verifier()
