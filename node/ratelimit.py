"""Small rate limiters for the I/O shell: a token bucket, a bounded per-key set of buckets, a
bounded per-key "at most once per interval", and logging that cannot be turned into a
disk-filling attack.

Why logging needs a limit: a hostile peer controls how often a "bad input" line is written.
One WARNING per bad message at 1,500 messages/s filled 4 MB of log in minutes. Every log line a
peer can trigger goes through :class:`RateLimitedLog` (our code) or :class:`RateLimitFilter`
(py-libp2p's loggers): the first ``burst`` records per key in each ``interval`` are written, the
rest are counted and reported as one summary line when the interval is over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import trio

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; starts full. Sans-I/O: the caller
    passes ``now`` (a clock that steps back refills nothing)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float, cost: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait_time(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are banked (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


async def take_token(bucket: TokenBucket) -> None:
    """Wait on trio's clock until ``bucket`` has a token, then take it."""
    for _ in range(1000):  # bounded; each wait is the exact refill time
        now = trio.current_time()
        if bucket.take(now):
            return
        await trio.sleep(max(bucket.wait_time(now), 0.001))
    raise RuntimeError("token bucket never refilled")


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a peer id), memory bounded by ``max_keys``: when full,
    buckets that have refilled completely (idle keys, indistinguishable from new ones) are
    dropped first, and if none have, the oldest entries go."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096,
                 clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[Hashable, TokenBucket] = {}

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now, cost)

    def tokens(self, key: Hashable) -> float:
        """Tokens ``key`` has now (a full bucket for an unknown key)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        now = self.clock()
        return min(self.burst, bucket.tokens + (now - bucket.stamp) * bucket.rate)

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        idle = [k for k, b in self._buckets.items() if b.full(now)]
        for k in idle:
            del self._buckets[k]
        overflow = len(self._buckets) - self.max_keys + 1
        if overflow > 0:
            for k in list(self._buckets)[:overflow]:  # dicts keep insertion order: oldest first
                del self._buckets[k]


class PerKeyInterval:
    """At most one run per key (a peer id) per ``interval_s``: ``due`` says whether ``key`` may
    run at ``now``, ``ran`` records that it did (callers that check other limits first mark only
    a run that takes place), ``forget`` lets it run at once. Memory bounded by ``max_keys``:
    when full, keys whose interval is over (indistinguishable from new ones) go first, and if
    none is, the one that ran longest ago. Sans-I/O: the caller passes a monotonic ``now``."""

    def __init__(self, interval_s: float, *, max_keys: int = 4096) -> None:
        if interval_s < 0 or max_keys < 1:
            raise ValueError("a per-key interval needs interval_s >= 0 and max_keys >= 1")
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}  # in the order of the last runs: oldest first

    def due(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        return last is None or now - last >= self.interval_s

    def ran(self, key: Hashable, now: float) -> None:
        self._last.pop(key, None)
        if len(self._last) >= self.max_keys:
            self._evict(now)
        self._last[key] = now

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def __len__(self) -> int:
        return len(self._last)

    def _evict(self, now: float) -> None:
        for k in [k for k, last in self._last.items() if now - last >= self.interval_s]:
            del self._last[k]
        overflow = len(self._last) - self.max_keys + 1
        if overflow > 0:
            for k in list(self._last)[:overflow]:
                del self._last[k]


class _Window:
    __slots__ = ("start", "written", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.written = 0
        self.suppressed = 0


class LogLimiter:
    """Decides, per key, whether a record is written: the first ``burst`` per ``interval``.
    ``admit`` returns ``(write_it, suppressed_in_last_window)``; the caller writes a summary
    line when the second value is non-zero (the window that just ended dropped that many)."""

    def __init__(self, burst: int = 5, interval: float = 60.0, *, max_keys: int = 1024,
                 clock: Clock = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()  # logging may be called from zeroconf's or the store's thread

    def admit(self, key: Hashable) -> tuple[bool, int]:
        now = self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                if len(self._windows) >= self.max_keys:
                    self._windows.clear()  # pathological key churn: start over, still bounded
                w = self._windows[key] = _Window(now)
            dropped = 0
            if now - w.start >= self.interval:
                dropped = w.suppressed
                w.start, w.written, w.suppressed = now, 0, 0
            if w.written < self.burst:
                w.written += 1
                return True, dropped
            w.suppressed += 1
            return False, dropped


class RateLimitedLog:
    """``log.warning(key, msg, *args)``: at most ``burst`` lines per key per ``interval``, then a
    summary ("... N more suppressed") with the first line of the next window. ``key`` names the
    kind of event (e.g. ``"pubsub.malformed_rpc"``), not the peer, so a peer that changes its
    identity per message cannot multiply the budget."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 60.0,
                 *, clock: Clock = time.monotonic) -> None:
        self.logger = logger
        self.limiter = LogLimiter(burst, interval, clock=clock)

    def log(self, level: int, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        write, dropped = self.limiter.admit(key)
        if dropped:
            self.logger.log(level, "%s: %d similar messages suppressed in the last %.0f s",
                            key, dropped, self.limiter.interval)
        if write:
            self.logger.log(level, msg, *args, **kwargs)

    def debug(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, key, msg, *args, **kwargs)

    def info(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, key, msg, *args, **kwargs)

    def warning(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, key, msg, *args, **kwargs)

    def error(self, key: Hashable, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.ERROR, key, msg, *args, **kwargs)


class RateLimitFilter(logging.Filter):
    """A :class:`logging.Filter` for third-party loggers we cannot edit (py-libp2p's): records at
    ``min_level`` or above are limited per call site (file and line: py-libp2p often logs
    f-strings, so the message text differs per peer); below it they pass.
    The summary of a window's suppressed records is added to the next record admitted."""

    def __init__(self, burst: int = 5, interval: float = 60.0, min_level: int = logging.INFO,
                 *, clock: Clock = time.monotonic) -> None:
        super().__init__()
        self.min_level = min_level
        self.limiter = LogLimiter(burst, interval, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        write, dropped = self.limiter.admit((record.pathname, record.lineno))
        if write and dropped:
            record.msg = f"{record.msg} [{dropped} similar records suppressed in the last " \
                         f"{self.limiter.interval:.0f} s]"
        return write
