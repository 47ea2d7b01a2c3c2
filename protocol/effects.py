"""Effects: what a state machine asks its driver (the node or the simulator) to do.

State machines never perform I/O. `handle(...)`, `on_timer(now_ms)` and friends return a list of
these frozen dataclasses; the driver carries them out in order. Keep the order: a `Persist` that
precedes a `Send` must be durable before the message leaves (a receipt is stored before it is
sent, a heartbeat before it is acknowledged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .encoding import Message


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` to the peer with ed25519 public key `to` on the current stream."""

    to: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class Publish:
    """Gossip `message` on the offer topic."""

    message: Message


@dataclass(frozen=True, slots=True)
class Persist:
    """Persist `message` (its wire bytes) under `record` (e.g. "heartbeat", "receipt") for
    `agreement_id` before any later effect is carried out."""

    record: str
    agreement_id: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class EscrowCall:
    """Call the escrow contract: method is one of open, claim, close, recover, dispute."""

    method: str
    agreement_id: bytes
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StartService:
    """Provider: give the renter access to the agreed GPUs."""

    agreement_id: bytes


@dataclass(frozen=True, slots=True)
class StopService:
    """Provider: revoke the renter's access (agreement over, or the renter stopped paying)."""

    agreement_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    """Something a person or a metric should know about (agreed, failed, gap, mismatch...)."""

    event: str
    detail: dict[str, Any] = field(default_factory=dict)


Effect = Send | Publish | Persist | EscrowCall | StartService | StopService | Report
