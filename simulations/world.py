"""The world: builds the nodes of a scenario, wires them to the network, overlay and chain
models, runs the engine, and turns what happened into metrics.

Verification strategy (what the simulator does and does not re-verify)
---------------------------------------------------------------------
* Every gossiped message is validated once, for real (`validate_offer`/`validate_withdrawal`
  with full ed25519 and wallet-binding checks), when it is published; the verdict decides
  whether honest relays forward it. Each relay's validation CPU is charged as a delay
  (`network.validate_ms`) instead of being recomputed per relay: the result is a pure function
  of the bytes.
* A renter's OfferBook is real: when the renter shops, `OfferBook.query` runs on a book in
  exactly the state its own book would have, the latest offer and withdrawal of every provider
  that had reached it (market.SharedBook: one shared book, ingested once per message, with the
  providers the renter is behind on swapped for its own messages, ingested for real). Inside the
  simulator the ed25519 checks of *offer* and *binding* signatures and the binding's ecrecover
  are memoised by their exact inputs (`MemoVerifier`, the `protocol.verifier.Verifier` passed
  to every validation and offer book): the first check of a given signature is real, later ones
  with the same bytes return the same (pure) answer. So is the decoding of an offer or
  withdrawal (the validation around it runs every time). Negotiation (a proposal's renter
  binding included), heartbeat, receipt and consent signatures are never memoised: each is made
  and checked for real by the machines, with the default verifier.
* The chain recovers every claim's receipt signature like the contract's ecrecover.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import Ignore, Reject, RemoteProtocolError
from protocol.eth import private_key_address
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.samples import REGIONS
from protocol.validation import BindingCache, validate_offer, validate_withdrawal

from .agents import Provider, RentalRecord, Renter, Spammer
from .chain import ARBITER, Chain, Tx
from .engine import EPOCH_MS, Engine, derive_seed, stream_rng
from .market import OFFER, GossipStore, SharedBook, ingest_message
from .metrics import Metrics, pct
from .network import INF, Network, Overlay
from .sigmemo import MemoVerifier

I32_NEVER = np.iinfo(np.int32).max


@dataclass
class GossipMsg:
    origin: int
    provider: bytes
    kind: str  # "offer" | "withdrawal"
    seq: int
    data: bytes
    published_ms: int
    expires_ms: int
    arrival: np.ndarray  # int32 ms since start, I32_NEVER = never (a row of the GossipStore)
    row: int = -1


class World:
    def __init__(self, cfg: dict, seed: int, progress: bool = False, check_books: bool = False,
                 flood_thread: bool = True) -> None:
        self.cfg = cfg
        # run each gossip flood's shortest-path pass on a second thread while the run goes on
        # (the pass releases the GIL); the results are the same either way
        self.flood_thread = flood_thread
        self._flood_pool: ThreadPoolExecutor | None = None
        self.check_books = check_books  # also build every renter's book from scratch and compare
        self.seed = seed
        self.progress = progress
        self.start_ms = EPOCH_MS
        self.engine = Engine(EPOCH_MS)
        self.params = Params(
            offer_max_lifetime_ms=max(2 * 3600_000, cfg["market"]["offer_lifetime_s"] * 1000))
        self.metrics = Metrics()
        self.log_lines: list[str] = []
        self.sigstats = {"ed25519_real": 0, "ed25519_memo": 0, "ecrecover_real": 0, "ecrecover_memo": 0,
                         "decode_real": 0, "decode_memo": 0}
        self.verifier = MemoVerifier(self.sigstats)
        self.records: dict[bytes, RentalRecord] = {}
        self.nodes: list[Any] = []
        self.online: list[bool] = []
        self.regions: list[int] = []
        self.key_to_node: dict[bytes, int] = {}
        self.relay_bindings = BindingCache(1_000_000)
        # the market's arbiter, named in offers by a fraction of providers (market.arbiter_frac)
        self.arbiter_wallet = private_key_address(derive_seed(seed, "arbiter").to_bytes(32, "big"))
        self.trusted_arbiters = frozenset({self.arbiter_wallet})
        self.series: list[dict] = []
        self.churn_events = {"leave": 0, "join": 0}
        self._wall0 = 0.0

    def node_rng(self, name: str):
        return stream_rng(self.seed, "node/" + name)

    def log(self, text: str) -> None:
        if len(self.log_lines) < self.cfg["run"]["log_max_lines"]:
            self.log_lines.append(f"{(self.engine.now - self.start_ms) / 1000:10.3f} {text}")

    # -- building ------------------------------------------------------------------------------

    def build(self) -> None:
        cfg = self.cfg
        rng = stream_rng(self.seed, "world")
        plan: list[tuple] = []
        p = cfg["providers"]
        n_prov = p["count"]
        n_off = round(n_prov * p["offline_frac"])
        n_mis = round(n_prov * p["misreport_frac"])
        n_stop = round(n_prov * p["stop_serving_frac"])
        profiles = ["offline"] * n_off + ["misreport"] * n_mis + ["stop_serving"] * n_stop
        profiles += ["honest"] * (n_prov - len(profiles))
        rng.shuffle(profiles)
        for i, prof in enumerate(profiles):
            plan.append(("provider", f"provider-{i}", prof, {}))
        r = cfg["renters"]
        n_stop_ack = round(r["count"] * r["stop_ack_frac"])
        rprof = ["stop_ack"] * n_stop_ack + ["honest"] * (r["count"] - n_stop_ack)
        rng.shuffle(rprof)
        for i, prof in enumerate(rprof):
            plan.append(("renter", f"renter-{i}", prof, {}))
        for i in range(cfg["spammers"]["count"]):
            plan.append(("spammer", f"spammer-{i}", "spam", {}))
        s = cfg["sybils"]
        for op in range(s["operators"]):
            plan.append(("sybil_op", f"sybil-{op}", "sybil", {"op": op}))
        self.n_planned = len(plan)
        self.ncfg_np = np.random.Generator(np.random.PCG64(derive_seed(self.seed, "network/np")))
        nodes_regions = [rng.randrange(len(REGIONS)) for _ in plan]
        # Sybil operators: one host (region, GPUs) shared by several identities.
        expanded: list[tuple] = []
        for (role, name, prof, extra), reg in zip(plan, nodes_regions):
            if role == "sybil_op":
                for k in range(s["identities"]):
                    expanded.append(("sybil", f"{name}/id-{k}", prof, extra, reg))
            else:
                expanded.append((role, name, prof, extra, reg))
        n = len(expanded)
        self.online = [False] * n
        self.online_np = np.zeros(n, dtype=bool)  # the same, for numpy
        self.online_sorted: list[int] = []  # indices of the online nodes, ascending
        self.regions = [e[4] for e in expanded]
        self.net = Network(cfg, self.engine, stream_rng(self.seed, "network"), self.regions, self.online, self.start_ms)
        self.overlay = Overlay(cfg, self.net, self.ncfg_np, stream_rng(self.seed, "overlay"), n)
        self.store = GossipStore(n)
        book = OfferBook(self.params, bindings=BindingCache(self.params.binding_cache_size),
                         verifier=self.verifier)
        self.shared_book = SharedBook(book, self.store, self.metrics.count)
        self.chain = Chain(cfg, self.engine, self.start_ms, self._chain_event)
        sybil_host: dict[int, tuple] = {}
        models = cfg["providers"]["models"]
        for idx, (role, name, prof, extra, reg) in enumerate(expanded):
            if role == "provider":
                a = Provider(self, idx, name, reg, prof, rng.choice(models))
            elif role == "renter":
                a = Renter(self, idx, name, reg, prof)
            elif role == "spammer":
                a = Spammer(self, idx, name, reg)
            else:
                op = extra["op"]
                if op not in sybil_host:
                    host = Provider(self, idx, name, reg, "sybil", rng.choice(models),
                                    price_frac=s["price_frac"], operator=op)
                    sybil_host[op] = (host.model, len(host.all_gpus), host)
                    a = host
                else:
                    model, count, host = sybil_host[op]
                    a = Provider(self, idx, name, reg, "sybil", model, gpu_count=count,
                                 price_frac=s["price_frac"], operator=op)
                    # the same physical GPUs under another identity
                    a.all_gpus = host.all_gpus
                    a.base = __import__("dataclasses").replace(a.base, gpus=host.all_gpus)
            self.nodes.append(a)
            if hasattr(a, "peer"):
                self.key_to_node[a.peer.public] = idx
        self.spammers = {a.idx for a in self.nodes if a.role == "spammer"}
        # schedule joins
        spread = cfg["run"]["join_spread_s"] * 1000
        dur = cfg["run"]["duration_s"] * 1000
        for a in self.nodes:
            late = a.role == "renter" and rng.random() < cfg["renters"]["late_join_frac"]
            t = self.start_ms + (rng.randint(spread, max(spread, int(dur * cfg["renters"]["request_window_frac"])))
                                 if late else rng.randint(0, spread))
            self.engine.at(t, self.join, a.idx, True)
            if a.role == "renter" and cfg["renters"]["rentals_each"] > 0:
                end = self.start_ms + int(dur * cfg["renters"]["request_window_frac"])
                self.engine.at(rng.randint(t, max(t, end)), a.request_due)
            if a.role in ("provider", "sybil"):
                self.engine.at(t + cfg["market"]["reannounce_s"] * 1000, a.reannounce)
            if a.role == "spammer":
                self.engine.at(t + 1000, a.tick)
            rate = cfg["churn"]["leave_per_hour"]
            if rate > 0 and a.role in ("provider", "renter"):
                leave_at = t + int(a.rng.expovariate(rate / 3600_000.0))
                if leave_at < self.start_ms + dur:
                    self.engine.at(leave_at, self.churn_leave, a.idx)
        hb = cfg["gossip"]["heartbeat_ms"]
        self.engine.at(self.start_ms + hb, self._heartbeat)
        self.engine.at(self.start_ms, self._sample)
        if self.progress:
            self.engine.at(self.start_ms, self._progress)

    # -- membership ----------------------------------------------------------------------------

    def join(self, idx: int, first: bool = False) -> None:
        if self.online[idx]:
            return
        a = self.nodes[idx]
        if getattr(a, "left_for_good", False):
            return
        self.online[idx] = True
        self.online_np[idx] = True
        bisect.insort(self.online_sorted, idx)
        self.overlay.join(idx, self.online_sorted)
        if not first:
            self.churn_events["join"] += 1
        self.log(f"join {a.name}")
        now = self.engine.now
        if a.role == "renter" and self.cfg["market"]["sync_on_join"]:
            self._sync(idx)
        if a.role == "renter" and now - self.start_ms >= self.cfg["run"]["warmup_s"] * 1000:
            self._track_new_renter(idx)
        a.go_online()

    def leave(self, idx: int, rejoin: bool = True) -> None:
        if not self.online[idx]:
            return
        a = self.nodes[idx]
        a.go_offline()
        self.online[idx] = False
        self.online_np[idx] = False
        del self.online_sorted[bisect.bisect_left(self.online_sorted, idx)]
        self.overlay.leave(idx)
        self.churn_events["leave"] += 1
        self.log(f"leave {a.name}")
        c = self.cfg["churn"]
        if rejoin and c["rejoin"]:
            self.engine.after(max(1, int(a.rng.expovariate(1.0 / max(1.0, c["downtime_mean_s"] * 1000)))),
                              self.join, idx)

    def churn_leave(self, idx: int) -> None:
        self.leave(idx)
        rate = self.cfg["churn"]["leave_per_hour"]
        a = self.nodes[idx]
        nxt = self.engine.now + int(a.rng.expovariate(rate / 3600_000.0))
        if nxt < self.start_ms + self.cfg["run"]["duration_s"] * 1000:
            self.engine.at(nxt, self.churn_leave, idx)

    def _heartbeat(self) -> None:
        self.overlay.heartbeat()
        self.engine.after(self.cfg["gossip"]["heartbeat_ms"], self._heartbeat)

    # -- gossip -------------------------------------------------------------------------------

    def gossip_publish(self, agent: Any, data: bytes, kind: str, seq: int, expires_ms: int) -> None:
        now = self.engine.now
        try:  # the relays' validation, run for real once on these bytes
            if kind == "offer":
                validate_offer(data, now, self.params, self.relay_bindings, verifier=self.verifier)
            else:
                validate_withdrawal(data, now, self.params, verifier=self.verifier)
            valid = True
        except RemoteProtocolError as exc:
            valid = False
            self.metrics.count("own_publish_invalid." + exc.code)
        if not valid:
            return
        forwards = self.online_np.copy()
        # the previous message's arrivals are written first: the overlay's links may change now
        self.store.settle()
        arrivals = self.overlay.flood_later(agent.idx, len(data), now, forwards, self._flood_pool)

        def arrival_row() -> np.ndarray:  # called when arrival times are next read
            arr = arrivals()
            self._propagation_metrics(agent.idx, now, forwards, arr)
            return np.where(arr >= INF, I32_NEVER, arr - self.start_ms).astype(np.int32)

        msg = GossipMsg(agent.idx, agent.peer.public, kind, seq, data, now, expires_ms, np.zeros(0, np.int32))
        msg.arrival = self.store.add(msg, agent.idx, arrival_row)
        self.shared_book.publish(msg, now)
        self.metrics.count("gossip_published." + kind)

    def _propagation_metrics(self, origin: int, now: int, forwards: np.ndarray, arr: np.ndarray) -> None:
        """Latency to each other node online at publish time, coverage, time to 99%."""
        others = forwards.copy()
        others[origin] = False
        n_online = int(others.sum())
        if n_online:
            got = others & (arr < INF)
            lat = (arr[got] - now)
            self.metrics.prop_coverage.append(float(got.sum()) / n_online)
            if len(lat):
                if len(lat) > 64:
                    lat = self.ncfg_np.choice(lat, 64, replace=False)
                self.metrics.prop_samples.extend(int(x) for x in lat)
                if got.sum() >= 0.99 * n_online:
                    k = int(math.ceil(0.99 * n_online)) - 1
                    self.metrics.prop_t99.append(int(np.partition(arr[got] - now, k)[k]))

    def gossip_invalid(self, agent: Any, data: bytes) -> None:
        now = self.engine.now
        self.metrics.invalid_published += 1
        try:
            validate_offer(data, now, self.params, self.relay_bindings, verifier=self.verifier)
            code = "accepted"
        except (Reject, Ignore) as exc:
            code = exc.code
        self.metrics.invalid_reasons[code] = self.metrics.invalid_reasons.get(code, 0) + 1
        hops = self.overlay.invalid_flood(agent.idx, self.spammers,
                                          lambda v: self.online[v] and v not in self.spammers)
        for h in hops:
            self.metrics.invalid_hops[h] = self.metrics.invalid_hops.get(h, 0) + 1

    def _view(self, idx: int, at_rel: int) -> list[GossipMsg]:
        """What has reached node idx by `at_rel`: the latest offer and latest withdrawal of
        every provider, in arrival order."""
        out = [self.store.msgs[r] for r in self.store.view(idx, at_rel).tolist()]
        out.sort(key=lambda m: (int(m.arrival[idx]), m.seq, m.provider))
        return out

    def fill_book(self, idx: int, book: Any) -> None:
        """The from-scratch book (the reference `query_book` is checked against)."""
        now = self.engine.now
        for m in self._view(idx, now - self.start_ms):
            refused = ingest_message(book, m, now)
            if refused is not None:
                self.metrics.count("check_book_ingest." + refused)

    def query_book(self, idx: int, q: str, limit: int) -> tuple[list, int]:
        """Run `q` on node idx's offer book now (market.SharedBook); returns (entries, size)."""
        now = self.engine.now
        got = self.shared_book.run_for(idx, now, now - self.start_ms,
                                       lambda book: (list(book.query(q, limit=limit)), len(book)))
        if self.check_books:
            ref = OfferBook(self.params, bindings=BindingCache(self.params.binding_cache_size),
                            verifier=self.verifier)
            self.fill_book(idx, ref)
            want = ([e.digest for e in ref.query(q, limit=limit)], len(ref))
            if ([e.digest for e in got[0]], got[1]) != want:
                raise AssertionError(f"shared book differs from node {idx}'s own book at {now}")
            self.metrics.count("check_book_ok")
        return got

    def _sync(self, idx: int) -> None:
        peers = sorted(v for v in self.overlay.conn[idx] if self.online[v])
        if not peers:
            return
        p = self.nodes[idx].rng.choice(peers)
        now_rel = self.engine.now - self.start_ms
        st = self.store
        rows = st.held_offers(p, now_rel, self.engine.now)  # node/offers.py sends book.snapshot()
        size = int(st.r_size[rows].sum()) + 64
        rtt = self.net.rtt[self.regions[idx], self.regions[p]]
        t = now_rel + int(rtt + size * 8 / self.net.bits_per_ms + 2 * self.cfg["network"]["per_message_cpu_ms"]) + 1
        if len(rows):
            st.set_min(rows, idx, t)
        self.metrics.count("sync_offers", len(rows))

    def _track_new_renter(self, idx: int) -> None:
        now = self.engine.now
        st = self.store
        np_ = len(st.providers)
        lat = st.latest[:np_]
        newest = lat.max(axis=1)  # newest alive row of each provider, either kind
        ok = newest >= 0
        safe = np.where(ok, newest, 0)
        ok &= (st.r_kind[safe] == OFFER) & (st.r_exp[safe] > now)
        ok &= self.online_np[np.array(st.p_node, dtype=np.int64)] if np_ else ok
        market = np.flatnonzero(ok)
        horizon = (self.cfg["market"]["reannounce_s"] + 120) * 1000
        self.engine.after(horizon, self._eval_new_renter, idx, now, market)

    def _eval_new_renter(self, idx: int, joined: int, market: np.ndarray) -> None:
        j = joined - self.start_ms
        if not len(market):
            self.metrics.new_renter_full_view_ms.append(0)
            return
        st = self.store
        rows = st.alive_rows()
        rows = rows[np.isin(st.r_pid[rows], market)]
        a = st.col(rows, idx).astype(np.int64)
        seen = np.full(len(st.providers), I32_NEVER, np.int64)
        keep = a >= 0
        np.minimum.at(seen, st.r_pid[rows][keep], a[keep])
        seen = seen[market]
        if (seen == I32_NEVER).any():
            self.metrics.new_renter_incomplete += 1
            return
        self.metrics.new_renter_full_view_ms.append(max(0, int((seen - j).max())))

    def _prune(self) -> None:
        now = self.engine.now
        keep_after = now - self.params.clock_skew_ms - (self.cfg["market"]["reannounce_s"] + 300) * 1000
        self.store.prune(keep_after)

    # -- chain --------------------------------------------------------------------------------

    def submit(self, agent: Any, call: Any, extra: dict | None = None) -> None:
        args = dict(call.args)
        if extra:
            args.update(extra)
        self.chain.submit(Tx(call.method, call.agreement_id, agent.idx, args))

    def _chain_event(self, node: int, event: str, aid: bytes, data: dict) -> None:
        if node == ARBITER:
            if event == "disputed":
                self.engine.after(self.cfg["market"]["arbitration_delay_s"] * 1000, self._arbitrate, aid)
            return
        a = self.nodes[node]
        if not self.online[node]:
            # events are durable: a node reads them from the chain when it is back
            if not getattr(a, "left_for_good", False):
                self.engine.after(5000, self._chain_event, node, event, aid, data)
            return
        a.on_chain(event, aid, data)

    def _arbitrate(self, aid: bytes) -> None:
        """The arbiter's ruling: the provider gets the price of the service it delivered (none
        from a provider that misreported its GPUs), as its evidence would show (heartbeat log,
        GPU attestation); it does not see GPUs that Sybil identities share."""
        rec = self.records[aid]
        terms = self.chain.escrows[aid].terms
        delivered_s = 0 if rec.provider_profile == "misreport" else rec.served_ms // 1000
        amount = min(terms.deposit, terms.price_per_second * delivered_s)
        self.chain.submit(Tx("arbitrate", aid, ARBITER, {"provider_amount": amount}))

    # -- sampling and progress ----------------------------------------------------------------

    def _sample(self) -> None:
        now = self.engine.now
        provs = [a for a in self.nodes if a.role in ("provider", "sybil")]
        online_gpus = sum(len(a.all_gpus) for a in provs if self.online[a.idx])
        busy = sum(len(r.gpus) for r in self.records.values() if r.serve_start_ms >= 0)
        active = sum(1 for e in self.chain.escrows.values() if e.model.state != "final")
        self.series.append({
            "t_s": (now - self.start_ms) // 1000,
            "online_nodes": sum(self.online),
            "online_providers": sum(1 for a in provs if self.online[a.idx]),
            "open_escrows": active,
            "gpus_serving": busy,
            "gpus_online": online_gpus,
            "utilisation": round(busy / online_gpus, 4) if online_gpus else 0.0,
            "escrow_locked": self.chain.locked(),
        })
        self._prune()
        self.engine.after(self.cfg["run"]["sample_every_s"] * 1000, self._sample)

    def _progress(self) -> None:
        now = self.engine.now
        dur = self.cfg["run"]["duration_s"]
        t = (now - self.start_ms) // 1000
        print(f"[sim] t={t:>6}s/{dur}s ({100 * t / dur:5.1f}%) events={self.engine.events:>9} "
              f"rentals={len(self.records):>5} online={sum(self.online):>6} "
              f"wall={time.perf_counter() - self._wall0:7.1f}s", file=sys.stderr, flush=True)
        self.engine.after(self.cfg["run"]["progress_every_s"] * 1000, self._progress)

    # -- running -------------------------------------------------------------------------------

    def run(self) -> dict:
        self._wall0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.flood_thread:
                self._flood_pool = stack.enter_context(ThreadPoolExecutor(1, "flood"))
            self.build()
            self.engine.run(self.start_ms + self.cfg["run"]["duration_s"] * 1000)
            self.store.settle()
            self._finish_serving()
            return self.summarise()

    def _finish_serving(self) -> None:
        now = self.engine.now
        for a in self.nodes:
            if a.role in ("provider", "sybil"):
                for rec in a.records.values():
                    a._serve_stop(rec, now)

    # -- results ------------------------------------------------------------------------------

    def delivered_ms(self) -> dict[bytes, float]:
        """Ground truth: ms of the agreed GPUs actually given to the renter. Misreporting
        providers deliver none; Sybil identities sharing GPUs split them among overlapping
        rentals."""
        out: dict[bytes, float] = {}
        by_op: dict[int, list[RentalRecord]] = {}
        for aid, rec in self.records.items():
            prov = self.nodes[rec.provider]
            if rec.provider_profile == "misreport":
                out[aid] = 0.0
            elif prov.operator is not None:
                by_op.setdefault(prov.operator, []).append(rec)
            else:
                out[aid] = float(rec.served_ms)
        for recs in by_op.values():
            points = sorted({t for r in recs for iv in r.intervals for t in iv})
            for r in recs:
                out[r.agreement_id] = 0.0
            for a, b in zip(points, points[1:]):
                active = [r for r in recs if any(s <= a and b <= e for s, e in r.intervals)]
                for r in active:
                    # GPUs shared: each overlapping rental of the same GPUs gets 1/k of them
                    k = sum(1 for o in active if set(o.gpus) & set(r.gpus))
                    out[r.agreement_id] += (b - a) / k
        return out

    def summarise(self) -> dict:
        m = self.metrics
        cfg = self.cfg
        delivered = self.delivered_ms()
        gas_usd_per_gas = cfg["chain"]["gas_price_gwei"] * 1e-9 * cfg["chain"]["eth_usd"]
        money = {"renter_loss_to_faulty_providers": 0, "provider_loss_to_faulty_renters": 0,
                 "honest_pair_provider_shortfall": 0, "honest_pair_renter_overpay": 0,
                 "paid_to_providers": 0, "refunded_to_renters": 0}
        by_profile: dict[str, dict[str, int]] = {}
        rows = []
        for aid, rec in sorted(self.records.items(), key=lambda kv: (kv[1].requested_ms, kv[0])):
            if rec.opened_s < 0:
                continue
            settled = rec.settled_s >= 0
            value_delivered = rec.price_per_second * delivered.get(aid, 0.0) / 1000.0
            value_served = rec.price_per_second * rec.served_ms / 1000.0
            overpay = max(0.0, rec.paid_provider - value_delivered)
            shortfall = max(0.0, value_served - rec.paid_provider) if rec.provider_profile == "honest" else 0.0
            money["paid_to_providers"] += rec.paid_provider
            money["refunded_to_renters"] += rec.refund_renter
            # losses only for settled agreements: an open escrow's outcome is not known yet
            if settled and rec.renter_profile == "honest" and rec.provider_profile != "honest":
                money["renter_loss_to_faulty_providers"] += overpay
            if settled and rec.provider_profile == "honest" and rec.renter_profile != "honest":
                money["provider_loss_to_faulty_renters"] += shortfall
            if settled and rec.provider_profile == "honest" and rec.renter_profile == "honest":
                money["honest_pair_provider_shortfall"] += shortfall
                money["honest_pair_renter_overpay"] += overpay
            key = f"{rec.provider_profile}->{rec.renter_profile}"
            d = by_profile.setdefault(key, {"rentals": 0, "deposit": 0, "paid_provider": 0,
                                            "refund_renter": 0, "value_delivered": 0, "unsettled": 0})
            d["rentals"] += 1
            d["deposit"] += rec.deposit
            d["paid_provider"] += rec.paid_provider
            d["refund_renter"] += rec.refund_renter
            d["value_delivered"] += round(value_delivered)
            d["unsettled"] += rec.settled_s < 0
            rows.append({
                "agreement": aid.hex()[:16], "provider_profile": rec.provider_profile,
                "renter_profile": rec.renter_profile, "model": rec.model, "gpus": len(rec.gpus),
                "price_per_gpu_hour_usd": round(rec.price_per_second / len(rec.gpus) * 3600 / 1e6, 6),
                "max_seconds": rec.max_seconds, "deposit": rec.deposit,
                "time_to_rent_ms": (rec.opened_s * 1000 - rec.requested_ms),
                "served_s": round(rec.served_ms / 1000, 3),
                "delivered_s": round(delivered.get(aid, 0.0) / 1000, 3),
                "paid_provider": rec.paid_provider, "refund_renter": rec.refund_renter,
                "settled": rec.settled_s >= 0,
            })
        money = {k: int(round(v)) for k, v in money.items()}
        money_usd = {k + "_usd": round(v / 1e6, 6) for k, v in money.items()}
        # price dispersion per model (agreed prices)
        disp = {}
        for model in sorted({r["model"] for r in rows}):
            ps = [r["price_per_gpu_hour_usd"] for r in rows if r["model"] == model]
            mean = sum(ps) / len(ps)
            sd = (sum((p - mean) ** 2 for p in ps) / len(ps)) ** 0.5
            disp[model] = {"n": len(ps), "mean_usd_h": round(mean, 4), "cv": round(sd / mean, 4) if mean else 0,
                           "min": round(min(ps), 4), "max": round(max(ps), 4)}
        offered = {}
        for a in self.nodes:
            if a.role in ("provider", "sybil"):
                offered.setdefault(a.model, []).append(a.price * 3600 / 1e6)
        for model, ps in sorted(offered.items()):
            mean = sum(ps) / len(ps)
            sd = (sum((p - mean) ** 2 for p in ps) / len(ps)) ** 0.5
            disp.setdefault(model, {})["offered_cv"] = round(sd / mean, 4)
            disp[model]["offered_mean_usd_h"] = round(mean, 4)
        util = [s["utilisation"] for s in self.series]
        st = self.chain.stats
        opened = sum(1 for r in rows)
        escrow_in = st.deposited
        escrow_out = st.paid_provider + st.paid_renter
        summary = {
            "scenario": cfg["run"]["name"], "seed": self.seed,
            "nodes": len(self.nodes), "simulated_s": cfg["run"]["duration_s"],
            "events": self.engine.events,
            "propagation_ms": {**pct(m.prop_samples), "floods": len(m.prop_coverage),
                               "mean_coverage": round(float(np.mean(m.prop_coverage)), 5) if m.prop_coverage else None,
                               "t99_coverage_ms": pct(m.prop_t99)},
            "new_renter_full_view_ms": {**pct(m.new_renter_full_view_ms), "n": len(m.new_renter_full_view_ms),
                                        "incomplete": m.new_renter_incomplete},
            "requests": m.requests, "rentals_opened": opened,
            "match_rate": round(opened / m.requests, 4) if m.requests else None,
            "gave_up": m.gave_up,
            "time_to_rent_ms": pct(m.time_to_rent_ms),
            "negotiation_failures": {k: dict(sorted(v.items())) for k, v in m.neg_fail.items()},
            "heartbeat_rejects": dict(sorted(m.hb_rejects.items())),
            "receipt_rejects": dict(sorted(m.receipt_rejects.items())),
            "utilisation": {"mean": round(float(np.mean(util)), 4) if util else 0.0,
                            "max": round(max(util), 4) if util else 0.0},
            "price_dispersion": disp,
            "money_units": money, "money_usd": money_usd,
            "by_profile": dict(sorted(by_profile.items())),
            "escrow": {"deposited": escrow_in, "paid_out": escrow_out, "locked": self.chain.locked(),
                       "conserved": escrow_in == escrow_out + self.chain.locked(),
                       "txs": dict(sorted(st.txs.items())), "reverts": dict(sorted(st.reverts.items())),
                       "gas": dict(sorted(st.gas.items())),
                       "gas_usd": round(sum(st.gas.values()) * gas_usd_per_gas, 6), "blocks": self.chain.blocks},
            "disputes": {
                "claims_with_arbiter": st.claims_with_arbiter, "finalized": st.finalized,
                "disputed_by": dict(sorted(st.disputes.items())), "verdicts": len(st.verdicts),
                "verdict_claimed_units": sum(c for c, _ in st.verdicts),
                "verdict_awarded_units": sum(a for _, a in st.verdicts),
                "verdicts_above_claim": sum(1 for c, a in st.verdicts if a > c),
                "verdicts_below_claim": sum(1 for c, a in st.verdicts if a < c)},
            "invalid_messages": {"published": m.invalid_published, "reasons": dict(sorted(m.invalid_reasons.items())),
                                 "dropped": sum(m.invalid_hops.values()),
                                 "hops_at_drop": {str(k): v for k, v in sorted(m.invalid_hops.items())},
                                 "graylisted_links": sum(len(g) for g in self.overlay.graylist)},
            "network": {"direct_sent": self.net.sent, "direct_dropped": self.net.dropped,
                        "direct_bytes": self.net.bytes, "grafts": self.overlay.grafts, "prunes": self.overlay.prunes},
            "churn": dict(self.churn_events),
            "signatures": dict(self.sigstats),
            "counts": dict(sorted(m.counts.items())),
            "book_size": pct(m.book_sizes),
        }
        return {"summary": summary, "rentals": rows, "series": self.series,
                "propagation": sorted(m.prop_samples), "new_renter": sorted(m.new_renter_full_view_ms)}
