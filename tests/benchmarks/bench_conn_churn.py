"""Connect/drop churn against one long-running provider node (issue 11, item 2).

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_conn_churn.py
A provider (GossipHost + OfferService + Store) listens on 127.0.0.1; ``--churners`` peers each
dial it (TCP + Noise + yamux, complete), close, and dial again once the provider has seen the
connection go, ``--cycles`` in all. Every ``--every`` cycles a probe peer dials the provider and
closes (its connect time is printed). Before the fix, py-libp2p's swarm refused every inbound
dial after 250 lifetime inbound connections. At the end: inbound slots still borrowed (should be
0), per-IP / per-peer counters left (should be empty), the provider's connection table, RSS.
All peers share the process and its cores: cycles/s is CPU-bound (pure-Python Noise and yamux
on both sides). Prints a summary, then one JSON line (the last line).

Measured here (2 shared cores, default arguments): 10,000 cycles, 0 failed, 301 s (33 cycles/s),
123.5 s CPU for both sides (12.4 ms per cycle); every probe dial accepted (8-94 ms); inbound
slots borrowed at the end 0; provider RSS 107.4 -> 112.9 MB. Before the fix the 251st inbound
connection and every one after it was refused.
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import multiaddr
import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.testing import LOOPBACK
from tests.node.offer_helpers import start_node


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main(args) -> dict:
    done = 0
    failures = 0
    probes: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            provider = await start_node(nursery, Path(tmp) / "provider.db")
            victim = provider.host
            swarm = victim.host.get_network()
            addr = victim.addrs()[0].decapsulate(multiaddr.Multiaddr(f"/p2p/{victim.peer_id}"))
            peers = [await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                                                    HostConfig(listen_addrs=LOOPBACK)).run)
                     for _ in range(args.churners + 1)]
            probe, churners = peers[0], peers[1:]
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            rss0 = rss_mb()

            async def gone(peer) -> None:
                with trio.fail_after(10):
                    while peer.peer_id in swarm.connections:
                        await trio.sleep(0.005)

            async def cycle(peer) -> float:
                t = time.perf_counter()
                conn = await peer.host.get_network().dial_addr(addr, victim.peer_id)
                connect_s = time.perf_counter() - t
                await conn.close()
                await gone(peer)
                return connect_s

            async def run_probe() -> None:
                try:
                    connect_s = await cycle(probe)
                    ok = True
                except Exception:
                    connect_s, ok = float("nan"), False
                probes.append({"cycles": done, "ok": ok, "connect_ms": round(connect_s * 1000, 1),
                               "elapsed_s": round(time.perf_counter() - t0, 1),
                               "rss_mb": round(rss_mb(), 1),
                               "slots_borrowed": int(swarm._inbound_limiter.borrowed_tokens)})
                print(f"  after {done:>6} cycles: probe {'ok' if ok else 'REFUSED'} "
                      f"{connect_s * 1000:6.1f} ms, {time.perf_counter() - t0:7.1f} s, "
                      f"RSS {rss_mb():6.1f} MB, slots borrowed "
                      f"{int(swarm._inbound_limiter.borrowed_tokens)}", flush=True)

            async def churner(peer) -> None:
                nonlocal done, failures
                while done < args.cycles:
                    done += 1
                    n = done
                    try:
                        await cycle(peer)
                    except Exception:
                        failures += 1
                    if n % args.every == 0:
                        await run_probe()

            with trio.fail_after(args.timeout):
                async with trio.open_nursery() as churn:
                    for peer in churners:
                        churn.start_soon(churner, peer)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            await run_probe()
            result = {
                "bench": "conn_churn", "cycles": done, "churners": args.churners,
                "failed_cycles": failures, "wall_s": round(wall, 1),
                "cycles_per_s": round(done / wall, 1), "cpu_s": round(cpu, 1),
                "cpu_ms_per_cycle_both_sides": round(cpu / done * 1000, 2),
                "rss_mb_start": round(rss0, 1), "rss_mb_end": round(rss_mb(), 1),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "slots_borrowed_end": int(swarm._inbound_limiter.borrowed_tokens),
                "per_ip_open_end": dict(swarm.p2p_conn_limits.per_ip),
                "per_peer_open_end": len(swarm.p2p_conn_limits.per_peer),
                "provider_connections_end": sum(len(c) for c in swarm.connections.values()),
                "provider_inbound_counted": victim.counters["p2p.conn.inbound"],
                "probes_refused": sum(not p["ok"] for p in probes),
                "python": platform.python_version(), "cpus": os.cpu_count(),
            }
            nursery.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--churners", type=int, default=8)
    parser.add_argument("--every", type=int, default=1000, help="probe dial every N cycles")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    result = trio.run(main, args)
    print(f"{result['cycles']} connect/drop cycles ({result['failed_cycles']} failed) in "
          f"{result['wall_s']} s ({result['cycles_per_s']}/s), CPU {result['cpu_s']} s "
          f"({result['cpu_ms_per_cycle_both_sides']} ms per cycle, both sides); probes refused: "
          f"{result['probes_refused']}; inbound slots borrowed at the end: "
          f"{result['slots_borrowed_end']}; RSS {result['rss_mb_start']} -> {result['rss_mb_end']} MB")
    print(json.dumps(result))
