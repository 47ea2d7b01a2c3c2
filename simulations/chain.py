"""The chain model: blocks every `block_time_s`, events acted on after `confirmations` blocks,
gas per operation, and the escrow's rules from protocol.settlement.EscrowModel (a Python model
of node/contracts/Escrow.vy).

Gas per operation is taken from tests/benchmarks/bench_escrow_gas.py's results (ERC-20 token):
open 92,295; claim that settles 76,326; close 31,295; recover 40,926; with an arbiter, claim
39,075, dispute 32,024, arbitrate 52,931, finalize 53,119 (specs/escrow.md). A reverted transaction is
charged the same gas as a successful one (an over-estimate: real reverts stop early).

What the model checks like the contract: the EscrowModel state machine and deadlines (block time,
seconds); `open` after `open_by` and grace / dispute window out of the escrow's bounds are
refused (`EscrowModel.open`); a claim's EIP-712 receipt signature is recovered
(`recover_receipt_signer`) and must be the renter's wallet, as the contract's ecrecover does. What
it does not: the consent signature on open (the renter's negotiation machine verified it
already), token allowances, nonces, reorgs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.agreement import AgreementTerms, EscrowDomain, recover_receipt_signer
from protocol.errors import LocalProtocolError, Reject
from protocol.settlement import EscrowModel, claim_payout

ARBITER = -1  # the node index of the market's arbiter (a service of the world, not an agent)


@dataclass
class Escrow:
    terms: AgreementTerms
    domain: EscrowDomain
    model: EscrowModel
    renter: int
    provider: int
    opened_s: int
    record: Any = None


@dataclass
class Tx:
    method: str
    agreement_id: bytes
    sender: int
    args: dict
    on_done: Callable[[bool, str], None] | None = None


@dataclass
class ChainStats:
    txs: dict[str, int] = field(default_factory=dict)
    reverts: dict[str, int] = field(default_factory=dict)
    gas: dict[str, int] = field(default_factory=dict)
    deposited: int = 0
    paid_provider: int = 0
    paid_renter: int = 0
    claims_with_arbiter: int = 0
    disputes: dict[str, int] = field(default_factory=dict)  # by whom
    verdicts: list[tuple[int, int]] = field(default_factory=list)  # (claimed, awarded) to the provider
    finalized: int = 0  # claims settled as claimed after the window (or an unanswered dispute)


class Chain:
    def __init__(self, cfg: dict, engine: Any, start_ms: int,
                 notify: Callable[[int, str, bytes, dict], None]) -> None:
        c = cfg["chain"]
        self.cfg = c
        self.engine = engine
        self.start_ms = start_ms
        self.block_ms = c["block_time_s"] * 1000
        self.confirm_ms = c["confirmations"] * self.block_ms
        self.notify = notify  # (node, event, agreement_id, data) -> None, delivered after confirmations
        self.pending: list[Tx] = []
        self.block_scheduled = False
        self.escrows: dict[bytes, Escrow] = {}
        self.stats = ChainStats()
        self.gas_by_node: dict[int, int] = {}
        self.blocks = 0

    def gas_of(self, tx: Tx) -> int:
        esc = self.escrows.get(tx.agreement_id)
        if tx.method == "claim" and esc is not None and esc.terms.has_arbiter:
            return self.cfg["gas_claim_arbiter"]  # starts the dispute window, pays nobody yet
        return self.cfg[f"gas_{tx.method}"]

    def submit(self, tx: Tx) -> None:
        self.pending.append(tx)
        if not self.block_scheduled:
            self.block_scheduled = True
            k = (self.engine.now - self.start_ms) // self.block_ms + 1
            self.engine.at(self.start_ms + k * self.block_ms, self._block)

    def _block(self) -> None:
        self.block_scheduled = False
        self.blocks += 1
        now_s = self.engine.now // 1000
        txs, self.pending = self.pending, []
        for tx in txs:
            gas = self.gas_of(tx)
            s = self.stats
            s.txs[tx.method] = s.txs.get(tx.method, 0) + 1
            s.gas[tx.method] = s.gas.get(tx.method, 0) + gas
            self.gas_by_node[tx.sender] = self.gas_by_node.get(tx.sender, 0) + gas
            try:
                events = getattr(self, "_" + tx.method)(tx, now_s)
                ok, why = True, ""
            except LocalProtocolError as exc:
                s.reverts[exc.code] = s.reverts.get(exc.code, 0) + 1
                events, ok, why = [], False, exc.code
            when = self.engine.now + self.confirm_ms
            for node, event, data in events:
                self.engine.at(when, self.notify, node, event, tx.agreement_id, data)
            if tx.on_done is not None:
                self.engine.at(when, tx.on_done, ok, why)

    # -- the contract's methods ---------------------------------------------------------------

    def _open(self, tx: Tx, now_s: int) -> list:
        if tx.agreement_id in self.escrows:
            raise LocalProtocolError("exists", "agreement already opened")
        terms: AgreementTerms = tx.args["terms"]
        esc = Escrow(terms, tx.args["domain"], EscrowModel.open(terms, now_s), tx.sender,
                     tx.args["provider_node"], now_s, tx.args.get("record"))
        self.escrows[tx.agreement_id] = esc
        self.stats.deposited += terms.deposit
        data = {"started_s": now_s}
        return [(esc.renter, "opened", data), (esc.provider, "opened", data)]

    def _esc(self, tx: Tx) -> Escrow:
        esc = self.escrows.get(tx.agreement_id)
        if esc is None:
            raise LocalProtocolError("unknown_agreement", "no such agreement")
        return esc

    def _pay(self, esc: Escrow, payout) -> None:
        self.stats.paid_provider += payout.provider
        self.stats.paid_renter += payout.renter
        if esc.record is not None:
            esc.record.paid_provider += payout.provider
            esc.record.refund_renter += payout.renter
            esc.record.settled_s = self.engine.now // 1000

    def _claim(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        if tx.sender != esc.provider:
            raise LocalProtocolError("not_provider", "only the provider claims")
        acked, sig = tx.args["acked_seconds"], tx.args["receipt_sig"]
        try:
            signer = recover_receipt_signer(esc.domain, tx.agreement_id, acked, sig)
        except Reject:
            raise LocalProtocolError("bad_receipt", "receipt signature does not recover") from None
        if signer != esc.terms.renter:
            raise LocalProtocolError("bad_receipt", "receipt not signed by the renter")
        payout = esc.model.claim(acked, now_s)
        if payout is not None:
            self._pay(esc, payout)
            return [(esc.renter, "settled", {}), (esc.provider, "settled", {})]
        self.stats.claims_with_arbiter += 1
        data = {"acked_seconds": acked, "claimed_s": now_s}
        return [(esc.renter, "claimed", data), (esc.provider, "claimed", data)]

    def _dispute(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        if tx.sender not in (esc.renter, esc.provider):
            raise LocalProtocolError("not_party", "only the renter or the provider disputes")
        esc.model.dispute(now_s)
        by = "provider" if tx.sender == esc.provider else "renter"
        self.stats.disputes[by] = self.stats.disputes.get(by, 0) + 1
        data = {"by": by, "disputed_s": now_s}
        return [(esc.renter, "disputed", data), (esc.provider, "disputed", data), (ARBITER, "disputed", data)]

    def _arbitrate(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        if tx.sender != ARBITER:
            raise LocalProtocolError("not_arbiter", "only the arbiter arbitrates")
        claimed = claim_payout(esc.terms, esc.model.acked_seconds).provider
        payout = esc.model.arbitrate(tx.args["provider_amount"], now_s)
        self._pay(esc, payout)
        self.stats.verdicts.append((claimed, payout.provider))
        return [(esc.renter, "settled", {}), (esc.provider, "settled", {})]

    def _finalize(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        self._pay(esc, esc.model.finalize(now_s))
        self.stats.finalized += 1
        return [(esc.renter, "settled", {}), (esc.provider, "settled", {})]

    def _close(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        if tx.sender != esc.renter:
            raise LocalProtocolError("not_renter", "only the renter closes")
        esc.model.close(now_s)
        return [(esc.provider, "closed", {})]

    def _recover(self, tx: Tx, now_s: int) -> list:
        esc = self._esc(tx)
        if tx.sender != esc.renter:
            raise LocalProtocolError("not_renter", "only the renter recovers")
        self._pay(esc, esc.model.recover(now_s))
        return [(esc.renter, "settled", {})]

    def locked(self) -> int:
        """Deposits still held by open escrows."""
        return sum(e.terms.deposit for e in self.escrows.values() if e.model.state != "final")
