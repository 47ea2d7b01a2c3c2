"""Agreements built directly (the negotiation is someone else's module): keys, terms, details,
bindings, and a pair of rental machines wired by a virtual clock."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from protocol.agreement import AgreementTerms, EscrowDomain
from protocol.eth import ZERO_ADDRESS, private_key_address
from protocol.identity import PeerKey
from protocol.messages import AgreementDetails, Binding

CHAIN_ID = 31337
ESCROW = b"\xee" * 20
TOKEN = b"\x70" * 20


@dataclass
class Agreement:
    terms: AgreementTerms
    details: AgreementDetails
    domain: EscrowDomain
    provider: PeerKey
    renter: PeerKey
    provider_wallet_key: bytes
    renter_wallet_key: bytes
    provider_binding: Binding
    renter_binding: Binding

    @property
    def agreement_id(self) -> bytes:
        return self.terms.agreement_id()


def make_agreement(
    seed: int = 1,
    *,
    max_seconds: int = 600,
    interval: int = 10,
    grace: int = 300,
    price: int = 7,
    gpu_count: int = 2,
    arbiter: bytes = ZERO_ADDRESS,
    dispute_window: int = 0,
    open_by: int = 4_102_444_800,  # 2100-01-01: these agreements are never opened on a chain
    notice_s: int = 0,  # > 0: an interruptible agreement with this notice
) -> Agreement:
    rng = random.Random(seed)
    provider, renter = PeerKey(rng.randbytes(32)), PeerKey(rng.randbytes(32))
    pw, rw = rng.randbytes(32), rng.randbytes(32)
    gpus = tuple(hashlib.sha256(b"gpu-%d-%d" % (seed, i)).digest() for i in range(gpu_count))
    details = AgreementDetails(
        negotiation_id=rng.randbytes(16),
        offer_digest=rng.randbytes(32),
        provider_key=provider.public,
        renter_key=renter.public,
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        gpus=gpus,
        access_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample renter@host",
        notice_s=notice_s,
    )
    terms = AgreementTerms(
        provider=private_key_address(pw),
        renter=private_key_address(rw),
        token=TOKEN,
        price_per_second=price,
        max_seconds=max_seconds,
        heartbeat_interval=interval,
        grace=grace,
        arbiter=arbiter,
        dispute_window=dispute_window,
        details_hash=details.details_hash(),
        open_by=open_by,
    )
    return Agreement(
        terms=terms,
        details=details,
        domain=EscrowDomain(CHAIN_ID, ESCROW),
        provider=provider,
        renter=renter,
        provider_wallet_key=pw,
        renter_wallet_key=rw,
        provider_binding=Binding.create(provider, pw, CHAIN_ID),
        renter_binding=Binding.create(renter, rw, CHAIN_ID),
    )


# ---------------------------------------------------------------------------------------------
# Two rental machines wired together with no socket: a virtual clock, messages in flight as
# encoded bytes, an EscrowModel standing in for the chain.

from protocol import settlement  # noqa: E402
from protocol.effects import EscrowCall, Persist, Send, StartService, StopService  # noqa: E402
from protocol.params import Params  # noqa: E402
from protocol.messages import PreemptionNotice  # noqa: E402
from protocol.rental import ProviderRental, RenterRental  # noqa: E402

TEST_PARAMS = Params(
    clock_skew_ms=2_000,
    heartbeat_late_tolerance_ms=2_000,
    provider_stop_after_missed_receipts=3,
    renter_heartbeat_timeout_intervals=2,
)


class RentalPair:
    """Drive a ProviderRental and a RenterRental to completion.

    `drop(direction, index)` and `delay_ms(direction, index)` decide the fate of the index-th
    message sent in `direction` ("p2r" or "r2p"). `provider_crash_ms` / `renter_vanish_ms`:
    from then on that side does nothing at all (no timers, no input, no chain calls).
    """

    def __init__(self, a: Agreement, *, start_ms: int = 1_700_000_000_000, params: Params = TEST_PARAMS,
                 drop=None, delay_ms=None, provider_crash_ms=None, renter_vanish_ms=None,
                 renter_stop_ms=None, seed: int = 7, preempt=None, notice_delay_ms: int = 0):
        self.a, self.params, self.now = a, params, start_ms
        self.start_ms = start_ms
        self.provider = ProviderRental(a.terms, a.details, a.domain, a.provider, start_ms, params)
        self.renter = RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key,
                                   start_ms, random.Random(seed), params)
        self.escrow = settlement.EscrowModel(a.terms, start_ms // 1000)
        self.drop = drop or (lambda d, i: False)
        self.delay_ms = delay_ms or (lambda d, i: 0)
        self.provider_crash_ms, self.renter_vanish_ms = provider_crash_ms, renter_vanish_ms
        self.renter_stop_ms = renter_stop_ms
        # (at_ms, stop_ms, reason): the provider preempts then; notices travel notice_delay_ms late
        self.preempt, self.notice_delay_ms = preempt, notice_delay_ms
        self.in_flight: list[tuple[int, int, str, bytes]] = []  # (deliver_ms, order, to, bytes)
        self.sent_count = {"p2r": 0, "r2p": 0}
        self.order = 0
        self.stores = {"provider": [], "renter": []}  # (record, wire bytes)
        self.escrow_calls: list[tuple[str, int, EscrowCall]] = []
        self.payout: settlement.Payout | None = None
        self.service_started_ms: int | None = None
        self.service_stopped_ms: int | None = None
        self.reports: list = []
        self._apply("provider", self.provider.start())

    # -- who is alive ----------------------------------------------------------------------

    def provider_up(self) -> bool:
        return self.provider_crash_ms is None or self.now < self.provider_crash_ms

    def renter_up(self) -> bool:
        return self.renter_vanish_ms is None or self.now < self.renter_vanish_ms

    # -- effects ---------------------------------------------------------------------------

    def _apply(self, side: str, effects) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self.stores[side].append((e.record, e.message.encode()))
            elif isinstance(e, Send):
                d = "p2r" if side == "provider" else "r2p"
                i = self.sent_count[d]
                self.sent_count[d] += 1
                if not self.drop(d, i):
                    self.order += 1
                    to = "renter" if side == "provider" else "provider"
                    late = self.notice_delay_ms if isinstance(e.message, PreemptionNotice) else 0
                    self.in_flight.append((self.now + self.delay_ms(d, i) + late, self.order, to,
                                           e.message.encode()))
            elif isinstance(e, StartService):
                self.service_started_ms = self.now
            elif isinstance(e, StopService):
                self.service_stopped_ms = self.now
            elif isinstance(e, EscrowCall):
                self.escrow_calls.append((side, self.now, e))
                self._chain(side, e)
            else:
                self.reports.append((side, self.now, e))

    def _chain(self, side: str, call: EscrowCall) -> None:
        now_s = self.now // 1000
        try:
            if call.method == "claim":
                result = self.escrow.claim(call.args["acked_seconds"], now_s)
            elif call.method == "close":
                result = self.escrow.close(now_s)
            elif call.method == "recover":
                result = self.escrow.recover(now_s)
            else:
                raise AssertionError(call.method)
        except Exception as exc:  # a reverted transaction
            self.reports.append((side, self.now, ("reverted", call.method, getattr(exc, "code", exc))))
            return
        if isinstance(result, settlement.Payout):
            self.payout = result
            if self.renter_up():
                self._apply("renter", self.renter.escrow_settled(self.now))
        if call.method == "close" and self.provider_up():
            self._apply("provider", self.provider.escrow_closed(self.now))

    # -- the clock -------------------------------------------------------------------------

    def _next_time(self):
        times = [t for t, *_ in self.in_flight]
        if self.provider_up() and (d := self.provider.next_deadline()) is not None:
            times.append(d)
        if self.renter_up() and (d := self.renter.next_deadline()) is not None:
            times.append(d)
        if self.renter_stop_ms is not None:
            times.append(self.renter_stop_ms)
        if self.preempt is not None:
            times.append(self.preempt[0])
        return min(times) if times else None

    def step(self) -> bool:
        t = self._next_time()
        if t is None:
            return False
        self.now = max(self.now, t)
        if self.renter_stop_ms is not None and self.now >= self.renter_stop_ms:
            self.renter_stop_ms = None
            if self.renter_up() and self.renter.state in ("active", "silent", "noticed"):
                self._apply("renter", self.renter.stop(self.now))
        if self.preempt is not None and self.now >= self.preempt[0]:
            _, stop_ms, reason = self.preempt
            self.preempt = None
            if self.provider_up() and self.provider.state == "serving":
                self._apply("provider", self.provider.preempt(self.now, stop_ms, reason))
        due = sorted(m for m in self.in_flight if m[0] <= self.now)
        self.in_flight = [m for m in self.in_flight if m[0] > self.now]
        for _, _, to, data in due:
            if to == "renter" and self.renter_up():
                self._apply("renter", self.renter.receive_data(data, self.now))
            elif to == "provider" and self.provider_up():
                self._apply("provider", self.provider.receive_data(data, self.now))
        if self.provider_up():
            d = self.provider.next_deadline()
            if d is not None and d <= self.now:
                self._apply("provider", self.provider.on_timer(self.now))
        if self.renter_up():
            d = self.renter.next_deadline()
            if d is not None and d <= self.now:
                self._apply("renter", self.renter.on_timer(self.now))
        return True

    def run(self, max_steps: int = 100_000) -> "RentalPair":
        for _ in range(max_steps):
            if not self.step():
                return self
        raise AssertionError("rental did not finish")

    # -- measurements ----------------------------------------------------------------------

    def delivered_ms(self) -> int:
        """Service the provider actually gave: from StartService until it stopped serving,
        crashed, or the agreement ended, whichever came first."""
        ends = [self.start_ms + self.a.terms.max_seconds * 1000]
        if self.service_stopped_ms is not None:
            ends.append(self.service_stopped_ms)
        if self.provider_crash_ms is not None:
            ends.append(self.provider_crash_ms)
        return max(0, min(ends) - self.service_started_ms)

    def records(self, side: str, record: str) -> list[bytes]:
        return [b for r, b in self.stores[side] if r == record]
