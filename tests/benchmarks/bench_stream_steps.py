"""CPU and trio scheduling steps per 750-byte message on one libp2p stream, patched vs unpatched.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_stream_steps.py
(defaults: 3,000 messages per variant, two rounds alternating unpatched and patched).

Two GossipHosts on 127.0.0.1 in one process (``HostConfig(fast_gossip=...)``); one writes
``--messages`` messages of ``--size`` bytes on a stream, the other reads them. Per message:
``us_per_msg`` (``time.process_time()``, both ends: NetStream, yamux, Noise and TCP each way)
and ``steps_per_msg``, the trio task steps of all tasks (each scheduling point passed is one
step; the lock passes that node/libp2p_perf.py items 9-10 remove show up here exactly, while
CPU time on a shared machine is noisy). Prints one line per round, then one JSON line (last).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio
from libp2p.custom_types import TProtocol

from node.host import HostConfig
from node.testing import LOOPBACK, running_hosts

PROTOCOL = TProtocol("/gpumarket/bench/stream-steps/1")


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.n = 0

    def before_task_step(self, task) -> None:
        self.n += 1


async def measure(fast: bool, messages: int, size: int) -> dict:
    async with running_hosts(2, HostConfig(listen_addrs=LOOPBACK, fast_gossip=fast)) as (a, b):
        done = trio.Event()

        async def sink(stream) -> None:
            got = 0
            while got < (messages + 1) * size:
                data = await stream.read(65536)
                if not data:
                    break
                got += len(data)
            done.set()

        b.host.set_stream_handler(PROTOCOL, sink)
        await a.connect(b.addrs()[0])
        stream = await a.host.new_stream(b.peer_id, [PROTOCOL])
        await stream.write(os.urandom(size))  # stream set up before the window
        await trio.sleep(0.2)
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        cpu0 = time.process_time()
        for i in range(messages):
            await stream.write(os.urandom(size))
            if i % 4 == 3:
                await trio.sleep(0)  # let the reader keep up
        with trio.fail_after(60):
            await done.wait()
        cpu = time.process_time() - cpu0
        trio.lowlevel.remove_instrument(steps)
    return {"patched": fast, "us_per_msg": round(1e6 * cpu / messages, 1),
            "steps_per_msg": round(steps.n / messages, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=750)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        for fast in (False, True):
            r = trio.run(measure, fast, args.messages, args.size)
            print(f"{'patched' if fast else 'unpatched':10} {r['us_per_msg']} us/msg  "
                  f"{r['steps_per_msg']} task steps/msg", flush=True)
            rounds.append(r)
    print(json.dumps({"bench": "stream_steps", "args": vars(args), "rounds": rounds,
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
