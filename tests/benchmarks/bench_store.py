"""Per-call latency of the store through the trio path (to_thread + CapacityLimiter(1)).

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_store.py [--n 500]
Prints a human summary, then one JSON line (the last line) with microsecond percentiles for
reads and for write+commit under synchronous=FULL and NORMAL, on a file in --dir (default: a
temporary directory, i.e. whatever disk /tmp is on: say which when quoting the numbers).
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import trio

from node.store import Store


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def summary(samples_s):
    us = [x * 1e6 for x in samples_s]
    return {"n": len(us), "p50_us": round(pct(us, 50), 1), "p95_us": round(pct(us, 95), 1),
            "p99_us": round(pct(us, 99), 1), "mean_us": round(statistics.fmean(us), 1)}


async def run_mode(directory, synchronous, n):
    path = os.path.join(directory, f"bench-{synchronous}.db")
    agreement = b"B" * 32
    async with await Store.open(path, synchronous=synchronous) as store:
        await store.put_agreement(agreement, "provider", "active", b"terms", time.time())
        writes, reads = [], []
        for seq in range(n):
            raw = os.urandom(200)
            t0 = time.perf_counter()
            await store.put_heartbeat(agreement, seq, raw, hashlib.sha256(raw).digest(), time.time())
            writes.append(time.perf_counter() - t0)
        for seq in range(n):
            t0 = time.perf_counter()
            await store.last_heartbeat(agreement)
            reads.append(time.perf_counter() - t0)
    return {"write_commit": summary(writes), "read": summary(reads)}


async def main(args):
    directory = args.dir or tempfile.mkdtemp(prefix="bench-store-")
    result = {"bench": "store", "dir": directory, "python": platform.python_version(),
              "cpus": os.cpu_count()}
    for mode in ("FULL", "NORMAL"):
        result[mode] = await run_mode(directory, mode, args.n)
        w, r = result[mode]["write_commit"], result[mode]["read"]
        print(f"synchronous={mode}: write+commit p50 {w['p50_us']} us p95 {w['p95_us']} us;"
              f" read p50 {r['p50_us']} us p95 {r['p95_us']} us")
    if args.dir is None:
        shutil.rmtree(directory)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--dir", default=None)
    trio.run(main, parser.parse_args())
