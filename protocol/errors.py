"""One root exception for the protocol core, split by whose fault it was.

- `LocalProtocolError`: the caller misused the API (a bug on this side); never caused by a peer.
- `RemoteProtocolError`: input from the network was bad. Its `verdict` says what the node does:
  `REJECT` (the sender is at fault: penalise it) or `IGNORE` (drop quietly: stale, duplicate,
  expired, possibly our own clock skew).

Every error carries a stable `code` (snake_case, listed in specs/) so that nodes can count
rejections by reason and tests can assert the exact reason.
"""

from __future__ import annotations

REJECT = "reject"
IGNORE = "ignore"


class ProtocolError(Exception):
    """Root of every error the protocol core raises."""

    code: str = "protocol_error"

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class LocalProtocolError(ProtocolError):
    """The local caller misused the API: wrong state, invalid argument. A bug on this side."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something invalid. `verdict` is REJECT (penalise) or IGNORE (drop quietly)."""

    verdict: str = REJECT


class Reject(RemoteProtocolError):
    """The sender is at fault: malformed, forged, impossible or inconsistent input."""

    verdict = REJECT


class Ignore(RemoteProtocolError):
    """Drop without penalty: expired, not yet valid, stale sequence number, duplicate."""

    verdict = IGNORE


class DecodeError(Reject):
    """Bytes that are not one canonical, well-formed, size-bounded message of a known type."""
