"""Memory of a node serving offer sync to hostile readers (issue 11, item 4).

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_sync_memory.py
This process is the serving node; its book holds ``--offers`` fat offers (64 GPUs, ~9.9 KB each,
valid). A worker process runs ``--readers`` libp2p hosts that each send one 4-byte sync request
at once and read the whole response. The figure is this process's resident memory (VmRSS,
sampled every 10 ms) above what it held just before the requests: what the responses cost the
server. The readers are in another process so their buffers do not count. Prints a summary,
then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

READER = r"""
import os, sys, json, trio
from libp2p.custom_types import TProtocol
from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import SYNC_PROTOCOL, encode_sync_request
from node.reqresp import read_frame, write_frame
from node.testing import LOOPBACK

async def main(addr, n):
    peer = addr.rsplit("/p2p/", 1)[1]
    from libp2p.peer.id import ID
    async with trio.open_nursery() as nursery:
        hosts = [await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                                                HostConfig(listen_addrs=LOOPBACK)).run) for _ in range(n)]
        for h in hosts:
            await h.connect(addr)
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        got = []
        async def one(h):
            s = await h.host.new_stream(ID.from_base58(peer), [TProtocol(SYNC_PROTOCOL)])
            await write_frame(s, encode_sync_request(0))
            total = 0
            with trio.move_on_after(120):
                while True:
                    f = await read_frame(s, max_frame=1 << 20, timeout=60)
                    if f == b"\x90":
                        break
                    total += len(f)
            got.append(total)
        async with trio.open_nursery() as reads:
            for h in hosts:
                reads.start_soon(one, h)
        print(json.dumps({"got": got}), flush=True)
        nursery.cancel_scope.cancel()

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def run(offers: int, readers: int) -> dict:
    from tests.node.offer_helpers import start_node
    from tests.protocol.book_helpers import fat_offer

    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, os.path.join(tmp, "server.db"))
            now = node.service.now_ms()
            for i in range(offers):
                assert node.service.ingest(fat_offer(900_000 + i, now=now).encode(), "bench",
                                           None).value == "accept"
            book_bytes = sum(len(e.data) for e in node.book)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", READER, str(node.host.addrs()[0]), str(readers)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT))
            buf = b""

            async def line() -> dict:
                nonlocal buf
                with trio.fail_after(120):
                    while b"\n" not in buf:
                        chunk = await proc.stdout.receive_some(65536)
                        assert chunk, "reader process exited"
                        buf += chunk
                out, buf = buf.split(b"\n", 1)
                return json.loads(out)

            assert (await line())["ready"]
            await trio.sleep(0.5)
            base = rss()
            peak = base
            done = trio.Event()

            async def sample() -> None:
                nonlocal peak
                for _ in range(60_000):  # 10 minutes at most
                    peak = max(peak, rss())
                    if done.is_set():
                        return
                    await trio.sleep(0.01)

            t0 = time.perf_counter()
            nursery.start_soon(sample)
            await proc.stdin.send_all(b"go\n")
            got = (await line())["got"]
            elapsed = time.perf_counter() - t0
            done.set()
            await proc.stdin.aclose()
            with trio.move_on_after(5):
                await proc.wait()
            nursery.cancel_scope.cancel()
    return {"offers": offers, "book_bytes": book_bytes, "readers": readers,
            "response_bytes": got, "rss_before": base, "rss_peak_above": peak - base,
            "seconds": round(elapsed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offers", type=int, default=1000)
    ap.add_argument("--readers", type=int, default=8)
    args = ap.parse_args()
    r = trio.run(run, args.offers, args.readers)
    print(f"book {r['book_bytes'] / 1e6:.1f} MB in {r['offers']} offers; {r['readers']} readers got "
          f"{sorted(set(r['response_bytes']))} B each in {r['seconds']} s; server RSS "
          f"{r['rss_before'] / 1e6:.0f} MB before, peak +{r['rss_peak_above'] / 1e6:.1f} MB during")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
