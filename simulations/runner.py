"""Run one scenario (or a sweep) and write its results into a directory:

  config.resolved.json  the full configuration the run used (defaults filled in) + seed
  metrics.json          the summary (deterministic: same scenario + seed => same bytes)
  metrics.csv           the summary flattened to key,value rows
  rentals.csv           one row per opened agreement (ground truth and money)
  timeseries.csv        one row per `run.sample_every_s`
  propagation.csv       sampled offer propagation latencies (ms)
  log.txt               notable events with virtual timestamps

Nothing written here depends on the wall clock; progress (with wall time) goes to stderr.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import sys
from multiprocessing import get_context
from typing import Any

from .config import parse_value, with_override
from .world import World


def _flatten(prefix: str, value: Any, out: list) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, value))


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def run_scenario(cfg: dict, seed: int, out: str | os.PathLike, progress: bool = False) -> dict:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.json").write_text(
        json.dumps({"seed": seed, "config": cfg}, indent=2, sort_keys=True) + "\n")
    world = World(cfg, seed, progress=progress)
    res = world.run()
    summary = res["summary"]
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    flat: list = []
    _flatten("", summary, flat)
    (out / "metrics.csv").write_text(_csv([{"metric": k, "value": v} for k, v in flat]))
    (out / "rentals.csv").write_text(_csv(res["rentals"]))
    (out / "timeseries.csv").write_text(_csv(res["series"]))
    (out / "propagation.csv").write_text("latency_ms\n" + "".join(f"{x}\n" for x in res["propagation"]))
    (out / "new_renter.csv").write_text("full_view_ms\n" + "".join(f"{x}\n" for x in res["new_renter"]))
    (out / "log.txt").write_text("\n".join(world.log_lines) + "\n")
    return summary


SWEEP_COLUMNS = [
    ("match_rate", ("match_rate",)), ("rentals_opened", ("rentals_opened",)),
    ("prop_p50_ms", ("propagation_ms", "p50")), ("prop_p99_ms", ("propagation_ms", "p99")),
    ("coverage", ("propagation_ms", "mean_coverage")), ("time_to_rent_p50_ms", ("time_to_rent_ms", "p50")),
    ("utilisation_mean", ("utilisation", "mean")),
    ("renter_loss_usd", ("money_usd", "renter_loss_to_faulty_providers_usd")),
    ("provider_loss_usd", ("money_usd", "provider_loss_to_faulty_renters_usd")),
    ("invalid_dropped", ("invalid_messages", "dropped")), ("events", ("events",)),
]


def _sweep_one(args: tuple) -> dict:
    cfg, seed, out, param, value = args
    s = run_scenario(cfg, seed, out)
    row: dict[str, Any] = {param: value if not isinstance(value, list) else "+".join(value)}
    for name, path in SWEEP_COLUMNS:
        v: Any = s
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        row[name] = v
    return row


def run_sweep(cfg: dict, seed: int, out: str | os.PathLike, spec: str, jobs: int | None = None) -> list[dict]:
    """`spec` is `section.key=v1,v2,...`; one run per value, across CPU cores; sweep.csv and
    sweep.json collect one row per value (in the order given)."""
    param, _, values = spec.partition("=")
    section, _, key = param.partition(".")
    if not values or not key:
        raise ValueError("--sweep wants section.key=v1,v2,...")
    out = pathlib.Path(out)
    tasks = []
    for text in values.split(","):
        v = parse_value(section, key, text)
        tasks.append((with_override(cfg, param, v), seed, str(out / f"{param}={text}"), param, v))
    jobs = jobs or min(len(tasks), os.cpu_count() or 1)
    if jobs > 1:
        with get_context("spawn").Pool(jobs) as pool:
            rows = pool.map(_sweep_one, tasks)
    else:
        rows = [_sweep_one(t) for t in tasks]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.csv").write_text(_csv(rows))
    (out / "sweep.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return rows
