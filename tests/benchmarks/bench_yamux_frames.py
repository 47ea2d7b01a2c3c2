"""CPU per DATA frame in yamux's frame loop: py-libp2p's ``Yamux.handle_incoming`` against
node/libp2p_perf.py's (item 17: the same loop without its per-frame DEBUG f-strings).

Both run on :class:`BatchedYamux` (its other items, e.g. 16's lock, in both), so the only
difference is the loop: "upstream" is ``BatchedYamux`` with ``Yamux.handle_incoming`` put back.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_yamux_frames.py
One process, no sockets: each loop reads ``--frames`` 750-byte DATA frames (after one SYN) from
an in-memory connection that hands out 64 KiB per read, while a task empties the stream's
buffer. ``time.process_time()`` per frame, rounds alternating upstream and patched; the JSON
line (last) has both lists and the load average. Everything but the loop itself (the reads,
the draining task) is the same in both, so the difference is the loop's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time

import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.libp2p_perf import BatchedYamux


class MemoryConn:
    is_initiator = True

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        take = min(n or 65536, 65536)
        out = bytes(self._data[self._at:self._at + take])
        self._at += len(out)
        return out

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        pass


class UpstreamLoop(BatchedYamux):
    handle_incoming = Yamux.handle_incoming


def frame(typ: int, flags: int, stream_id: int, body: bytes | int) -> bytes:
    length = body if isinstance(body, int) else len(body)
    payload = b"" if isinstance(body, int) else body
    return struct.pack(yamux_module.YAMUX_HEADER_FORMAT, 0, typ, flags, stream_id,
                       length) + payload


async def loop_cost(muxer_class, data: bytes, frames: int) -> float:
    muxed = muxer_class(MemoryConn(data), ID(b"\x00\x02pp"), is_initiator=True)
    cpu0 = time.process_time()
    async with trio.open_nursery() as nursery:
        async def drain() -> None:
            while not muxed.event_shutting_down.is_set():
                buffer = muxed.stream_buffers.get(2)
                if buffer:
                    buffer.clear()
                stream = muxed.streams.get(2)
                if stream is not None:
                    stream.recv_window = stream.target_recv_window
                await trio.sleep(0)

        nursery.start_soon(drain)
        await muxed.handle_incoming()
    return 1e6 * (time.process_time() - cpu0) / frames


async def main(args) -> None:
    data = frame(yamux_module.TYPE_WINDOW_UPDATE, yamux_module.FLAG_SYN, 2, 0) + frame(
        yamux_module.TYPE_DATA, 0, 2, b"d" * args.size) * args.frames
    load = os.getloadavg()
    result: dict[str, list[float]] = {"upstream": [], "patched": []}
    for _ in range(args.rounds):
        result["upstream"].append(round(await loop_cost(UpstreamLoop, data, args.frames), 2))
        result["patched"].append(round(await loop_cost(BatchedYamux, data, args.frames), 2))
        print(f"us per DATA frame: upstream {result['upstream'][-1]}, "
              f"patched {result['patched'][-1]}", flush=True)
    print(json.dumps({"bench": "yamux_frames", "args": vars(args), "us_per_data_frame": result,
                      "loadavg_before": [round(x, 2) for x in load],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=750)
    ap.add_argument("--rounds", type=int, default=3)
    trio.run(main, ap.parse_args())
