"""Discrete-event engine: a virtual clock in integer milliseconds and a heap of events.

Nothing here reads the wall clock. Events with equal times run in the order they were scheduled
(the heap key is (time, sequence)). Randomness: one global seed; every named stream (a node, the
network, the chain) gets its own `random.Random` seeded from sha256(seed, name) -- never from
Python's `hash()`, which changes from process to process.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from typing import Any, Callable

# The virtual clock's zero: 2026-01-01T00:00:00Z in unix ms (offers carry unix-ms timestamps).
EPOCH_MS = 1_767_225_600_000


def derive_seed(seed: int, name: str) -> int:
    """A 64-bit seed for the stream `name` under the global `seed` (stable across processes)."""
    digest = hashlib.sha256(f"gpumarket-sim/v1/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def stream_rng(seed: int, name: str) -> random.Random:
    return random.Random(derive_seed(seed, name))


class Engine:
    """`at(t, fn, *args)` schedules `fn(*args)` at virtual time t (ms since EPOCH_MS is added
    by callers through `now`); `run(until)` pops events in (time, sequence) order."""

    __slots__ = ("now", "_heap", "_seq", "events", "_stop")

    def __init__(self, start_ms: int = EPOCH_MS) -> None:
        self.now = start_ms
        self._heap: list[tuple[int, int, Callable[..., Any], tuple]] = []
        self._seq = 0
        self.events = 0
        self._stop = False

    def at(self, t: int, fn: Callable[..., Any], *args: Any) -> None:
        if t < self.now:
            t = self.now
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, delay_ms: int, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay_ms, fn, *args)

    def pending(self) -> int:
        return len(self._heap)

    def stop(self) -> None:
        self._stop = True

    def run(self, until_ms: int) -> None:
        """Run every event with time <= until_ms; the clock ends at until_ms."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until_ms and not self._stop:
            t, _, fn, args = pop(heap)
            self.now = t
            self.events += 1
            fn(*args)
        if not self._stop:
            self.now = max(self.now, until_ms)
