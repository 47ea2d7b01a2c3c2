"""Scenario schema: every parameter typed, described, defaulted and given a unit.

A scenario file (TOML) has one table per section below; any key not in the schema, or a value
of the wrong type or outside its range, is an error that names the key, what was expected and
the parameter's description. Nodes are grouped by role: [providers], [renters], [spammers],
[sybils]. `resolve()` returns the full config (defaults filled in) that each run writes beside
its results.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from typing import Any

from protocol.samples import GPU_MODELS, REGIONS


class ScenarioError(ValueError):
    """The scenario file or an override is not valid against the schema."""


@dataclass(frozen=True)
class P:
    type: type | str  # int, float, str, bool, or "list[str]"
    default: Any
    unit: str
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None


MODEL_NAMES = tuple(m.name for m in GPU_MODELS)

SCHEMA: dict[str, dict[str, P]] = {
    "run": {
        "name": P(str, "scenario", "-", "label written into the results"),
        "duration_s": P(int, 3600, "s", "simulated time", 1, 30 * 86400),
        "join_spread_s": P(int, 60, "s", "initial nodes join uniformly over [0, this]", 0),
        "warmup_s": P(int, 300, "s", "renter (re)joins before this are not counted in the new-renter metric", 0),
        "progress_every_s": P(int, 300, "s", "simulated time between progress lines on stderr", 1),
        "sample_every_s": P(int, 60, "s", "simulated time between time-series rows", 1),
        "log_max_lines": P(int, 20000, "lines", "cap on the event log written to log.txt", 0),
    },
    "network": {
        "intra_region_rtt_ms": P(float, 2.0, "ms", "RTT between two nodes of the same region", 0),
        "jitter_frac": P(float, 0.1, "fraction", "one-way delay = RTT/2 * (1 + jitter_frac * U(-1,1))", 0, 1),
        "bandwidth_mbps": P(float, 100.0, "Mbit/s", "per-node uplink: serialization delay = size / bandwidth", 0.001),
        "loss": P(float, 0.0, "fraction", "probability that one transmission is lost", 0, 0.9),
        "per_message_cpu_ms": P(float, 0.8, "ms", "CPU per message transmission (py-libp2p 0.8.1 with node/libp2p_perf.py items 1-16, 7-node D=6 mesh, tests/benchmarks/bench_gossip_cpu.py; 4.7 ms unpatched)", 0),
        "validate_ms": P(float, 0.2, "ms", "CPU to validate one offer before forwarding it (measured validate_offer, warm binding)", 0),
        "retransmit_timeout_ms": P(float, 200.0, "ms", "direct streams are reliable: each loss adds max(this, 2 RTT)", 0),
        "connections": P(int, 12, "peers", "connections a node opens when it joins", 1),
        "partition_start_s": P(int, -1, "s", "start of a partition (-1: none)", -1),
        "partition_heal_s": P(int, -1, "s", "when the partition heals (-1: never)", -1),
        "partition_regions": P("list[str]", [], "regions", "nodes in these regions are cut off from the rest", choices=REGIONS),
    },
    "gossip": {
        "D": P(int, 6, "peers", "gossipsub target mesh degree", 1),
        "D_low": P(int, 4, "peers", "graft when the mesh is smaller than this", 0),
        "D_high": P(int, 12, "peers", "prune when the mesh is larger than this", 1),
        "D_lazy": P(int, 6, "peers", "IHAVE targets per heartbeat among non-mesh peers", 0),
        "heartbeat_ms": P(int, 1000, "ms", "mesh maintenance and lazy-gossip period", 1),
        "mcache_gossip": P(int, 3, "heartbeats", "a message id is advertised in IHAVE for this many heartbeats", 0),
        "graylist_after_invalid": P(int, 3, "messages", "invalid messages from one peer before it is pruned and ignored (P4)", 1),
    },
    "chain": {
        "chain_id": P(int, 31337, "-", "EVM chain id in offers and bindings", 1),
        "block_time_s": P(int, 2, "s", "block interval", 1),
        "confirmations": P(int, 2, "blocks", "blocks after inclusion before a party acts on an event", 0),
        "gas_price_gwei": P(float, 0.05, "gwei", "gas price (an L2)", 0),
        "eth_usd": P(float, 3000.0, "USD/ETH", "to express gas in USD", 0),
        "gas_open": P(int, 92295, "gas", "open, ERC-20 (tests/benchmarks/bench_escrow_gas.py open_erc20)", 0),
        "gas_claim": P(int, 76326, "gas", "claim that settles, ERC-20 (claim_erc20_settle)", 0),
        "gas_close": P(int, 31295, "gas", "close (bench_escrow_gas.py)", 0),
        "gas_recover": P(int, 40926, "gas", "recover (bench_escrow_gas.py recover_native, 40,926)", 0),
        "gas_claim_arbiter": P(int, 39075, "gas", "claim that starts a dispute window (specs/escrow.md)", 0),
        "gas_dispute": P(int, 32024, "gas", "dispute (specs/escrow.md)", 0),
        "gas_arbitrate": P(int, 52931, "gas", "arbitrate, ERC-20, pays both (specs/escrow.md)", 0),
        "gas_finalize": P(int, 53119, "gas", "finalize, ERC-20, pays both (specs/escrow.md)", 0),
    },
    "market": {
        "offer_lifetime_s": P(int, 3600, "s", "expires_ms - created_ms of every offer", 60, 7200),
        "reannounce_s": P(int, 1800, "s", "a provider re-signs and republishes its offer this often", 1),
        "heartbeat_interval_s": P(int, 30, "s", "heartbeat interval in offer terms", 5, 600),
        "sync_on_join": P(bool, True, "-", "a joining node fetches a snapshot of one peer's book", ),
        "first_publish_after_s": P(int, 60, "s", "providers present at the start publish their first offer at this time (once the overlay has formed); later joiners publish when they join", 0),
        "reservation_hold_s": P(int, 120, "s", "provider holds accepted GPUs this long for the escrow to open", 1),
        "arbiter_frac": P(float, 0.0, "fraction", "providers whose offers name the market's arbiter: their claims wait out a dispute window, and an underpaid provider disputes", 0, 1),
        "dispute_window_s": P(int, 600, "s", "dispute window in offers that name the arbiter (the escrow's bounds)", 300, 604800),
        "arbitration_delay_s": P(int, 300, "s", "the arbiter rules this long after a dispute (under the contract's timeout)", 0),
    },
    "providers": {
        "count": P(int, 300, "nodes", "honest-or-faulty providers (profiles below)", 0),
        "models": P("list[str]", list(MODEL_NAMES), "-", "GPU models drawn uniformly", choices=MODEL_NAMES),
        "floor_frac": P(float, 0.9, "fraction", "lowest price accepted, as a fraction of the offer's price", 0.01, 1),
        "offline_frac": P(float, 0.0, "fraction", "go offline for good during their first rental", 0, 1),
        "misreport_frac": P(float, 0.0, "fraction", "heartbeats list other GPUs than the agreed ones", 0, 1),
        "stop_serving_frac": P(float, 0.0, "fraction", "stop serving mid-rental but keep claiming", 0, 1),
        "fault_after_s": P(int, 300, "s", "faults begin this long into a rental (uniform 0.5x..1.5x)", 0),
    },
    "renters": {
        "count": P(int, 700, "nodes", "renters", 0),
        "rentals_each": P(int, 1, "rentals", "rentals each renter wants over the run", 0),
        "request_window_frac": P(float, 0.6, "fraction", "requests fall uniformly in [join, this * duration]", 0, 1),
        "duration_min_s": P(int, 600, "s", "shortest rental asked for", 600),
        "duration_max_s": P(int, 1800, "s", "longest rental asked for", 600),
        "gpus_max": P(int, 2, "GPUs", "GPUs asked for: uniform 1..this", 1, 64),
        "max_price_frac": P(float, 1.0, "fraction", "max price = low + frac * (high - low) of the model's 2026 range", 0, 3),
        "opening_frac": P(float, 0.85, "fraction", "first proposal at this fraction of the offer's price", 0.01, 1),
        "parallel": P(int, 3, "offers", "negotiations at once (FirstAgreementWins)", 1),
        "retries": P(int, 3, "attempts", "shopping attempts before giving up", 1),
        "retry_after_s": P(int, 60, "s", "wait between attempts", 1),
        "stop_ack_frac": P(float, 0.0, "fraction", "stop sending receipts partway through", 0, 1),
        "late_join_frac": P(float, 0.2, "fraction", "renters that join during the run instead of at the start", 0, 1),
    },
    "spammers": {
        "count": P(int, 0, "nodes", "nodes that publish invalid offers (bad signatures)", 0),
        "per_minute": P(float, 2.0, "messages/min", "invalid offers each spammer publishes", 0),
    },
    "sybils": {
        "operators": P(int, 0, "operators", "operators, each with one host of real GPUs", 0),
        "identities": P(int, 5, "identities", "provider identities per operator, all advertising the same GPUs", 1),
        "price_frac": P(float, 0.2, "fraction", "price at low + frac * (high - low): cheap to attract renters", 0, 1),
    },
    "churn": {
        "leave_per_hour": P(float, 0.0, "fraction/h", "per honest node: rate of leaving (exponential)", 0),
        "downtime_mean_s": P(float, 600.0, "s", "mean time offline before rejoining (exponential)", 0),
        "rejoin": P(bool, True, "-", "whether nodes that leave come back"),
    },
}


def _check(section: str, key: str, p: P, value: Any) -> Any:
    where = f"[{section}] {key}"
    want = p.type
    if want == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ScenarioError(f"{where}: expected a list of strings ({p.description})")
        if p.choices is not None:
            bad = [v for v in value if v not in p.choices]
            if bad:
                raise ScenarioError(f"{where}: unknown {bad}; choose from {list(p.choices)}")
        return list(value)
    if want is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}: expected true/false, got {value!r} ({p.description})")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: expected an integer in {p.unit}, got {value!r} ({p.description})")
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{where}: expected a number in {p.unit}, got {value!r} ({p.description})")
        value = float(value)
    elif want is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{where}: expected a string, got {value!r}")
    if p.min is not None and value < p.min:
        raise ScenarioError(f"{where}: {value} is below the minimum {p.min} {p.unit}")
    if p.max is not None and value > p.max:
        raise ScenarioError(f"{where}: {value} is above the maximum {p.max} {p.unit}")
    return value


def resolve(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults filled in, every value checked. Raises ScenarioError."""
    for section in raw:
        if section not in SCHEMA:
            raise ScenarioError(f"unknown section [{section}]; sections: {', '.join(SCHEMA)}")
        if not isinstance(raw[section], dict):
            raise ScenarioError(f"[{section}] must be a table")
    out: dict[str, dict[str, Any]] = {}
    for section, params in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in params:
                raise ScenarioError(f"[{section}] unknown key {key!r}; keys: {', '.join(params)}")
        out[section] = {k: _check(section, k, p, given[k]) if k in given else
                        (list(p.default) if isinstance(p.default, list) else p.default)
                        for k, p in params.items()}
    g = out["gossip"]
    if not g["D_low"] <= g["D"] <= g["D_high"]:
        raise ScenarioError("[gossip] need D_low <= D <= D_high")
    r = out["renters"]
    if r["duration_min_s"] > r["duration_max_s"]:
        raise ScenarioError("[renters] duration_min_s > duration_max_s")
    p = out["providers"]
    if p["offline_frac"] + p["misreport_frac"] + p["stop_serving_frac"] > 1:
        raise ScenarioError("[providers] fault fractions add up to more than 1")
    if not out["providers"]["models"]:
        raise ScenarioError("[providers] models is empty")
    return out


def load(path: str) -> dict[str, dict[str, Any]]:
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: {exc}") from None
    return resolve(raw)


def parse_value(section: str, key: str, text: str) -> Any:
    """A command-line value (sweeps, overrides) typed by the schema."""
    if section not in SCHEMA or key not in SCHEMA[section]:
        raise ScenarioError(f"unknown parameter {section}.{key}")
    p = SCHEMA[section][key]
    try:
        if p.type == "list[str]":
            value: Any = [v for v in text.split("+") if v]
        elif p.type is bool:
            value = {"true": True, "false": False}[text.lower()]
        elif p.type is int:
            value = int(text)
        elif p.type is float:
            value = float(text)
        else:
            value = text
    except (ValueError, KeyError):
        raise ScenarioError(f"{section}.{key}: cannot read {text!r} as {p.type}") from None
    return _check(section, key, p, value)


def with_override(config: dict, dotted: str, value: Any) -> dict:
    section, _, key = dotted.partition(".")
    new = json.loads(json.dumps(config))
    new[section][key] = value
    return resolve(new)


def schema_markdown() -> str:
    """The parameter table (for the README)."""
    lines = ["| parameter | type | default | unit | description |", "|---|---|---|---|---|"]
    for section, params in SCHEMA.items():
        for k, p in params.items():
            t = p.type if isinstance(p.type, str) else p.type.__name__
            lines.append(f"| `{section}.{k}` | {t} | `{p.default}` | {p.unit} | {p.description} |")
    return "\n".join(lines)
