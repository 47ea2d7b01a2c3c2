"""Gossip one-way latency across N real hosts in one process on 127.0.0.1 (first data point).

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_gossip_baseline.py
Each host dials ``--degree`` random others (seeded); after the mesh settles, ``--messages``
messages are published from rotating hosts at ``--rate`` per second. Every receiver records
(receive time - publish time) with one shared monotonic clock. Prints a summary, then one JSON
line (the last line). All hosts share the process and its 2 cores: this measures py-libp2p's CPU
cost as much as the network.
"""

import argparse
import json
import os
import platform
import random
import time

import trio

from node.host import GossipConfig, HostConfig
from node.testing import connect_pairs, running_hosts

TOPIC = "/gpumarket/bench/offers"


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else None


async def main(args):
    rng = random.Random(args.seed)
    n = args.hosts
    pairs = set()
    for i in range(n):
        for j in rng.sample([k for k in range(n) if k != i], args.degree):
            if (j, i) not in pairs:
                pairs.add((i, j))
    pairs = sorted(pairs)
    config = HostConfig(gossip=GossipConfig(max_messages_per_peer_per_second=50.0))
    received = {}  # (msg index, host index) -> latency seconds
    sent_at = {}

    async with running_hosts(n, config) as hosts:
        subs = [await h.subscribe(TOPIC) for h in hosts]
        t0 = time.perf_counter()
        await connect_pairs(hosts, pairs)
        connect_s = time.perf_counter() - t0
        await trio.sleep(args.settle)  # a few 1 s heartbeats to fill meshes
        mesh_sizes = [len(h.mesh_peers(TOPIC)) for h in hosts]

        async def reader(k, sub):
            while True:
                msg = await sub.get()
                idx = int(msg.data.split(b":", 1)[0])
                received.setdefault((idx, k), time.perf_counter() - sent_at[idx])

        async with trio.open_nursery() as nursery:
            for k, sub in enumerate(subs):
                nursery.start_soon(reader, k, sub)
            for m in range(args.messages):
                publisher = hosts[m % n]
                sent_at[m] = time.perf_counter()
                await publisher.publish(TOPIC, b"%d:" % m + os.urandom(args.size))
                await trio.sleep(1 / args.rate)
            with trio.move_on_after(5):  # drain: bounded wait for stragglers
                while len(received) < args.messages * n:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    # the publisher's own delivery is local; count only the other n-1 receivers
    remote = {key: v for key, v in received.items() if key[1] != key[0] % n}
    lat_ms = [v * 1000 for v in remote.values()]
    per_msg_all = []
    for m in range(args.messages):
        got = [remote.get((m, k)) for k in range(n) if k != m % n]
        if all(x is not None for x in got):
            per_msg_all.append(max(got) * 1000)
    expected = args.messages * (n - 1)
    result = {
        "bench": "gossip_baseline", "hosts": n, "dial_degree": args.degree, "links": len(pairs),
        "messages": args.messages, "rate_per_s": args.rate, "payload_bytes": args.size + 4,
        "connect_all_s": round(connect_s, 3), "mesh_sizes": mesh_sizes,
        "delivered": len(remote), "expected": expected,
        "one_way_p50_ms": round(pct(lat_ms, 50), 2) if lat_ms else None,
        "one_way_p95_ms": round(pct(lat_ms, 95), 2) if lat_ms else None,
        "one_way_max_ms": round(max(lat_ms), 2) if lat_ms else None,
        "to_all_p50_ms": round(pct(per_msg_all, 50), 2) if per_msg_all else None,
        "to_all_p95_ms": round(pct(per_msg_all, 95), 2) if per_msg_all else None,
        "python": platform.python_version(), "cpus": os.cpu_count(), "seed": args.seed,
    }
    print(f"{n} hosts, {len(pairs)} links, meshes {mesh_sizes}: delivered {len(remote)}/{expected};"
          f" one-way p50 {result['one_way_p50_ms']} ms p95 {result['one_way_p95_ms']} ms;"
          f" to all p50 {result['to_all_p50_ms']} ms p95 {result['to_all_p95_ms']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    trio.run(main, parser.parse_args())
