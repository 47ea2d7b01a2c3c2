"""Child process for the crash test: write heartbeats and receipts forever, report each commit.

A line ``hb <seq> <hex raw>`` or ``rc <acked> <hex raw>`` is printed (and flushed) only after the
store call returned, i.e. after COMMIT. The parent SIGKILLs us at a random moment.
"""

import hashlib
import os
import sys
import time

import trio

from node.store import Store

AGREEMENT = b"A" * 32


async def main(path: str, start: int) -> None:
    store = await Store.open(path)
    if await store.get_agreement(AGREEMENT) is None:
        await store.put_agreement(AGREEMENT, "provider", "active", b"terms", time.time())
    print("ready", flush=True)
    for seq in range(start, start + 1_000_000):
        raw = os.urandom(64 + seq % 200)  # varying sizes exercise page splits
        assert await store.put_heartbeat(AGREEMENT, seq, raw, hashlib.sha256(raw).digest(), time.time())
        print(f"hb {seq} {raw.hex()}", flush=True)
        if seq % 5 == 0:
            rraw = os.urandom(97)
            assert await store.put_receipt(AGREEMENT, seq * 10, rraw, time.time())
            print(f"rc {seq * 10} {rraw.hex()}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
