"""Idle CPU of connected nodes, patched (node/libp2p_perf.py) and unpatched: CPU per second and
trio task steps per second, by task, with no messages.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_idle_cpu.py
Three GossipHosts in one process on 127.0.0.1, fully connected, subscribed to one topic; after
the meshes form and 2 s of settling, ``--seconds`` of idle: ``time.process_time()`` (divided by
3: per node) and the task steps of every task (a busy loop or a short timer shows up as a task
with many steps per second). Each variant in its own trio run; one JSON line last.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.testing import LOOPBACK, settle_meshes


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.on = False

    def before_task_step(self, task) -> None:
        if self.on:
            self.steps[task.name] += 1


async def measure(fast: bool, seconds: float) -> dict:
    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    nodes = [GossipHost(NodeIdentity.from_seed(bytes([i + 1]) * 32),
                        HostConfig(listen_addrs=LOOPBACK, fast_gossip=fast)) for i in range(3)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
            await node.subscribe("/gpumarket/bench/idle")
        await nodes[0].connect_all([str(nodes[1].addrs()[0]), str(nodes[2].addrs()[0])])
        await nodes[1].connect_all([str(nodes[2].addrs()[0])])
        await settle_meshes(nodes, "/gpumarket/bench/idle", timeout=5, d_low=2)
        await trio.sleep(2)
        steps.on = True
        cpu0 = time.process_time()
        await trio.sleep(seconds)
        cpu = time.process_time() - cpu0
        steps.on = False
        nursery.cancel_scope.cancel()
    return {"patched": fast, "cpu_ms_per_s_per_node": round(1000 * cpu / seconds / 3, 2),
            "steps_per_s": round(sum(steps.steps.values()) / seconds, 1),
            "steps_per_s_by_task": {name[:80]: round(n / seconds, 1)
                                    for name, n in steps.steps.most_common(8)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    load = os.getloadavg()
    results = [trio.run(measure, fast, args.seconds) for fast in (False, True)]
    for r in results:
        print(f"{'patched' if r['patched'] else 'unpatched':9} {r['cpu_ms_per_s_per_node']} ms/s "
              f"per node, {r['steps_per_s']} task steps/s", flush=True)
    print(json.dumps({"bench": "idle_cpu", "seconds": args.seconds, "results": results,
                      "loadavg_before": [round(x, 2) for x in load],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
