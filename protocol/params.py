"""Protocol parameters with their defaults (specs/parameters.md is the table in prose).

Tests and the simulator pass a `Params` with other values (for example a short heartbeat
interval); nothing reads a module-level constant where a parameter exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS


@dataclass(frozen=True, slots=True)
class Params:
    # Clocks and lifetimes
    clock_skew_ms: int = 30 * SECOND_MS  # tolerated difference between two nodes' clocks
    offer_max_lifetime_ms: int = 2 * HOUR_MS  # expires_ms - created_ms may not exceed this
    offer_min_lifetime_ms: int = 1 * MINUTE_MS
    # Offer book bounds (memory)
    book_max_providers: int = 200_000  # one live offer per provider
    book_max_bytes: int = 128 * 1024 * 1024  # total wire bytes of the live offers
    book_established_ms: int = 10 * MINUTE_MS  # in the book this long: ranked above newcomers
    book_proven_renters: int = 2  # distinct renters that paid a wallet on the escrow: "proven"
    binding_cache_size: int = 100_000  # verified wallet bindings kept
    # Offer terms that a node accepts as sane
    min_heartbeat_interval_s: int = 5
    max_heartbeat_interval_s: int = 600
    max_rental_s: int = 30 * 24 * 3600  # a single agreement lasts 30 days at most
    # grace and dispute window: the escrow contract's own bounds (constants there, so a value
    # outside them here only makes offers that can never be opened)
    min_grace_s: int = 300  # the provider must see the end and get its claim mined
    max_grace_s: int = 7 * 24 * 3600  # an unclaimed deposit is locked at most this long past the end
    min_dispute_window_s: int = 300  # a party must see the claim and get its dispute mined
    max_dispute_window_s: int = 7 * 24 * 3600
    # Negotiation
    negotiation_step_timeout_ms: int = 10 * SECOND_MS  # each step must be answered within this
    negotiation_max_rounds: int = 4  # proposals, counting the first
    min_open_window_ms: int = 5 * SECOND_MS  # Accept.open_by must leave the renter this long
    # Heartbeats and receipts
    provider_stop_after_missed_receipts: int = 3  # intervals without a receipt, then stop serving
    renter_heartbeat_timeout_intervals: int = 2  # intervals without a heartbeat: stop receipts
    heartbeat_late_tolerance_ms: int = 5 * SECOND_MS  # heartbeat may arrive this late

    def replace(self, **changes: int) -> "Params":
        return dataclasses.replace(self, **changes)


DEFAULT_PARAMS = Params()
