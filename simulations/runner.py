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


def _sweep_one_files(args: tuple) -> tuple[dict, dict[str, bytes]]:
    """One sweep run on a cluster worker: run in a scratch directory there and send the result
    files back (the worker's disk is not the client's)."""
    import tempfile

    cfg, seed, param, value = args
    with tempfile.TemporaryDirectory(prefix="gpumarket-sweep-") as tmp:
        row = _sweep_one((cfg, seed, tmp, param, value))
        root = pathlib.Path(tmp)
        files = {p.relative_to(root).as_posix(): p.read_bytes()
                 for p in sorted(root.rglob("*")) if p.is_file()}
    return row, files


def _write_files(out_dir: pathlib.Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = (out_dir / rel).resolve()
        if out_dir.resolve() not in path.parents:  # a worker's answer never writes elsewhere
            raise ValueError(f"sweep result file {rel!r} escapes {out_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _run_on_cluster(address: str, tasks: list[tuple], timeout_s: float = 30.0) -> list[dict]:
    """One scenario run per Dask task on the cluster at `address` (tcp://HOST:8786); each run's
    files are written into its directory as soon as it comes back. Workers need this code
    importable (the same checkout and the `sim` and `cluster` extras)."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ValueError("--cluster needs the dask `distributed` package (the `cluster` extra)") from None
    rows: dict[int, dict] = {}
    with Client(address, timeout=timeout_s) as client:
        where = {}
        futures = []
        for i, (cfg, seed, out_dir, param, value) in enumerate(tasks):
            fut = client.submit(_sweep_one_files, (cfg, seed, param, value), pure=False,
                                key=f"sweep-{i}")
            where[fut.key] = (i, pathlib.Path(out_dir))
            futures.append(fut)
        for fut, (row, files) in as_completed(futures, with_results=True):
            i, out_dir = where[fut.key]
            _write_files(out_dir, files)
            rows[i] = row
    return [rows[i] for i in range(len(tasks))]


def run_sweep(cfg: dict, seed: int, out: str | os.PathLike, spec: str, jobs: int | None = None,
              cluster: str | None = None) -> list[dict]:
    """`spec` is `section.key=v1,v2,...`; one run per value, across CPU cores (or one Dask task
    per value on `cluster`); sweep.csv and sweep.json collect one row per value (in the order
    given)."""
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
    if cluster:
        rows = _run_on_cluster(cluster, tasks)
    elif jobs > 1:
        with get_context("spawn").Pool(jobs) as pool:
            rows = pool.map(_sweep_one, tasks)
    else:
        rows = [_sweep_one(t) for t in tasks]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.csv").write_text(_csv(rows))
    (out / "sweep.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return rows
