"""A provider wallet's standing on the escrow: what the chain says about its settled rentals.

The Sybil cost signal of the `rank` sort (specs/offerbook.md, "Ranking"; the rule is in
"Standing"). Any node can read it with no history of its own: it is folded from the escrow
contract's events, which anyone can read and nobody can write without paying gas and locking
a deposit. A fresh identity has none; faking one costs an `open` and a `claim` transaction
per fake rental, from at least `book_proven_renters` funded renter wallets.

Sans-I/O: the node reads the events (node/standing.py) and passes them here in chain order
(block, then log index). Every structure is bounded; see `EscrowLedger`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .params import Params

RENTERS_CAP = 16  # distinct renters are counted up to this (the rule needs only a few)
LOST_RATIO = 10  # a proven wallet has at least this many paid agreements per dispute lost


@dataclass(frozen=True, slots=True)
class EscrowEvent:
    """One escrow event, decoded: `name` as in Escrow.vy, addresses as 20-byte values.
    `args` holds the event's fields under their Vyper names (agreement_id excluded)."""

    name: str
    agreement_id: bytes
    args: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Standing:
    """What the escrow's events say about one provider wallet (in the market's token).

    settled: agreements that paid the provider something (Claimed with settled=True,
      Finalized or Arbitrated with provider_amount > 0).
    renters: distinct renter wallets among them, counted up to RENTERS_CAP.
    lost: disputes lost (Arbitrated gave the provider less than its claim).
    paid: the provider's payouts from them together, in the token's smallest unit."""

    settled: int = 0
    renters: int = 0
    lost: int = 0
    paid: int = 0

    def proven(self, params: Params) -> bool:
        """Paid by at least `book_proven_renters` distinct renters, and at most one dispute
        lost per LOST_RATIO paid agreements."""
        return (self.renters >= params.book_proven_renters
                and self.lost * LOST_RATIO <= self.settled)


NO_STANDING = Standing()


class _Provider:
    __slots__ = ("settled", "renters", "lost", "paid")

    def __init__(self) -> None:
        self.settled = 0
        self.renters: set[bytes] = set()
        self.lost = 0
        self.paid = 0

    def standing(self) -> Standing:
        return Standing(self.settled, len(self.renters), self.lost, self.paid)


class EscrowLedger:
    """Folds escrow events into per-provider standings.

    Only agreements in `token` count (the market's token: a deposit in a token the attacker
    minted itself would cost nothing). Bounds: at most `max_open` agreements awaiting their
    settlement (the oldest opened is forgotten first: its payout will not count) and at most
    `max_providers` providers (a newcomer displaces the one with the weakest standing, by
    (renters, settled, paid, wallet), if it is weaker than the newcomer's first payout;
    else the newcomer is not counted). Renter sets hold at most RENTERS_CAP wallets.
    Counters: `dropped_open`, `dropped_providers`, `ignored` (events for unknown agreements)."""

    def __init__(self, token: bytes, *, max_open: int = 100_000,
                 max_providers: int = 100_000) -> None:
        self.token = token
        self.max_open = max_open
        self.max_providers = max_providers
        # agreement id -> [provider, renter, claimed provider_amount or None]
        self._open: dict[bytes, list[Any]] = {}
        self._providers: dict[bytes, _Provider] = {}
        self.dropped_open = 0
        self.dropped_providers = 0
        self.ignored = 0

    def __len__(self) -> int:
        return len(self._providers)

    @property
    def open_agreements(self) -> int:
        return len(self._open)

    def standing(self, wallet: bytes) -> Standing:
        p = self._providers.get(wallet)
        return NO_STANDING if p is None else p.standing()

    def proven(self, wallet: bytes, params: Params) -> bool:
        p = self._providers.get(wallet)
        return p is not None and p.standing().proven(params)

    def apply_all(self, events: Iterable[EscrowEvent]) -> set[bytes]:
        """Apply events in chain order; the provider wallets whose standing changed."""
        changed: set[bytes] = set()
        for ev in events:
            wallet = self.apply(ev)
            if wallet is not None:
                changed.add(wallet)
        return changed

    def apply(self, ev: EscrowEvent) -> bytes | None:
        """Apply one event; the provider wallet whose standing changed, if any."""
        name, aid, args = ev.name, ev.agreement_id, ev.args
        if name == "Opened":
            if args["token"] != self.token or aid in self._open:
                return None
            while len(self._open) >= self.max_open:
                del self._open[next(iter(self._open))]  # the oldest opened
                self.dropped_open += 1
            self._open[aid] = [args["provider"], args["renter"], None]
            return None
        record = self._open.get(aid)
        if record is None:
            if name in ("Claimed", "Finalized", "Arbitrated", "Recovered"):
                self.ignored += 1  # another token, opened before the scan began, or forgotten
            return None
        if name == "Claimed":
            if not args["settled"]:  # an arbiter is named: the dispute window starts
                record[2] = int(args["provider_amount"])
                return None
            del self._open[aid]
            return self._paid(record, int(args["provider_amount"]), lost=False)
        if name == "Finalized":
            del self._open[aid]
            return self._paid(record, int(args["provider_amount"]), lost=False)
        if name == "Arbitrated":
            del self._open[aid]
            amount = int(args["provider_amount"])
            lost = record[2] is not None and amount < record[2]
            return self._paid(record, amount, lost=lost)
        if name == "Recovered":  # never claimed: nothing paid, nothing lost
            del self._open[aid]
        return None

    def _paid(self, record: list[Any], amount: int, *, lost: bool) -> bytes | None:
        provider, renter = record[0], record[1]
        p = self._providers.get(provider)
        if p is None:
            if amount == 0 and not lost:
                return None
            if len(self._providers) >= self.max_providers and not self._make_room(amount):
                self.dropped_providers += 1
                return None
            p = self._providers[provider] = _Provider()
        if lost:
            p.lost += 1
        if amount > 0:
            p.settled += 1
            p.paid += amount
            if len(p.renters) < RENTERS_CAP:
                p.renters.add(renter)
        return provider

    def _make_room(self, amount: int) -> bool:
        """Drop the weakest provider if it is weaker than a newcomer with one payout of
        `amount`. A linear scan: it runs only when the table is full, once per new provider,
        and each new provider costs its maker a paid agreement on chain."""
        weakest = min(self._providers.items(),
                      key=lambda kv: (len(kv[1].renters), kv[1].settled, kv[1].paid, kv[0]))
        w, p = weakest
        if (len(p.renters), p.settled, p.paid) >= (1, 1, amount):
            return False
        del self._providers[w]
        self.dropped_providers += 1
        return True
