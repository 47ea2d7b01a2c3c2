"""Market sync on join: a fresh renter node fetches a market of ``--offers`` offers.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_market_sync.py
A worker process runs ``--peers`` nodes that all hold the same market in their books (ingested
through the same validation path as gossip). The renter, in this process, is started from
nothing each repetition: host start, parallel dials to the peers, /gpumarket/offer-sync/1 from
all of them in parallel, every offer re-validated (signature, binding ecrecover, book rules).
Time = from just before the renter's host starts until its book holds every offer.

One live offer per provider is the book's rule, so ``--offers`` offers come from as many
provider identities (each with its own wallet binding, so the renter verifies that many
bindings: the expensive case). Prints a summary, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OfferService
from node.store import Store
from node.testing import LOOPBACK
from protocol.samples import make_offer, make_provider


async def worker(args) -> None:
    rng = random.Random(args.seed)
    now = int(time.time() * 1000)
    offers = []
    for _ in range(args.offers):
        peer, _, binding = make_provider(rng)
        offers.append(make_offer(peer, binding, rng, now).encode())
    async with trio.open_nursery() as nursery:
        addrs = []
        for _ in range(args.peers):
            host = await nursery.start(
                GossipHost(NodeIdentity.from_seed(rng.randbytes(32)), HostConfig(listen_addrs=LOOPBACK)).run)
            service = OfferService(host, None)
            await nursery.start(service.run)
            for raw in offers:
                service.ingest(raw, "preload", None)
            assert len(service.book) == args.offers, service.counters
            addrs.append(str(host.addrs()[0]))
        print(json.dumps({"addrs": addrs, "bytes": sum(map(len, offers))}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the driver closes stdin
        nursery.cancel_scope.cancel()


async def join_once(addrs: list[str], expected: int, db: str) -> dict:
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        host = await nursery.start(
            GossipHost(NodeIdentity.from_seed(os.urandom(32)), HostConfig(listen_addrs=LOOPBACK)).run)
        store = await Store.open(db)
        service = OfferService(host, store)
        await nursery.start(service.run)
        t_started = time.perf_counter()
        ok = await host.connect_all(addrs)
        t_connected = time.perf_counter()
        results = await service.sync()
        t_synced = time.perf_counter()
        held = len(service.book)
        await service.flush()
        stored = len(await store.live_offers(0))
        nursery.cancel_scope.cancel()
    await store.close()
    return {
        "total_s": round(t_synced - t0, 3), "start_s": round(t_started - t0, 3),
        "connect_s": round(t_connected - t_started, 3), "sync_s": round(t_synced - t_connected, 3),
        "held": held, "complete": held == expected, "stored": stored, "dialled_ok": sum(ok),
        "per_peer": [{"offers": r.offers, "accepted": r.accepted, "error": r.error} for r in results],
    }


def main(args) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--offers", str(args.offers),
                             "--peers", str(args.peers), "--seed", str(args.seed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        t = time.perf_counter()
        hello = json.loads(proc.stdout.readline())
        prepare_s = time.perf_counter() - t
        runs = []
        tmp = tempfile.mkdtemp(prefix="bench-sync-")
        for i in range(args.repeat):
            r = trio.run(join_once, hello["addrs"], args.offers, os.path.join(tmp, f"r{i}.db"))
            runs.append(r)
            print(f"run {i}: {r['held']}/{args.offers} offers in {r['total_s']} s (connect"
                  f" {r['connect_s']} s, sync {r['sync_s']} s)", flush=True)
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    totals = [r["total_s"] for r in runs]
    result = {
        "bench": "market_sync", "offers": args.offers, "providers": args.offers,
        "peers": args.peers, "market_bytes": hello["bytes"], "worker_prepare_s": round(prepare_s, 2),
        "all_complete": all(r["complete"] for r in runs),
        "total_s_median": statistics.median(totals), "total_s_max": max(totals),
        "target_s": 3.0, "runs": runs,
        "python": platform.python_version(), "cpus": os.cpu_count(), "seed": args.seed,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--offers", type=int, default=1000)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    if a.worker:
        trio.run(worker, a)
    else:
        main(a)
