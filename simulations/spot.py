"""Power-aware providers and interruptible rentals: an economic simulation (issue 18).

    PYTHONPATH=. python -m simulations.spot simulations/scenarios/spot_power.toml --seed 1 --out results/spot
    PYTHONPATH=. python -m simulations.spot plot results/spot

Providers own GPUs in regions with a real-time power price (a CSV per region, or the synthetic
generator below). Renters bring jobs: on-demand jobs that must not be interrupted, and
checkpointing jobs that can run on interruptible GPUs. Four provider policies run on the same
prices and the same jobs (named random streams, one seed):

| policy | interruptible sales | curtailment |
|---|---|---|
| `on_demand` | no | no: runs through every price spike |
| `curtail_idle` | no | stops only idle GPUs above the threshold (rented ones cannot be stopped) |
| `spot_no_curtail` | yes | no |
| `spot_curtail` | yes | preempts interruptible rentals with notice above the threshold |

What is modelled, not run: the rental stream. Settlement uses the protocol's rule as proven in
tests/test_preemption.py: a preempted rental pays exactly the seconds served until the notice's
stop (`protocol.settlement.claim_payout`), the rest of the deposit goes back. A job preempted with
at least `checkpoint_save_s` of notice checkpoints and loses nothing but `restart_overhead_s`; a
notice violation (the provider stops early, probability `notice_violation_prob`) loses the work
since the job's last periodic checkpoint. Same scenario + seed -> byte-identical outputs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.agreement import AgreementTerms
from protocol.settlement import claim_payout

from .engine import EPOCH_MS, Engine, stream_rng

POLICIES = ("on_demand", "curtail_idle", "spot_no_curtail", "spot_curtail")
HOUR_S = 3600

# Scenario schema: section -> key -> (type, default, unit, description)
SCHEMA: dict[str, dict[str, tuple[type, Any, str, str]]] = {
    "run": {
        "name": (str, "spot", "-", "label written into the results"),
        "days": (float, 14.0, "days", "simulated time"),
        "price_step_s": (int, 300, "s", "interval of the real-time price (and of the curtailment rule's checks)"),
    },
    "power": {
        "regions": (list, ["texas_a", "texas_b"], "-", "regions, each with its own price series"),
        "csv_dir": (str, "", "path", "if set: <csv_dir>/<region>.csv (timestamp,price_per_mwh) replaces the generator"),
        # Defaults: fitted to ERCOT's 2017 real-time prices (ERCOT_2017 below, and
        # simulations/scenarios/spot_power.md "Power prices"); the daily shape and the noise
        # are not fitted (no published figure found for them).
        "base_per_mwh": (float, 25.09, "USD/MWh", "synthetic: scale of the ordinary (non-spike) price"),
        "daily_amplitude": (float, 0.35, "fraction", "synthetic: daily swing of the log-price (peak at peak_hour)"),
        "peak_hour": (float, 17.0, "h", "synthetic: hour of the daily peak"),
        "noise_sigma": (float, 0.15, "log", "synthetic: AR(1) noise of the log-price per step"),
        "noise_phi": (float, 0.9, "-", "synthetic: AR(1) persistence per step"),
        "spikes_per_day": (float, 0.0474, "1/day", "synthetic: rate of scarcity spikes"),
        "spike_mean_min": (float, 30.0, "min", "synthetic: mean spike length (exponential)"),
        "spike_min_per_mwh": (float, 300.0, "USD/MWh", "synthetic: spike height, log-uniform from"),
        "spike_max_per_mwh": (float, 3000.0, "USD/MWh", "synthetic: ... to (a price cap)"),
        "negative_per_day": (float, 0.0986, "1/day", "synthetic: rate of surplus hours with negative prices"),
    },
    "providers": {
        "per_region": (int, 5, "providers", "providers in each region"),
        "gpus": (int, 8, "GPUs", "GPUs per provider"),
        "interruptible_frac": (float, 0.5, "fraction", "share of GPUs sold as interruptible (spot policies)"),
        "on_demand_per_gpu_hour": (float, 0.45, "USD/GPU-h", "on-demand price"),
        "spot_per_gpu_hour": (float, 0.30, "USD/GPU-h", "interruptible price"),
        "kw_busy": (float, 0.55, "kW/GPU", "power drawn by a rented GPU, cooling and host share included"),
        "kw_idle": (float, 0.08, "kW/GPU", "power drawn by an idle GPU that is kept online"),
        "curtail_above_per_mwh": (float, 400.0, "USD/MWh", "curtailment rule: stop above"),
        "resume_below_per_mwh": (float, 200.0, "USD/MWh", "curtailment rule: resume below"),
        "notice_s": (int, 120, "s", "notice promised before a preemption"),
        "notice_violation_prob": (float, 0.02, "probability", "a preemption stops without the promised notice"),
    },
    "renters": {
        "on_demand_jobs_per_hour": (float, 8.0, "1/h", "arrivals of jobs that need on-demand GPUs"),
        "spot_jobs_per_hour": (float, 8.0, "1/h", "arrivals of checkpointing jobs (take interruptible GPUs when offered)"),
        "work_hours_median": (float, 6.0, "GPU-h", "job length, lognormal median"),
        "work_hours_sigma": (float, 0.8, "log", "job length, lognormal sigma"),
        "checkpoint_every_s": (int, 1800, "s", "periodic checkpoint interval of a checkpointing job"),
        "checkpoint_save_s": (int, 60, "s", "time to save a checkpoint on a notice"),
        "restart_overhead_s": (int, 300, "s", "work redone after a restart from a checkpoint"),
        "patience_h": (float, 24.0, "h", "a job still queued after this gives up"),
        "checkpointing_pays_on_demand": (bool, False, "-", "a checkpointing job rents on-demand GPUs too (else its budget is the interruptible price: without interruptible sales it goes elsewhere)"),
    },
}


class SpotScenarioError(ValueError):
    """The scenario file is not valid against SCHEMA."""


def resolve(doc: dict) -> dict:
    out: dict[str, dict] = {}
    for section, keys in SCHEMA.items():
        given = dict(doc.get(section, {}))
        for key in given:
            if key not in keys:
                raise SpotScenarioError(f"[{section}] {key}: unknown key (known: {', '.join(keys)})")
        out[section] = {}
        for key, (typ, default, unit, desc) in keys.items():
            value = given.get(key, default)
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
                raise SpotScenarioError(f"[{section}] {key}: expected {typ.__name__} ({unit}): {desc}")
            if typ in (int, float) and not isinstance(value, bool) and value < 0:
                raise SpotScenarioError(f"[{section}] {key}: must not be negative ({desc})")
            out[section][key] = value
    for section in doc:
        if section not in SCHEMA:
            raise SpotScenarioError(f"[{section}]: unknown section")
    p = out["providers"]
    if not p["resume_below_per_mwh"] < p["curtail_above_per_mwh"]:
        raise SpotScenarioError("[providers] resume_below_per_mwh must be below curtail_above_per_mwh")
    if not p["spot_per_gpu_hour"] < p["on_demand_per_gpu_hour"]:
        raise SpotScenarioError("[providers] spot_per_gpu_hour must be below on_demand_per_gpu_hour")
    return out


# ---------------------------------------------------------------------------------------------
# Prices


# Published summary statistics of ERCOT's real-time energy prices in 2017, the targets of the
# generator's defaults. Sources: Potomac Economics, "2017 State of the Market Report for the
# ERCOT Electricity Markets" (Independent Market Monitor, May 2018), as summarised by the Texas
# Coalition for Affordable Power (tcaptx.com, "ERCOT power prices, congestion costs increase
# in 2017") and RTO Insider ("ERCOT Briefs: Week of June 5, 2018"): load-weighted average
# real-time price 28.25 USD/MWh; prices never above 3,000 USD/MWh; above 1,000 USD/MWh for 3.5
# hours in the year. System-wide negative prices: 36 hours in 2017 (0.4% of the year), the IMM's
# count as quoted in "Negative Pricing is Not a Problem in the ERCOT Market" (docslib.org).
# Not found published: the median and the daily shape; the generator's are not fitted.
ERCOT_2017 = {"mean": 28.25, "hours_above_1000": 3.5, "max_below": 3000.0, "hours_negative": 36.0}


def expected_price_stats(cfg: dict, spike_above: float = 1000.0) -> dict:
    """The generator's long-run statistics from its parameters (per-step rounding of lengths
    and the rare overlap of a spike with a high ordinary price left out): how the defaults were
    fitted to ERCOT_2017. The ordinary price is lognormal: its mean is base * E[exp(AR(1))] *
    E[exp(daily cosine)] (the latter the Bessel function I0(amplitude)); a spike lasts
    spike_mean_min on average at height h * u, h log-uniform on [min, max], u uniform on
    [0.7, 1]; a surplus period lasts one hour at -uniform(0, 20)."""
    var = cfg["noise_sigma"] ** 2 / (1 - cfg["noise_phi"] ** 2)
    a = cfg["daily_amplitude"]
    i0 = sum((a / 2) ** (2 * k) / math.factorial(k) ** 2 for k in range(12))
    ordinary = cfg["base_per_mwh"] * math.exp(var / 2) * i0
    lo, hi = cfg["spike_min_per_mwh"], cfg["spike_max_per_mwh"]
    spike_mean = (hi - lo) / math.log(hi / lo) * 0.85
    spike_frac = cfg["spikes_per_day"] * cfg["spike_mean_min"] / 1440
    neg_frac = cfg["negative_per_day"] / 24
    # P(h * u > x) for h log-uniform on [lo, hi], u uniform on [0.7, 1] (by quadrature over u)
    n = 1000
    p_above = sum(min(1.0, max(0.0, math.log(hi / max(lo, spike_above / u)) / math.log(hi / lo)))
                  for u in (0.7 + 0.3 * (i + 0.5) / n for i in range(n))) / n
    return {"mean": ordinary * (1 - spike_frac - neg_frac) + spike_frac * spike_mean - neg_frac * 10,
            "hours_above_per_year": spike_frac * p_above * 8760,
            "hours_negative_per_year": neg_frac * 8760, "max": hi}


def synthetic_prices(cfg: dict, region: str, seed: int, steps: int, step_s: int) -> list[float]:
    """A real-time price series in USD/MWh, one value per step: a daily shape on the log-price,
    AR(1) noise, Poisson scarcity spikes (log-uniform height up to a cap, exponential length)
    and Poisson surplus periods with negative prices. The defaults are fitted to ERCOT's 2017
    real-time prices (ERCOT_2017: mean, hours above 1,000 USD/MWh, maximum, hours below zero);
    a CSV per region replaces the generator with recorded data."""
    rng = stream_rng(seed, f"power/{region}")
    per_day = 86400 / step_s
    base = math.log(cfg["base_per_mwh"])
    noise = 0.0
    spike_left = neg_left = 0
    spike_height = 0.0
    out = []
    for k in range(steps):
        hour = (k * step_s / 3600) % 24
        shape = cfg["daily_amplitude"] * math.cos(2 * math.pi * (hour - cfg["peak_hour"]) / 24)
        noise = cfg["noise_phi"] * noise + rng.gauss(0, cfg["noise_sigma"])
        price = math.exp(base + shape + noise)
        if spike_left == 0 and rng.random() < cfg["spikes_per_day"] / per_day:
            spike_left = max(1, round(rng.expovariate(1 / (cfg["spike_mean_min"] * 60)) / step_s))
            lo, hi = math.log(cfg["spike_min_per_mwh"]), math.log(cfg["spike_max_per_mwh"])
            spike_height = math.exp(rng.uniform(lo, hi))
        if neg_left == 0 and rng.random() < cfg["negative_per_day"] / per_day:
            neg_left = max(1, round(3600 / step_s))
        if spike_left:
            price, spike_left = max(price, spike_height * rng.uniform(0.7, 1.0)), spike_left - 1
        elif neg_left:
            price, neg_left = -rng.uniform(0, 20), neg_left - 1
        out.append(round(price, 2))
    return out


def price_stats(prices: list[float], step_s: int, spike_above: float = 1000.0) -> dict:
    """Summary statistics of a price series in the terms market monitors publish them: the
    time-average and median price, the share of time above `spike_above` and below zero, the
    hours per year that share makes, the maximum, and the mean price by hour of day."""
    n = len(prices)
    ordered = sorted(prices)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    above = sum(1 for p in prices if p > spike_above) / n
    negative = sum(1 for p in prices if p < 0) / n
    by_hour: list[list[float]] = [[] for _ in range(24)]
    for k, p in enumerate(prices):
        by_hour[int(k * step_s // 3600) % 24].append(p)
    return {"mean": sum(prices) / n, "median": median, "max": ordered[-1], "min": ordered[0],
            "share_above": above, "hours_above_per_year": above * 8760,
            "share_negative": negative, "hours_negative_per_year": negative * 8760,
            "hourly_mean": [sum(h) / len(h) if h else None for h in by_hour]}


def csv_prices(path: Path, steps: int, step_s: int, start_s: float) -> list[float]:
    """Step prices from a CSV (timestamp unix seconds or ISO 8601, price_per_mwh): the price in
    force at each step; the series is repeated if shorter than the run."""
    rows = list(csv.DictReader(line for line in path.read_text().splitlines()
                               if line.strip() and not line.startswith("#")))
    if not rows or "timestamp" not in rows[0] or "price_per_mwh" not in rows[0]:
        raise SpotScenarioError(f"{path}: needs timestamp and price_per_mwh columns")
    from datetime import datetime

    def ts(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()

    pts = sorted((ts(r["timestamp"]), float(r["price_per_mwh"])) for r in rows)
    t0, span = pts[0][0], max(pts[-1][0] - pts[0][0] + step_s, step_s)
    out, j = [], 0
    for k in range(steps):
        t = t0 + (k * step_s) % span
        while j + 1 < len(pts) and pts[j + 1][0] <= t:
            j += 1
        if pts[j][0] > t:
            j = 0
        out.append(pts[j][1])
        if (k + 1) * step_s % span == 0:
            j = 0
    return out


# ---------------------------------------------------------------------------------------------
# The market


@dataclass
class Gpu:
    provider: int
    region: str
    spot: bool  # sold as interruptible (spot policies)
    job: "Job | None" = None
    rental_start_s: float = 0.0
    offline: bool = False  # curtailed (off, drawing nothing)
    rental: int = 0  # counts rentals on this GPU: events of an earlier rental are stale


@dataclass
class Job:
    id: int
    kind: str  # "on_demand" or "spot"
    work_s: float  # remaining work
    arrived_s: float
    saved_s: float = 0.0  # work done since the last checkpoint is lost on an unannounced stop
    last_checkpoint_s: float = 0.0
    done_s: float | None = None
    cost: int = 0  # micro-USD paid
    lost_s: float = 0.0
    preemptions: int = 0
    gave_up: bool = False
    queued_since: float = 0.0


@dataclass
class Stats:
    income: int = 0  # micro-USD
    power_cost: float = 0.0  # USD
    busy_gpu_s: float = 0.0
    preemptions: int = 0
    violations: int = 0
    curtailed_gpu_s: float = 0.0
    rentals: list = field(default_factory=list)


MICRO = 10**6  # prices are carried in micro-USD per GPU-second x 3600 to stay integers


class Market:
    def __init__(self, cfg: dict, policy: str, seed: int, prices: dict[str, list[float]]) -> None:
        self.cfg, self.policy, self.seed, self.prices = cfg, policy, seed, prices
        self.step_s = cfg["run"]["price_step_s"]
        self.engine = Engine(EPOCH_MS)
        p = cfg["providers"]
        self.sells_spot = policy in ("spot_no_curtail", "spot_curtail")
        self.gpus: list[Gpu] = []
        n_spot = round(p["gpus"] * p["interruptible_frac"]) if self.sells_spot else 0
        pid = 0
        for region in cfg["power"]["regions"]:
            for _ in range(p["per_region"]):
                for g in range(p["gpus"]):
                    self.gpus.append(Gpu(pid, region, spot=g >= p["gpus"] - n_spot))
                pid += 1
        self.n_providers = pid
        # prices per GPU-second in micro-USD (rounded down: whole units per second, as a node does)
        self.od_price = int(p["on_demand_per_gpu_hour"] * MICRO) // HOUR_S
        self.spot_price = int(p["spot_per_gpu_hour"] * MICRO) // HOUR_S
        self.curtailed = {r: False for r in cfg["power"]["regions"]}
        self.queue: list[Job] = []
        self.jobs: list[Job] = []
        self.stats = Stats()
        self.rng_jobs = stream_rng(seed, "renters/jobs")
        self.rng_faults = stream_rng(seed, "providers/faults")
        self.timeline: list[tuple[float, str, int]] = []  # (t, region, curtailed GPUs)
        self.last_power_s = 0.0

    def now_s(self) -> float:
        return (self.engine.now - EPOCH_MS) / 1000

    # -- power ---------------------------------------------------------------------------------

    def price_now(self, region: str) -> float:
        k = min(int(self.now_s() // self.step_s), len(self.prices[region]) - 1)
        return self.prices[region][k]

    def account_power(self) -> None:
        """Power cost since the last call, at the price in force (called at every step and
        before any change of a GPU's state)."""
        now = self.now_s()
        dt = now - self.last_power_s
        if dt <= 0:
            return
        p = self.cfg["providers"]
        k = min(int(self.last_power_s // self.step_s), len(self.prices[self.gpus[0].region]) - 1)
        for g in self.gpus:
            if g.offline:
                self.stats.curtailed_gpu_s += dt
                continue
            kw = p["kw_busy"] if g.job is not None else p["kw_idle"]
            self.stats.power_cost += kw * dt / HOUR_S * self.prices[g.region][k] / 1000
        self.last_power_s = now

    def on_price_step(self) -> None:
        self.account_power()
        p = self.cfg["providers"]
        for region in self.cfg["power"]["regions"]:
            price = self.price_now(region)
            if self.policy in ("curtail_idle", "spot_curtail"):
                if not self.curtailed[region] and price > p["curtail_above_per_mwh"]:
                    self.curtailed[region] = True
                    self.curtail(region)
                elif self.curtailed[region] and price < p["resume_below_per_mwh"]:
                    self.curtailed[region] = False
                    for g in self.gpus:
                        if g.region == region:
                            g.offline = False
                    self.match()
            n = sum(1 for g in self.gpus if g.region == region and g.offline)
            self.timeline.append((int(self.now_s()), region, n))
        self.engine.after(self.step_s * 1000, self.on_price_step)

    def curtail(self, region: str) -> None:
        p = self.cfg["providers"]
        for g in self.gpus:
            if g.region != region:
                continue
            if g.job is None:
                g.offline = True  # idle: switch off now
            elif self.policy == "spot_curtail" and g.spot:
                violated = self.rng_faults.random() < p["notice_violation_prob"]
                stop = 0 if violated else p["notice_s"]
                self.stats.preemptions += 1
                self.stats.violations += violated
                self.engine.after(stop * 1000, self.preempt, g, g.rental, violated)

    # -- jobs ----------------------------------------------------------------------------------

    def arrive(self, kind: str) -> None:
        r = self.cfg["renters"]
        rate = r[f"{kind}_jobs_per_hour"]
        work = math.exp(math.log(r["work_hours_median"]) + self.rng_jobs.gauss(0, r["work_hours_sigma"])) * HOUR_S
        job = Job(len(self.jobs), kind, round(work), self.now_s(), queued_since=self.now_s())
        self.jobs.append(job)
        self.queue.append(job)
        self.match()
        self.engine.after(max(1, round(self.rng_jobs.expovariate(rate / HOUR_S) * 1000)), self.arrive, kind)

    def match(self) -> None:
        """First come, first served: an on-demand job takes an on-demand GPU; a checkpointing
        job the cheaper interruptible one, else (if it pays on-demand prices) an on-demand one.
        A job waiting longer than its patience gives up."""
        self.account_power()
        free_od = [g for g in self.gpus if g.job is None and not g.offline and not g.spot]
        free_spot = [g for g in self.gpus if g.job is None and not g.offline and g.spot]
        free_od.reverse()
        free_spot.reverse()  # pop() takes the lowest provider first
        pays_od = self.cfg["renters"]["checkpointing_pays_on_demand"]
        waiting = []
        for job in self.queue:
            if self.now_s() - job.queued_since > self.cfg["renters"]["patience_h"] * HOUR_S:
                job.gave_up = True
                continue
            if job.kind == "on_demand":
                pool = free_od
            else:
                pool = free_spot if free_spot or not pays_od else free_od
            if not pool:
                waiting.append(job)
                continue
            self.start(pool.pop(), job)
        self.queue = waiting

    def start(self, g: Gpu, job: Job) -> None:
        g.job, g.rental_start_s = job, self.now_s()
        g.rental += 1
        job.last_checkpoint_s = self.now_s()
        self.engine.after(round(job.work_s * 1000), self.finish, g, g.rental)

    def _settle(self, g: Gpu, job: Job, served_s: int) -> None:
        price = self.spot_price if g.spot else self.od_price
        # The agreement bought job.work_s seconds; the claim pays the served seconds exactly.
        max_s = max(1, round(job.work_s))
        terms = AgreementTerms(b"\x01" * 20, b"\x02" * 20, b"\x00" * 20, max(price, 1), max_s, 30,
                               300, b"\x00" * 20, 0, b"\x00" * 32, 1)
        payout = claim_payout(terms, min(served_s, max_s))
        self.stats.income += payout.provider
        self.stats.busy_gpu_s += served_s
        job.cost += payout.provider
        self.stats.rentals.append((self.policy, job.id, job.kind, g.spot, served_s, payout.provider, payout.renter))

    def finish(self, g: Gpu, rental: int) -> None:
        if g.rental != rental or g.job is None:
            return  # preempted before
        job = g.job
        self.account_power()
        served = round(self.now_s() - g.rental_start_s)
        self._settle(g, job, served)
        job.work_s = 0
        job.done_s = self.now_s()
        g.job = None
        if self.curtailed[g.region] and self.policy in ("curtail_idle", "spot_curtail"):
            g.offline = True
        self.match()

    def preempt(self, g: Gpu, rental: int, violated: bool) -> None:
        if g.rental != rental or g.job is None:
            return  # finished first
        job = g.job
        self.account_power()
        r = self.cfg["renters"]
        served = round(self.now_s() - g.rental_start_s)
        self._settle(g, job, served)
        if violated or self.cfg["providers"]["notice_s"] < r["checkpoint_save_s"]:
            # no time to checkpoint: back to the last periodic one
            since = (self.now_s() - job.last_checkpoint_s) % r["checkpoint_every_s"]
            lost = since + r["restart_overhead_s"]
        else:  # checkpointed on the notice (the save itself is paid, not useful work)
            lost = r["checkpoint_save_s"] + r["restart_overhead_s"]
        lost = min(lost, served)
        job.lost_s += lost
        job.work_s = job.work_s - served + lost
        job.preemptions += 1
        job.queued_since = self.now_s()
        g.job = None
        g.offline = self.curtailed[g.region]
        self.queue.append(job)
        self.match()

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> dict:
        horizon_s = int(self.cfg["run"]["days"] * 86400)
        self.engine.at(EPOCH_MS, self.on_price_step)
        for kind in ("on_demand", "spot"):
            if self.cfg["renters"][f"{kind}_jobs_per_hour"] > 0:
                self.engine.at(EPOCH_MS + 1, self.arrive, kind)
        self.engine.run(EPOCH_MS + horizon_s * 1000)
        self.account_power()
        return self.metrics(horizon_s)

    def metrics(self, horizon_s: int) -> dict:
        self._served: dict[int, int] = {}
        for r in self.stats.rentals:
            self._served[r[1]] = self._served.get(r[1], 0) + r[4]
        gpu_hours = len(self.gpus) * horizon_s / HOUR_S
        income = self.stats.income / MICRO
        done = [j for j in self.jobs if j.done_s is not None]
        work_done_h = sum(self._work_of(j) for j in done) / HOUR_S
        cost = sum(j.cost for j in done) / MICRO

        def per_kind(kind: str) -> dict:
            js = [j for j in done if j.kind == kind]
            w = sum(self._work_of(j) for j in js) / HOUR_S
            c = sum(j.cost for j in js) / MICRO
            return {"jobs_done": len(js), "work_hours": round(w, 3),
                    "cost_per_work_hour": round(c / w, 6) if w else None}

        return {
            "policy": self.policy,
            "gpus": len(self.gpus),
            "provider_income_per_gpu_hour": round(income / gpu_hours, 6),
            "provider_power_cost_per_gpu_hour": round(self.stats.power_cost / gpu_hours, 6),
            "provider_net_per_gpu_hour": round((income - self.stats.power_cost) / gpu_hours, 6),
            "utilisation": round(self.stats.busy_gpu_s / (len(self.gpus) * horizon_s), 6),
            "curtailed_gpu_hours": round(self.stats.curtailed_gpu_s / HOUR_S, 3),
            "renter_cost_per_work_hour": round(cost / work_done_h, 6) if work_done_h else None,
            "on_demand_jobs": per_kind("on_demand"),
            "checkpointing_jobs": per_kind("spot"),
            "jobs_arrived": len(self.jobs),
            "jobs_done": len(done),
            "jobs_gave_up": sum(1 for j in self.jobs if j.gave_up),
            "preemptions": self.stats.preemptions,
            "notice_violations": self.stats.violations,
            "work_lost_gpu_hours": round(sum(j.lost_s for j in self.jobs) / HOUR_S, 3),
        }

    def _work_of(self, job: Job) -> float:
        """The job's useful work: what it paid for minus what it lost."""
        return self._served.get(job.id, 0) - job.lost_s


def run_scenario(doc: dict, seed: int) -> dict:
    cfg = resolve(doc)
    steps = int(cfg["run"]["days"] * 86400 // cfg["run"]["price_step_s"]) + 2
    prices = {}
    for region in cfg["power"]["regions"]:
        if cfg["power"]["csv_dir"]:
            prices[region] = csv_prices(Path(cfg["power"]["csv_dir"]) / f"{region}.csv", steps,
                                        cfg["run"]["price_step_s"], 0)
        else:
            prices[region] = synthetic_prices(cfg["power"], region, seed, steps, cfg["run"]["price_step_s"])
    results = {}
    markets = {}
    for policy in POLICIES:
        m = Market(cfg, policy, seed, prices)
        results[policy] = m.run()
        markets[policy] = m
    return {"config": cfg, "seed": seed, "prices": prices, "metrics": results, "markets": markets}


def write_results(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.json").write_text(json.dumps({"seed": res["seed"], **res["config"]},
                                                         indent=1, sort_keys=True) + "\n")
    (out / "metrics.json").write_text(json.dumps(res["metrics"], indent=1, sort_keys=True) + "\n")
    step = res["config"]["run"]["price_step_s"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    regions = list(res["prices"])
    w.writerow(["t_s", *[f"{r}_per_mwh" for r in regions]])
    for k in range(len(res["prices"][regions[0]])):
        w.writerow([k * step, *[res["prices"][r][k] for r in regions]])
    (out / "prices.csv").write_text(buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["policy", "job", "kind", "interruptible_gpu", "served_s", "provider_micro_usd", "renter_back_micro_usd"])
    for m in res["markets"].values():
        w.writerows(m.stats.rentals)
    (out / "rentals.csv").write_text(buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["t_s", "region", "curtailed_gpus"])
    w.writerows(res["markets"]["spot_curtail"].timeline)
    (out / "curtailment.csv").write_text(buf.getvalue())


def plot(out: Path) -> list[Path]:
    """Figures from the result files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "prices.csv").read_text().splitlines()))
    cur = list(csv.DictReader((out / "curtailment.csv").read_text().splitlines()))
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    made = []
    fig, ax = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [int(r["t_s"]) / 86400 for r in rows]
    for col in rows[0]:
        if col != "t_s":
            ax[0].plot(t, [float(r[col]) for r in rows], lw=0.7, label=col.replace("_per_mwh", ""))
    ax[0].set_yscale("symlog", linthresh=100)
    ax[0].set_ylabel("USD/MWh")
    ax[0].legend()
    ax[0].set_title("real-time power price")
    for region in [c.replace("_per_mwh", "") for c in rows[0] if c != "t_s"]:  # same colours
        pts = [(int(r["t_s"]) / 86400, int(r["curtailed_gpus"])) for r in cur if r["region"] == region]
        ax[1].step([p[0] for p in pts], [p[1] for p in pts], where="post", lw=0.8, label=region)
    ax[1].set_ylabel("GPUs curtailed (spot_curtail)")
    ax[1].set_xlabel("day")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(figs / "prices_and_curtailment.png", dpi=110)
    plt.close(fig)
    made.append(figs / "prices_and_curtailment.png")

    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    names = list(metrics)
    ax[0].bar(names, [metrics[n]["provider_income_per_gpu_hour"] for n in names], label="income")
    ax[0].bar(names, [-metrics[n]["provider_power_cost_per_gpu_hour"] for n in names], label="power cost")
    ax[0].plot(names, [metrics[n]["provider_net_per_gpu_hour"] for n in names], "ko-", label="net")
    ax[0].set_title("provider USD per GPU-hour owned")
    ax[0].legend(fontsize=8)
    ax[1].bar(names, [metrics[n]["renter_cost_per_work_hour"] or 0 for n in names])
    ax[1].set_title("renter USD per completed work-hour")
    ax[2].bar(names, [metrics[n]["work_lost_gpu_hours"] for n in names])
    ax[2].set_title("work lost to preemption (GPU-h)")
    for a in ax:
        a.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(figs / "policies.png", dpi=110)
    plt.close(fig)
    made.append(figs / "policies.png")
    return made


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        for p in plot(Path(argv[1])):
            print(p)
        return 0
    ap = argparse.ArgumentParser(prog="python -m simulations.spot")
    ap.add_argument("scenario")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        doc = tomllib.loads(Path(args.scenario).read_text())
        res = run_scenario(doc, args.seed)
    except (SpotScenarioError, tomllib.TOMLDecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(Path(args.out), res)
    print(json.dumps(res["metrics"], indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
