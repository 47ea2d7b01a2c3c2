"""Agents: providers, renters, spammers and Sybil identities, each driving the real protocol
core (protocol/): signed offers, OfferBook, the negotiation machines, the rental machines.

Agents never model delay or loss themselves: every byte goes through `world.net` (direct
streams) or `world.gossip_publish` (the offer topic), and every escrow call through
`world.chain`. Each agent draws randomness only from its own RNG (seed + its name).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol.effects import EscrowCall, Persist, Report, Send, StartService, StopService
from protocol.errors import RemoteProtocolError
from protocol.identity import PeerKey
from protocol.messages import Binding, GpuMetrics, Offer, OfferWithdrawal, digest
from protocol.negotiation import (
    FirstAgreementWins, ProviderNegotiation, RenterNegotiation, State, escrow_domain,
    renter_refusal,
)
from protocol.offerbook import model_token
from protocol.rental import ProviderRental, RenterRental, State as RentalState
from protocol.samples import GPU_MODELS, make_offer, make_provider, usd_per_hour_to_units_per_second

from .chain import Tx

if TYPE_CHECKING:
    from .world import World

MODELS = {m.name: m for m in GPU_MODELS}


@dataclass
class RentalRecord:
    """Ground truth and money for one opened agreement (what the metrics are computed from)."""

    agreement_id: bytes
    provider: int
    renter: int
    provider_profile: str
    renter_profile: str
    model: str
    gpus: tuple
    price_per_second: int  # whole agreement, smallest token unit
    deposit: int
    max_seconds: int
    requested_ms: int
    opened_s: int = -1
    serve_start_ms: int = -1
    served_ms: int = 0  # provider actually running the agreed GPUs for the renter
    paid_provider: int = 0
    refund_renter: int = 0
    settled_s: int = -1
    intervals: list = field(default_factory=list)  # (start_ms, end_ms) served


class Agent:
    role = "node"

    def __init__(self, world: "World", idx: int, name: str, region: int, profile: str) -> None:
        self.world = world
        self.idx = idx
        self.name = name
        self.region = region
        self.profile = profile
        self.rng = world.node_rng(name)
        self._wake: dict[Any, int] = {}  # machine key -> scheduled deadline

    # -- timers: one wake-up per machine, at its next_deadline() --------------------------

    def schedule(self, key: Any, deadline: int | None) -> None:
        if deadline is None:
            self._wake.pop(key, None)
            return
        if self._wake.get(key) == deadline:
            return
        self._wake[key] = deadline
        self.world.engine.at(deadline, self._fire, key, deadline)

    def _fire(self, key: Any, deadline: int) -> None:
        if self._wake.get(key) != deadline:
            return  # superseded
        del self._wake[key]
        if not self.world.online[self.idx]:
            self._paused.add(key)
            return
        self.on_timer(key)

    @property
    def _paused(self) -> set:
        if not hasattr(self, "_paused_set"):
            self._paused_set: set = set()
        return self._paused_set

    def resume_timers(self) -> None:
        keys, self._paused_set = sorted(self._paused, key=repr), set()
        for key in keys:
            self.on_timer(key)

    def on_timer(self, key: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def send(self, to_key: bytes, message: Any, stream: tuple) -> None:
        dst = self.world.key_to_node.get(to_key)
        if dst is None:
            return
        target = self.world.nodes[dst]
        data = message.encode()
        self.world.net.send(self.idx, dst, data,
                            lambda src, d, s=stream: target.on_stream(src, s, d))

    def on_stream(self, src: int, stream: tuple, data: bytes) -> None:  # pragma: no cover
        pass

    def on_chain(self, event: str, agreement_id: bytes, data: dict) -> None:  # pragma: no cover
        pass

    def go_online(self) -> None:
        pass

    def go_offline(self) -> None:
        pass


# =============================================================================================
# Providers


class Provider(Agent):
    role = "provider"

    def __init__(self, world: "World", idx: int, name: str, region: int, profile: str,
                 model_name: str, gpu_count: int | None = None, identity: tuple | None = None,
                 price_frac: float | None = None, operator: int | None = None) -> None:
        super().__init__(world, idx, name, region, profile)
        cfg = world.cfg
        self.peer, self.wallet_key, self.binding = identity or make_provider(self.rng, cfg["chain"]["chain_id"])
        model = MODELS[model_name]
        price = None
        if price_frac is not None:
            lo, hi = model.usd_per_hour
            price = usd_per_hour_to_units_per_second(lo + price_frac * (hi - lo))
        from protocol.samples import REGIONS
        self.base = make_offer(
            self.peer, self.binding, self.rng, world.engine.now, seq=1, model=model,
            gpu_count=gpu_count, region=REGIONS[region], price_per_gpu_second=price,
            lifetime_ms=cfg["market"]["offer_lifetime_s"] * 1000,
            heartbeat_interval_s=cfg["market"]["heartbeat_interval_s"],
        )
        arb = cfg["market"]["arbiter_frac"]
        if arb > 0 and self.rng.random() < arb:  # no draw at 0: runs without arbiters unchanged
            self.base = dataclasses.replace(self.base, terms=dataclasses.replace(
                self.base.terms, arbiter=world.arbiter_wallet,
                dispute_window_s=cfg["market"]["dispute_window_s"]))
        self.model = model_name
        self.all_gpus = self.base.gpus
        self.price = self.base.terms.price_per_gpu_second
        self.floor = max(1, int(self.price * cfg["providers"]["floor_frac"]))
        self.operator = operator  # Sybil operator index, or None
        self.seq = 0
        self.offer: Offer | None = None
        self.offer_digest = b""
        self.published_gpus: tuple = ()
        self.taken: dict[bytes, tuple[bytes, int | None]] = {}  # gpu -> (agreement, hold until)
        self.negs: dict[bytes, ProviderNegotiation] = {}
        self.pending: dict[bytes, ProviderNegotiation] = {}  # agreement id -> agreed negotiation
        self.rentals: dict[bytes, ProviderRental] = {}
        self.records: dict[bytes, RentalRecord] = {}
        self.faulted = False
        self.left_for_good = False

    # -- capacity ----------------------------------------------------------------------------

    def free(self) -> tuple[bytes, ...]:
        now = self.world.engine.now
        for g, (_, until) in list(self.taken.items()):
            if until is not None and until <= now:
                del self.taken[g]
        if self.operator is not None:
            return tuple(g.uuid_digest for g in self.all_gpus if g.uuid_digest not in self.taken)
        return tuple(g.uuid_digest for g in self.all_gpus if g.uuid_digest not in self.taken)

    def republish(self, force: bool = False) -> None:
        if not self.world.online[self.idx]:
            return
        free = set(self.free())
        gpus = tuple(g for g in self.all_gpus if g.uuid_digest in free)
        if gpus == self.published_gpus and not force:
            return
        now = self.world.engine.now
        self.seq += 1
        if gpus:
            offer = dataclasses.replace(
                self.base, seq=self.seq, created_ms=now,
                expires_ms=now + self.world.cfg["market"]["offer_lifetime_s"] * 1000, gpus=gpus,
            ).sign(self.peer)
            data = offer.encode()
            self.offer, self.offer_digest = offer, digest(data)
            self.world.gossip_publish(self, data, "offer", self.seq, offer.expires_ms)
        elif self.published_gpus:
            w = OfferWithdrawal(provider=self.peer.public, seq=self.seq, created_ms=now).sign(self.peer)
            self.world.gossip_publish(self, w.encode(), "withdrawal", self.seq, now + 2 * 3600_000)
        self.published_gpus = gpus
        for n in self.negs.values():
            if n.state not in (State.AGREED, State.FAILED):
                n.set_free_gpus([g for g in self.free() if g in {x.uuid_digest for x in n.offer.gpus}])

    def reannounce(self) -> None:
        if self.world.online[self.idx] and self.published_gpus:
            self.republish(force=True)
        self.world.engine.after(self.world.cfg["market"]["reannounce_s"] * 1000, self.reannounce)

    def go_online(self) -> None:
        self.published_gpus = ()
        w = self.world
        first = w.start_ms + w.cfg["market"]["first_publish_after_s"] * 1000
        if w.engine.now < first:
            w.engine.at(first, self.republish, True)
        else:
            self.republish(force=True)
        self.resume_timers()

    def go_offline(self) -> None:
        now = self.world.engine.now
        for aid, rec in self.records.items():
            self._serve_stop(rec, now)

    # -- streams -----------------------------------------------------------------------------

    def on_stream(self, src: int, stream: tuple, data: bytes) -> None:
        kind, key = stream
        now = self.world.engine.now
        if kind == "neg":
            n = self.negs.get(key)
            if n is None:
                if self.offer is None:
                    return
                free = [g for g in self.free() if g in {x.uuid_digest for x in self.offer.gpus}]
                n = ProviderNegotiation(self.offer, self.offer_digest, self.peer, self.wallet_key,
                                        free, self.floor, self.world.params,
                                        open_hold_ms=self.world.cfg["market"]["reservation_hold_s"] * 1000,
                                        verifier=self.world.verifier)
                self.negs[key] = n
            self.effects(n.receive_data(data, now), ("neg", key))
            self.schedule(("neg", key), n.next_deadline())
            self._neg_ended(key, n)
        elif kind == "rent":
            m = self.rentals.get(key)
            if m is not None:
                self.effects(m.receive_data(data, now), ("rent", key))
                self.schedule(("rent", key), m.next_deadline())

    def on_timer(self, key: Any) -> None:
        now = self.world.engine.now
        kind, k = key
        if kind == "neg":
            n = self.negs.get(k)
            if n is not None:
                self.effects(n.on_timer(now), key)
                self.schedule(key, n.next_deadline())
                self._neg_ended(k, n)
        elif kind == "rent":
            m = self.rentals.get(k)
            if m is not None:
                self.effects(m.on_timer(now), key)
                self.schedule(key, m.next_deadline())
        elif kind == "hold":
            if k in self.pending and k not in self.rentals:
                self.pending.pop(k)
                self.republish()
        elif kind == "fault":
            self.fault(k)

    def _neg_ended(self, key: bytes, n: ProviderNegotiation) -> None:
        if n.state is not State.FAILED:
            return
        self.negs.pop(key, None)
        if n.terms is not None:  # accepted, then cancelled by the renter: free the GPUs now
            aid = n.terms.agreement_id()
            if self.pending.pop(aid, None) is not None and aid not in self.rentals:
                for g, (a, _) in list(self.taken.items()):
                    if a == aid:
                        del self.taken[g]
                self.republish()

    def effects(self, effects: list, stream: tuple) -> None:
        w = self.world
        now = w.engine.now
        for e in effects:
            if isinstance(e, Send):
                if stream[0] == "rent" and self.faulted and self.profile == "stop_serving":
                    continue  # stopped serving: no more heartbeats
                self.send(e.to, e.message, stream)
            elif isinstance(e, Report):
                w.metrics.report(self, e)
                if e.event == "negotiation_agreed":
                    n = self.negs[stream[1]]
                    aid = e.detail["agreement_id"]
                    hold = (n.terms.open_by + 1) * 1000  # the consent is dead after open_by
                    for g in e.detail["gpus"]:
                        self.taken[g] = (aid, hold)
                    self.pending[aid] = n
                    self.schedule(("hold", aid), hold)
                    self.republish()
            elif isinstance(e, EscrowCall):
                w.submit(self, e)
            elif isinstance(e, StartService):
                rec = self.records.get(e.agreement_id)
                if rec is not None and not self.faulted:
                    rec.serve_start_ms = now
            elif isinstance(e, StopService):
                rec = self.records.get(e.agreement_id)
                if rec is not None:
                    self._serve_stop(rec, now)
                for g, (aid, _) in list(self.taken.items()):
                    if aid == e.agreement_id:
                        del self.taken[g]
                self.republish()
            elif isinstance(e, Persist):
                w.metrics.stores += 1

    def _serve_stop(self, rec: RentalRecord, now: int) -> None:
        if rec.serve_start_ms >= 0:
            rec.served_ms += now - rec.serve_start_ms
            rec.intervals.append((rec.serve_start_ms, now))
            rec.serve_start_ms = -1

    # -- chain -------------------------------------------------------------------------------

    def on_chain(self, event: str, aid: bytes, data: dict) -> None:
        now = self.world.engine.now
        if event == "opened":
            n = self.pending.pop(aid, None)
            if n is None or n.terms is None:
                self.world.metrics.count("provider_open_without_reservation")
                return
            for g in n.details.gpus:
                self.taken[g] = (aid, None)
            self._wake.pop(("hold", aid), None)
            metrics = None
            if self.profile == "misreport":
                metrics = [GpuMetrics(hashlib.sha256(b"other-gpu" + g).digest(), 90, 1000, 60, 300_000)
                           for g in n.details.gpus]
            else:
                metrics = [GpuMetrics(g, 95, 20_000, 65, 350_000) for g in n.details.gpus]
            m = ProviderRental(n.terms, n.details, escrow_domain(n.offer), self.peer,
                               data["started_s"] * 1000, self.world.params, metrics,
                               verifier=self.world.verifier)
            self.rentals[aid] = m
            rec = self.world.records.get(aid)
            if rec is not None:
                self.records[aid] = rec
            self.effects(m.start(), ("rent", aid))
            self.effects(m.on_timer(now), ("rent", aid))
            self.schedule(("rent", aid), m.next_deadline())
            if self.profile in ("offline", "stop_serving") and not self.faulted:
                fa = self.world.cfg["providers"]["fault_after_s"] * 1000
                self.schedule(("fault", aid), now + int(fa * (0.5 + self.rng.random())))
        elif event == "closed":
            m = self.rentals.get(aid)
            if m is not None:
                self.effects(m.escrow_closed(now), ("rent", aid))
                self.schedule(("rent", aid), m.next_deadline())
        elif event == "claimed":
            # the claim waits out the dispute window: a provider that served well beyond what the
            # renter's receipts acknowledge disputes (the arbiter rules), else it finalizes
            w = self.world
            rec = self.records.get(aid)
            hb = w.cfg["market"]["heartbeat_interval_s"]
            if rec is not None and rec.served_ms // 1000 > data["acked_seconds"] + 2 * hb:
                w.chain.submit(Tx("dispute", aid, self.idx, {}))
            else:
                w.engine.after((w.cfg["market"]["dispute_window_s"] + 1) * 1000 + w.chain.block_ms,
                               w.chain.submit, Tx("finalize", aid, self.idx, {}))

    def fault(self, aid: bytes) -> None:
        if self.faulted:
            return
        self.faulted = True
        now = self.world.engine.now
        self.world.log(f"fault {self.name} {self.profile} during {aid.hex()[:12]}")
        if self.profile == "offline":
            self.left_for_good = True
            self.world.leave(self.idx, rejoin=False)
        elif self.profile == "stop_serving":
            for rec in self.records.values():
                self._serve_stop(rec, now)


# =============================================================================================
# Renters


class Renter(Agent):
    role = "renter"

    def __init__(self, world: "World", idx: int, name: str, region: int, profile: str) -> None:
        super().__init__(world, idx, name, region, profile)
        cfg = world.cfg
        self.peer = PeerKey(self.rng.randbytes(32))
        self.wallet_key = self.rng.randbytes(32)
        self.binding = Binding.create(self.peer, self.wallet_key, cfg["chain"]["chain_id"])
        self.remaining = cfg["renters"]["rentals_each"]
        self.want: dict | None = None
        self.attempts = 0
        self.group: FirstAgreementWins | None = None
        self.rental: RenterRental | None = None
        self.record: RentalRecord | None = None
        self.faulted = False
        self.waiting = False  # a request is due but the node is offline

    def new_request(self) -> None:
        r = self.world.cfg["renters"]
        model = MODELS[self.rng.choice(self.world.cfg["providers"]["models"])]
        lo, hi = model.usd_per_hour
        self.want = {
            "model": model.name,
            "gpus": self.rng.randint(1, r["gpus_max"]),
            "duration_s": self.rng.randint(r["duration_min_s"], r["duration_max_s"]),
            "max_price": usd_per_hour_to_units_per_second(lo + r["max_price_frac"] * (hi - lo)),
            "since_ms": self.world.engine.now,
        }
        self.attempts = 0
        self.world.metrics.requests += 1
        self.shop()

    def request_due(self) -> None:
        if not self.world.online[self.idx]:
            self.waiting = True
            return
        self.new_request()

    def go_online(self) -> None:
        self.resume_timers()
        if self.waiting:
            self.waiting = False
            self.new_request()

    def shop(self) -> None:
        w = self.world
        if not w.online[self.idx]:
            self.waiting = True
            return
        now = w.engine.now
        want = self.want
        assert want is not None
        self.attempts += 1
        # this renter's own book at `now` (world.query_book: the shared book in this node's state)
        q = f"gpu={model_token(want['model'])} count>={want['gpus']}"
        found, size = w.query_book(self.idx, q, 50)
        # Every renter trusts the market's arbiter (renter.arbiters on a node), no other.
        entries = [e for e in found
                   if e.price_per_gpu_hour <= want["max_price"] * 3600
                   and renter_refusal(e.offer, w.trusted_arbiters) is None][: w.cfg["renters"]["parallel"]]
        w.metrics.book_sizes.append(size)
        if not entries:
            w.metrics.fail("renter", "NO_MATCHING_OFFER")
            return self._attempt_failed()
        negs = []
        opening_frac = w.cfg["renters"]["opening_frac"]
        for e in entries:
            offer = e.offer
            opening = max(1, int(offer.terms.price_per_gpu_second * opening_frac))
            negs.append(RenterNegotiation(
                offer, e.digest, self.peer, self.binding, want["gpus"], want["duration_s"],
                want["max_price"], "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIsim " + self.name,
                w.params, self.rng, opening_price_per_gpu_second=opening, verifier=w.verifier))
        self.group = FirstAgreementWins(negs)
        self.effects(self.group.start(now), None)
        self.schedule("neg", self.group.next_deadline())

    def _attempt_failed(self) -> None:
        r = self.world.cfg["renters"]
        self.group = None
        if self.attempts < r["retries"]:
            self.world.engine.after(r["retry_after_s"] * 1000, self.shop)
        else:
            self.world.metrics.gave_up += 1
            self.world.log(f"gave_up {self.name}")
            self.want = None
            self._next_rental()

    def _next_rental(self) -> None:
        self.remaining -= 1
        if self.remaining > 0:
            w = self.world
            end = w.start_ms + int(w.cfg["run"]["duration_s"] * 1000 * w.cfg["renters"]["request_window_frac"])
            if w.engine.now < end:
                w.engine.at(self.rng.randint(w.engine.now, end), self.request_due)

    def on_stream(self, src: int, stream: tuple, data: bytes) -> None:
        kind, key = stream
        now = self.world.engine.now
        if kind == "neg" and self.group is not None and key in self.group.negotiations:
            self.effects(self.group.receive_data(key, data, now), None)
            self._after_neg()
        elif kind == "rent" and self.rental is not None and key == self.rental.agreement_id:
            self.effects(self.rental.receive_data(data, now), key)
            self.schedule("rent", self.rental.next_deadline())

    def _after_neg(self) -> None:
        g = self.group
        if g is None:
            return
        self.schedule("neg", g.next_deadline())
        if g.done and g.winner is None:
            self._attempt_failed()

    def on_timer(self, key: Any) -> None:
        now = self.world.engine.now
        if key == "neg" and self.group is not None:
            self.effects(self.group.on_timer(now), None)
            self._after_neg()
        elif key == "rent" and self.rental is not None:
            self.effects(self.rental.on_timer(now), self.rental.agreement_id)
            self.schedule("rent", self.rental.next_deadline())
            self._maybe_done()
        elif key == "fault":
            self.faulted = True
            self.world.log(f"fault {self.name} stop_ack")

    def effects(self, effects: list, aid: bytes | None) -> None:
        w = self.world
        for e in effects:
            if isinstance(e, Send):
                if aid is not None:
                    if self.faulted and self.profile == "stop_ack":
                        continue  # stopped acknowledging: receipts are never sent
                    self.send(e.to, e.message, ("rent", aid))
                else:
                    self.send(e.to, e.message, ("neg", e.message.negotiation_id))
            elif isinstance(e, Report):
                w.metrics.report(self, e)
            elif isinstance(e, EscrowCall):
                if e.method == "open":
                    self._open(e)
                else:
                    w.submit(self, e)
            elif isinstance(e, Persist):
                w.metrics.stores += 1

    def _open(self, e: EscrowCall) -> None:
        w = self.world
        g = self.group
        assert g is not None and g.winner is not None and self.want is not None
        n = g.winner
        terms = e.args["terms"]
        pnode = w.key_to_node[n.offer.provider]
        prov = w.nodes[pnode]
        rec = RentalRecord(
            agreement_id=e.agreement_id, provider=pnode, renter=self.idx,
            provider_profile=prov.profile, renter_profile=self.profile, model=self.want["model"],
            gpus=tuple(n.details.gpus), price_per_second=terms.price_per_second,
            deposit=terms.deposit, max_seconds=terms.max_seconds, requested_ms=self.want["since_ms"],
        )
        w.records[e.agreement_id] = rec
        self.record = rec
        w.submit(self, e, extra={"provider_node": pnode, "record": rec})

    def on_chain(self, event: str, aid: bytes, data: dict) -> None:
        w = self.world
        now = w.engine.now
        if event == "opened" and self.group is not None and self.group.winner is not None:
            n = self.group.winner
            rec = w.records[aid]
            rec.opened_s = data["started_s"]
            w.metrics.time_to_rent_ms.append(now - rec.requested_ms)
            self.rental = RenterRental(n.terms, n.details, escrow_domain(n.offer), self.peer,
                                       self.wallet_key, data["started_s"] * 1000, self.rng, w.params,
                                       verifier=w.verifier)
            self.group = None
            self.schedule("rent", self.rental.next_deadline())
            if self.profile == "stop_ack":
                fa = w.cfg["providers"]["fault_after_s"] * 1000
                self.schedule("fault", now + int(fa * (0.5 + self.rng.random())))
        elif event == "claimed":
            # finalize is anyone's call: the renter does it (for its refund) if the provider has
            # not within a minute after the window
            w.engine.after((w.cfg["market"]["dispute_window_s"] + 61) * 1000 + w.chain.block_ms,
                           self._finalize_if_open, aid)
        elif event == "settled" and self.rental is not None and self.rental.agreement_id == aid:
            self.effects(self.rental.escrow_settled(now), aid)
            self.schedule("rent", self.rental.next_deadline())
            self._maybe_done()

    def _finalize_if_open(self, aid: bytes) -> None:
        esc = self.world.chain.escrows.get(aid)
        if esc is not None and esc.model.state == "claimed" and self.world.online[self.idx]:
            self.world.chain.submit(Tx("finalize", aid, self.idx, {}))

    def _maybe_done(self) -> None:
        if self.rental is not None and self.rental.state is RentalState.DONE:
            self.rental = None
            self.record = None
            self.want = None
            self.faulted = False
            self._wake.pop("fault", None)
            self._next_rental()


# =============================================================================================
# Spammers


class Spammer(Agent):
    role = "spammer"

    def __init__(self, world: "World", idx: int, name: str, region: int) -> None:
        super().__init__(world, idx, name, region, "spam")
        self.peer, self.wallet_key, self.binding = make_provider(self.rng, world.cfg["chain"]["chain_id"])
        self.seq = 0

    def tick(self) -> None:
        w = self.world
        rate = w.cfg["spammers"]["per_minute"]
        if rate <= 0:
            return
        if w.online[self.idx]:
            self.seq += 1
            offer = make_offer(self.peer, self.binding, self.rng, w.engine.now, seq=self.seq,
                               lifetime_ms=w.cfg["market"]["offer_lifetime_s"] * 1000)
            data = bytearray(offer.encode())
            data[-1] ^= 0xFF  # a forged signature: [REJECT] bad_signature at the first honest hop
            w.gossip_invalid(self, bytes(data))
        w.engine.after(max(1, int(self.rng.expovariate(rate / 60_000.0))), self.tick)
