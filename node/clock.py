"""The node's one clock. Everything in node/ that needs the wall time asks a `Clock`; a `Node`
takes one (`NodeConfig.clock`) and hands its `now_ms` to the desks, sessions and services it
builds, so a test can run a node on another clock. protocol/ never reads time: callers pass it."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Clock:
    """Wall-clock time; `offset_ms` shifts it (e.g. a test's node whose clock runs ahead)."""

    offset_ms: int = 0

    def time(self) -> float:
        """Unix seconds."""
        return time.time() + self.offset_ms / 1000

    def now_ms(self) -> int:
        """Unix milliseconds."""
        return int(time.time() * 1000) + self.offset_ms


SYSTEM_CLOCK = Clock()


def now_ms() -> int:
    """The system clock's Unix milliseconds (the default everywhere a clock is injectable)."""
    return SYSTEM_CLOCK.now_ms()
