"""Benchmark of the network simulator.

Run: PYTHONPATH=. python tests/benchmarks/bench_simulator.py [--nodes 10000] [--sim-s 3600] [--progress]

1. Engine alone: events/s with a trivial agent (each event schedules the next), one core.
2. The real protocol core: events/s of the healthy-market scenario at a small size.
3. A large run: wall time, CPU time and peak memory (ru_maxrss) for N nodes (healthy-market
   proportions: 35% providers, 65% renters) over the simulated time asked for. With
   `--nodes 10000 --sim-s 3600` the 10,000-node hour is RUN and MEASURED. With anything smaller
   the 10,000-node-hour figure is an EXTRAPOLATION, labelled so: linear in simulated time, and
   linear in nodes for the per-node work plus quadratic for the gossip-flood work (every offer
   reaches every node).
Prints one JSON object on the last line.

Measured on a 2-core box shared with other engineers (wall times are noisy; compare within
one run):

| | before (395bdb7) | after (sim-perf) | + faster protocol crypto/encoding, decode memo (9bbcf58) | + compiled flood, sync fix (b2aaefc, one thread) | + flood thread (494b81d) |
|---|---|---|---|---|---|
| engine, trivial agent | 167k events/s | 258k-691k events/s | 753k-768k events/s | 794k events/s | 788k events/s |
| protocol core, 300 nodes x 1800 s | 1,039 events/s (31 s) | 756-1,198 events/s (27-43 s) | 3,466-3,786 events/s (8.5-9.3 s) | 4,231 events/s (7.8 s) | 3,982 events/s |
| 10,000 nodes x 3600 s | not run: extrapolated 2-20 h | MEASURED: 1,618 s wall, peak RSS 1,363 MiB | MEASURED: 1,352 s wall (1,337 s CPU), 1,425 MiB | MEASURED: 548.9 s wall (548.5 s CPU), 1,581 MiB | MEASURED: 489.8 s wall (548.9 s CPU, two threads), 1,583 MiB |

The 10,000-node hour (seed 1): up to 9bbcf58, 1,084,507 events, 24,321 gossip floods, 5,531
rentals; since 68e4c5f (a book sync no longer copies withdrawn offers, so more renters find a
live offer) 1,238,701 events, 27,594 floods, 6,500 rentals (every renter rents once), the same
with and without the flood thread. Targets: engine >= 300k events/s met; RSS < 4 GB met;
wall < 600 s met (490 s; 549 s on one thread, `--no-flood-thread`). Where the time goes:
simulations/README.md, "Performance".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.config import resolve  # noqa: E402
from simulations.engine import Engine  # noqa: E402
from simulations.world import World  # noqa: E402


def engine_only(n_events: int = 1_000_000) -> float:
    e = Engine(0)
    left = [n_events]

    def tick(i: int) -> None:
        left[0] -= 1
        if left[0] > 0:
            e.after(1 + (i * 7919) % 13, tick, i + 1)

    for i in range(100):  # 100 concurrent "agents"
        e.at(i, tick, i)
    t = time.perf_counter()
    e.run(10**15)
    return e.events / (time.perf_counter() - t)


def market(nodes: int, sim_s: int, seed: int = 1, progress: bool = False, flood_thread: bool = True) -> dict:
    cfg = resolve({
        "run": {"name": f"bench-{nodes}", "duration_s": sim_s},
        "providers": {"count": round(nodes * 0.35)},
        "renters": {"count": nodes - round(nodes * 0.35)},
    })
    w = World(cfg, seed, progress=progress, flood_thread=flood_thread)
    t = time.perf_counter()
    c = time.process_time()
    res = w.run()["summary"]
    wall = time.perf_counter() - t
    cpu = time.process_time() - c  # on a shared box, CPU seconds are steadier than wall
    return {"nodes": nodes, "sim_s": sim_s, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "events": res["events"],
            "events_per_s": round(res["events"] / wall), "rentals": res["rentals_opened"],
            "flood_thread": flood_thread,
            "floods": res["propagation_ms"]["floods"], "signatures": res["signatures"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--sim-s", type=int, default=1800)
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--progress", action="store_true", help="progress lines of the large run on stderr")
    ap.add_argument("--no-flood-thread", action="store_true",
                    help="run the floods' passes in the run's own thread (one core), not beside it")
    args = ap.parse_args()
    eng = engine_only()
    print(f"engine alone, trivial agent: {eng:,.0f} events/s")
    small = market(args.small, 1800)
    print(f"protocol core, {args.small} nodes x 1800 s: {small}")
    big = market(args.nodes, args.sim_s, progress=args.progress, flood_thread=not args.no_flood_thread)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.nodes} nodes x {args.sim_s} s: {big}, peak RSS {peak_mib:.0f} MiB")
    measured = args.nodes == 10_000 and args.sim_s >= 3600
    scale_t = 3600 / args.sim_s
    scale_n = 10_000 / args.nodes
    # floods and book ingests grow with (publishers x receivers); the rest with nodes
    extrap_wall = big["wall_s"] * scale_t * scale_n ** 2
    extrap_low = big["wall_s"] * scale_t * scale_n
    out = {
        "engine_events_per_s_trivial_agent": round(eng),
        "protocol_events_per_s": small["events_per_s"],
        "protocol_events_per_s_large": big["events_per_s"],
        "target_events_per_s": 300_000,
        "large_run": {**big, "peak_rss_mib": round(peak_mib)},
        "ten_k_node_hour": ({"measured": True, "wall_s": big["wall_s"], "peak_rss_mib": round(peak_mib)}
                            if measured else
                            {"measured": False, "EXTRAPOLATION": True,
                             "wall_s_linear_bound": round(extrap_low),
                             "wall_s_quadratic_bound": round(extrap_wall),
                             "basis": f"{args.nodes} nodes x {args.sim_s} s"}),
        "target_wall_s": 600, "target_rss_mib": 4096,
    }
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
