"""A node's chain watcher: it polls the escrow's events and hands each to whatever waits on it:
a rental session (``Closed``, the settlements: ``escrow_event`` in node/rentals.py), the provider's accepted-but-unopened agreements
(``Opened``: the renter's hello is then answered without asking the chain), a restarted renter's
agreement whose open was mined late. Each poll also expires agreements never opened in time.

:class:`ChainWatchMixin` is part of :class:`node.node.Node` (it uses the node's chain, escrow,
store, rentals, pending agreements and clock); a file of its own so the watcher reads in one place.
"""

from __future__ import annotations

import logging

import trio

from .lifecycle import AgreementState
from .rentals import SETTLED_EVENTS
from .resume import RENTER_OPEN_WAIT_S

log = logging.getLogger("node.node")  # the node's log, as before the split


class ChainWatchMixin:
    """Node's chain watcher (see the module's docstring)."""

    async def _watch_chain(self, next_block: int) -> None:
        while True:
            await trio.sleep(self.config.chain_poll_s)
            try:
                await self._expire_pending()
            except Exception as exc:
                log.warning("expiring unopened agreements failed: %r", exc)
            try:
                events = await self.chain.events(next_block)
            except Exception as exc:
                log.warning("reading escrow events failed: %r", exc)
                continue
            for ev in events:
                next_block = max(next_block, ev.block + 1)
                try:
                    await self._on_chain_event(ev)
                except Exception:  # one agreement's bug must not stop the watcher (or the node)
                    log.exception("handling %s for agreement %s failed", ev.name,
                                  ev.agreement_id.hex()[:12] if ev.agreement_id else "-")

    async def _on_chain_event(self, ev) -> None:
        """One escrow event: a late open, an open the renter's hello will need, or a change to a
        running rental (closed, settled)."""
        if ev.name == "Opened" and ev.agreement_id in self._renter_unopened:
            await self._opened_late(self._renter_unopened.pop(ev.agreement_id))
            return
        if ev.name == "Opened" and ev.agreement_id in self._pending:
            # The renter's hello is answered from this, without asking the chain.
            pending = self._pending[ev.agreement_id]
            self._opened_seen[ev.agreement_id] = \
                int(ev.args["end"]) - pending.terms.max_seconds
            return
        rental = self.rentals.get(ev.agreement_id) if ev.agreement_id else None
        if rental is None or rental.session is None:
            return
        rental.events.append(ev.name)
        await rental.session.escrow_event(ev.name)
        if ev.name == "Closed":
            rental.closed_end_s = int(ev.args["end"])
        if ev.name in SETTLED_EVENTS:
            await self._set_state(ev.agreement_id, AgreementState.SETTLED)
            if rental.role == "renter":
                ended = rental.closed_end_s or (rental.started_s or 0) + rental.terms.max_seconds
                try:
                    await self.reputation.record(rental, ended)
                    self.book.rescore(rental.details.provider_key)
                except Exception:  # scoring is advisory: never let it stop the watcher
                    log.exception("scoring agreement %s failed", ev.agreement_id.hex()[:12])

    async def _expire_pending(self) -> None:
        """Accepted agreements the renter did not open within the hold are dropped; so are a
        restarted renter's agreements whose open was not mined within RENTER_OPEN_WAIT_S."""
        for aid, row in list(self._renter_unopened.items()):
            if self.clock.time() - row.updated_at >= RENTER_OPEN_WAIT_S:
                del self._renter_unopened[aid]
                await self._set_state(aid, AgreementState.EXPIRED)
        now = self.clock.now_ms()
        for aid, pending in list(self._pending.items()):
            # The consent is good while block time <= open_by (the escrow refuses later): keep
            # the GPUs until then, then free them unless the escrow opened.
            if now <= (pending.terms.open_by + 1) * 1000:
                continue
            if aid in self._opened_seen:
                continue  # opened: the renter's stream will start the session
            started_s = await self.escrow.started_s(pending.terms)
            if started_s is not None:  # opened after all: the renter's stream will start it
                self._opened_seen[aid] = started_s  # ... and nobody asks the chain again
                continue
            del self._pending[aid]
            self._forget_pending(aid)
            if self.capacity is not None:
                self.capacity.release(aid)
                self._offer_changed()
            await self._set_state(aid, AgreementState.EXPIRED)
            log.info("%s: agreement %s expired unopened", self.config.name, aid.hex()[:12])


__all__ = ["ChainWatchMixin"]
