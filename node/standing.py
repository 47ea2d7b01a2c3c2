"""The escrow standing of provider wallets, followed from the chain for the offer book's rank.

:class:`EscrowStanding` reads the escrow's events from `from_block` (the escrow's deployment
block, or 0) to the head in chunks of `chunk_blocks`, one eth_getLogs request each, on the chain
client's worker thread (``AsyncChain.run``: never on the trio thread), then follows the head
every `poll_s`. Each chunk is folded into a :class:`protocol.standing.EscrowLedger` (bounded: see
there), and the book is told which wallets' standing changed (``OfferBook.restand``), so the
`rank` sort's proven tier follows the chain (specs/offerbook.md, "Standing").

Nothing is stored: a restarted node reads the events again (one request per `chunk_blocks`).
Reads that fail are retried after `poll_s` (logged, rate-limited); until the scan reaches the
head, wallets whose payouts are not read yet simply rank as unknown.
"""

from __future__ import annotations

import logging

import trio

from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.standing import EscrowLedger, Standing

from .chain import AsyncChain
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log, burst=3, interval=60.0)


# Standing changes take minutes to matter (a payout, then a renter's next search); polling the
# chain slower than the chain watcher leaves the chain client's one worker thread to the
# rentals' own calls.
STANDING_POLL_S = 5.0


class EscrowStanding:
    def __init__(self, chain: AsyncChain, params: Params, token: bytes, *, from_block: int = 0,
                 chunk_blocks: int = 10_000, poll_s: float = 1.0,
                 max_open: int = 100_000, max_providers: int = 100_000) -> None:
        self.chain = chain
        self.params = params
        self.ledger = EscrowLedger(token, max_open=max_open, max_providers=max_providers)
        self.book: OfferBook | None = None
        self.next_block = from_block
        self.chunk_blocks = chunk_blocks
        self.poll_s = poll_s
        self.head_seen = -1  # the last head the scan reached (-1: not yet)
        self.caught_up = trio.Event()  # set once the scan first reaches the head

    def proven(self, wallet: bytes) -> bool:
        """The offer book's `proven_of`."""
        return self.ledger.proven(wallet, self.params)

    def standing(self, wallet: bytes) -> Standing:
        return self.ledger.standing(wallet)

    async def run(self) -> None:
        while True:
            try:
                await self.catch_up()
            except Exception as exc:  # an RPC hiccup: try again at the next poll
                rlog.warning("standing.read", "reading escrow events for provider standing "
                             "failed: %r", exc)
            await trio.sleep(self.poll_s)

    async def catch_up(self) -> int:
        """Read and fold every event up to the current head; the wallets changed in total."""
        chain = self.chain.chain
        head = await self.chain.run(lambda: chain.w3.eth.block_number)
        changed: set[bytes] = set()
        while self.next_block <= head:
            last = min(head, self.next_block + self.chunk_blocks - 1)
            events = await self.chain.run(chain.escrow_events, self.next_block, last)
            got = self.ledger.apply_all(events)
            self.next_block = last + 1
            if got and self.book is not None:
                self.book.restand(got)
            changed |= got
        self.head_seen = head
        self.caught_up.set()
        return len(changed)


__all__ = ["STANDING_POLL_S", "EscrowStanding"]
