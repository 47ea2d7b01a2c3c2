"""A node's restart (specs/node.md, "Restart and resume"): on start, before the desks answer
anyone, every agreement the store holds unsettled is checked against the escrow: open rentals get
their machine rebuilt from the stored heartbeats and receipts and their session back; accepted
agreements the renter never opened expire after the open hold; rentals that ended, closed or ran
out while the node was down are settled (the provider claims with its latest receipt, the renter
recovers). A renter's open mined after the restart resumes its rental then (``_opened_late``).

:class:`ResumeMixin` is part of :class:`node.node.Node` (it uses the node's store, chain, clock,
capacity, desks and nursery); it is a file of its own so the restart logic reads in one place.
"""

from __future__ import annotations

import logging

from libp2p.peer.id import ID

from protocol.agreement import EscrowDomain
from protocol.effects import EscrowCall
from protocol.encoding import decode
from protocol.identity import peer_id_from_public_key
from protocol.messages import Heartbeat, UsageReceipt
from protocol.rental import ProviderRental, RenterRental

from .chain import ChainError
from .lifecycle import UNSETTLED, AgreementState
from .records import PendingAgreement, Rental, decode_agreement, decode_bindings
from .rentals import ProviderSession, RenterSession

log = logging.getLogger("node.node")  # the node's log, as before the split

RENTER_OPEN_WAIT_S = 600  # a renter restarted before its open was mined watches this long for it
PEER_ADDR_TTL_S = 30 * 24 * 3600  # a restored rental's provider address, re-added to the peerstore


class ResumeMixin:
    """Node's restart and resume (see the module's docstring)."""

    async def _stored_notices(self, aid: bytes) -> list:
        """The preemption notices stored for an agreement (sent or received), oldest first."""
        return await _decode_notices(self.store, aid)

    async def _resume(self) -> None:
        """Bring every unsettled agreement in the store back in line with the escrow."""
        self.resumed = {}
        for state in UNSETTLED:
            for row in await self.store.agreements_in_state(state.value):
                try:
                    outcome = await self._resume_one(row)
                except Exception as exc:  # one bad record must not keep the node down
                    log.exception("resuming agreement %s failed", row.id.hex()[:12])
                    outcome = f"failed: {type(exc).__name__}"
                self.resumed.setdefault(outcome, []).append(row.id.hex())
                log.info("%s restart: agreement %s (%s, %s): %s", self.config.name,
                         row.id.hex()[:12], row.role, row.state, outcome)

    async def _resume_one(self, row) -> str:
        aid = row.id
        terms, details = decode_agreement(row.terms)
        if terms.agreement_id() != aid:
            raise ValueError("stored terms do not hash to the agreement id")
        status = await self.chain.status(aid)
        now = self.clock.time()
        if status.state in ("claimed", "final"):
            await self._set_state(aid, AgreementState.SETTLED)
            return "settled"
        if status.state == "none":
            if row.role == "renter" and row.state == "agreed" \
                    and now - row.updated_at < RENTER_OPEN_WAIT_S:
                # Killed after sending the open transaction, perhaps: it may still be mined.
                self._renter_unopened[aid] = row
                return "awaiting_open"
            if row.role == "provider" and row.state == "accepted" and self.capacity is not None \
                    and now <= terms.open_by + 1:
                accepted_ms = int(row.created_at * 1000)
                self.capacity.reserve(aid, details.gpus, (terms.open_by + 1) * 1000,
                                      peer=peer_id_from_public_key(details.renter_key),
                                      wallet=terms.renter, deposit=terms.deposit)
                self._pending[aid] = PendingAgreement(
                    terms, details, EscrowDomain(details.chain_id, details.escrow), accepted_ms,
                    decode_bindings(row.terms)[1])
                return "awaiting_open"
            await self._set_state(aid, AgreementState.EXPIRED)
            return "expired"
        if status.state not in ("open", "closed"):
            return f"left: escrow {status.state}"  # disputed: the arbiter decides
        domain = EscrowDomain(details.chain_id, details.escrow)
        if row.role == "provider":
            outcome = await self._resume_provider(row, terms, details, domain, status)
        else:
            outcome = await self._resume_renter(terms, details, domain, status)
        if aid in self.rentals:
            self.rentals[aid].provider_binding, self.rentals[aid].renter_binding = \
                decode_bindings(row.terms)
        return outcome

    async def _resume_provider(self, row, terms, details, domain, status) -> str:
        aid = terms.agreement_id()
        latest = await self._latest_receipt(aid)
        if (status.state == "open" and row.state in ("accepted", "open")
                and self.rental_desk is not None and self.clock.now_ms() < status.end_s * 1000):
            started_s = status.end_s - terms.max_seconds
            heartbeats = [decode(r.raw, Heartbeat) for r in await self.store.heartbeats(aid)]
            notices = await self._stored_notices(aid)
            machine = ProviderRental.restore(terms, details, domain, self.key, started_s * 1000,
                                             self.params, heartbeats=heartbeats,
                                             latest_receipt=latest, now_ms=self.clock.now_ms(),
                                             notice=notices[0] if notices else None)
            self.capacity.reserve(aid, details.gpus, None)
            rental = Rental("provider", terms, details, started_s=started_s)
            self.rentals[aid] = rental
            session = ProviderSession(
                machine, terms, details, self.escrow, self.store, self.clock.now_ms,
                lambda: self._metrics(details.gpus), lambda effect: self._service(rental, effect),
            )
            rental.session = session
            self.rental_desk.sessions[aid] = session
            await self._set_state(aid, AgreementState.OPEN)
            await session.carry_out(machine.start())  # the access hook runs again: make it idempotent
            if machine.notice is not None:  # a notice outstanding: its processes are told again
                await self.on_preemption_notice(rental, machine.notice)
            self._nursery.start_soon(session.run_timers)
            return "resumed"
        # Closed by the renter, past its end, or stopped before the crash: claim what we hold.
        if latest is None:
            await self._set_state(aid, AgreementState.STOPPED)
            return "nothing_to_claim"
        try:
            await self.escrow.execute(EscrowCall("claim", aid, {
                "acked_seconds": latest.acked_seconds, "receipt_sig": latest.wallet_sig}), terms)
        except ChainError as exc:
            await self._set_state(aid, AgreementState.STOPPED)
            return f"claim_failed: {exc}"
        await self._set_state(aid, AgreementState.SETTLED)
        return "claimed"

    async def _resume_renter(self, terms, details, domain, status) -> str:
        aid = terms.agreement_id()
        heartbeats = [(decode(r.raw, Heartbeat), int(r.received_at * 1000))
                      for r in await self.store.heartbeats(aid)]
        receipts = await self._receipts(aid)
        if status.state == "closed":  # end_s is the close time: the machine only recovers
            closed_ms, started_s = status.end_s * 1000, status.end_s
        else:
            closed_ms, started_s = None, status.end_s - terms.max_seconds
        machine = RenterRental.restore(terms, details, domain, self.key, self.wallet_key,
                                       started_s * 1000, self.rng, self.params,
                                       heartbeats=heartbeats, receipts=receipts,
                                       closed_ms=closed_ms, notices=await self._stored_notices(aid))
        rental = Rental("renter", terms, details, started_s=started_s)
        self.rentals[aid] = rental
        session = RenterSession(machine, terms, details, self.escrow, self.store, self.clock.now_ms)
        session.on_report = lambda report: self._renter_report(rental, report)
        rental.session = session
        await self._set_state(aid, AgreementState.OPEN)
        self._nursery.start_soon(session.run_timers)
        if closed_ms is not None:
            return "recovering"
        if self.clock.now_ms() >= machine.end_ms:
            return "ended"
        provider_peer = ID.from_base58(peer_id_from_public_key(details.provider_key))
        await self._restore_peer(provider_peer)
        self._nursery.start_soon(session.run_connection, self.host, provider_peer)
        return "resumed"

    async def _receipts(self, aid: bytes) -> list[UsageReceipt]:
        rows = await self.store.rental_receipts(aid)
        if rows:
            return [decode(raw, UsageReceipt) for _, _, raw, _ in rows]
        old = await self.store.latest_receipt(aid)  # a store written before rental_receipts
        return [decode(old.raw, UsageReceipt)] if old else []

    async def _latest_receipt(self, aid: bytes) -> UsageReceipt | None:
        receipts = await self._receipts(aid)
        return max(receipts, key=lambda r: r.heartbeat_seq) if receipts else None

    async def _restore_peer(self, peer: ID) -> None:
        import multiaddr

        for peer_id, addrs, _, _ in await self.store.peers():
            if peer_id == peer.to_base58() and addrs:
                self.host.host.get_peerstore().add_addrs(
                    peer, [multiaddr.Multiaddr(a) for a in addrs], PEER_ADDR_TTL_S)

    async def _opened_late(self, row) -> None:
        """A renter's open transaction was mined after this node restarted: resume the rental."""
        try:
            outcome = await self._resume_one(row)
        except Exception as exc:
            log.exception("resuming agreement %s failed", row.id.hex()[:12])
            outcome = f"failed: {type(exc).__name__}"
        log.info("%s: agreement %s opened after the restart: %s", self.config.name,
                 row.id.hex()[:12], outcome)


__all__ = ["ResumeMixin", "RENTER_OPEN_WAIT_S", "PEER_ADDR_TTL_S"]


async def _decode_notices(store, aid: bytes) -> list:
    from protocol.encoding import decode
    from protocol.messages import PreemptionNotice

    return [decode(raw, PreemptionNotice) for kind, raw, _ in await store.evidence(aid)
            if kind == "preemption_notice"]
