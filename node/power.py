"""A provider's power price and its curtailment rule (issue 18).

A source gives the current price per MWh: a local schedule (CSV or JSON, the shape of a real-time
price feed: timestamp, price per MWh) or an HTTP endpoint polled at an interval that answers
JSON in the same shape. The rule has hysteresis: interruptible rentals stop when the price goes
above `stop_above` and come back only once it is below `resume_below` (< `stop_above`), so that
a noisy price near one threshold does not flap. `PowerWatch` polls the source and calls the
node's `on_curtail(price)` / `on_resume(price)`; a feed that fails or answers garbage is logged,
counted and leaves the state as it was.

Formats (specs/node.md, "Power price and curtailment"):
- CSV: a header row with `timestamp` and `price_per_mwh` columns (others ignored), `#` comments;
- JSON: one object `{"timestamp": ..., "price_per_mwh": ...}` or a list of them.
`timestamp` is unix seconds (number) or ISO 8601 with a zone (`2026-12-03T14:00:00Z`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

MAX_FEED_BYTES = 1 << 20  # an HTTP answer or a schedule file larger than this is refused
MAX_PRICE = Decimal(10**7)  # USD/MWh; real-time prices cap at a few thousand (ERCOT: 5 000)


class PowerFeedError(Exception):
    """A schedule or feed answer that cannot be read: what is wrong, and where."""


@dataclass(frozen=True, order=True)
class PricePoint:
    ts_s: float  # unix seconds
    per_mwh: Decimal  # currency units per MWh (may be negative: real-time prices go below 0)


def _timestamp(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise PowerFeedError(f"{where}: timestamp {value!r} is not a time")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise PowerFeedError(f"{where}: timestamp {value!r} is neither unix seconds nor ISO 8601") from None
            if dt.tzinfo is None:
                raise PowerFeedError(f"{where}: timestamp {value!r} has no time zone")
            ts = dt.timestamp()
    else:
        raise PowerFeedError(f"{where}: timestamp {value!r} is not a time")
    if not math.isfinite(ts) or ts < 0:
        raise PowerFeedError(f"{where}: timestamp {value!r} out of range")
    return ts


def _price(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PowerFeedError(f"{where}: price {value!r} is not a number")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise PowerFeedError(f"{where}: price {value!r} is not a number") from None
    if not price.is_finite() or abs(price) > MAX_PRICE:
        raise PowerFeedError(f"{where}: price {value!r} out of range")
    return price


def _point(obj: object, where: str) -> PricePoint:
    if not isinstance(obj, dict) or "timestamp" not in obj or "price_per_mwh" not in obj:
        raise PowerFeedError(f"{where}: expected an object with timestamp and price_per_mwh")
    return PricePoint(_timestamp(obj["timestamp"], where), _price(obj["price_per_mwh"], where))


MAX_JSON_DEPTH = 8  # a list of flat objects needs 2; deeper nesting is refused unparsed


def _json_depth(text: str) -> int:
    """The deepest bracket nesting outside strings (the C json parser can exhaust the stack on
    deeply nested input before any RecursionError)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where: str = "feed") -> list[PricePoint]:
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise PowerFeedError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PowerFeedError(f"{where}: not JSON ({exc})") from None
    items = doc if isinstance(doc, list) else [doc]
    return sorted(_point(o, f"{where}[{i}]") for i, o in enumerate(items))


def parse_csv(text: str, where: str = "schedule") -> list[PricePoint]:
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    if not reader.fieldnames or not {"timestamp", "price_per_mwh"} <= set(reader.fieldnames):
        raise PowerFeedError(f"{where}: the header needs timestamp and price_per_mwh columns")
    return sorted(_point(row, f"{where} row {i + 2}") for i, row in enumerate(reader))


class SchedulePrice:
    """A price schedule: the price at `now` is the last point at or before it."""

    def __init__(self, points: list[PricePoint]) -> None:
        if not points:
            raise PowerFeedError("the schedule has no prices")
        self.points = sorted(points)

    @classmethod
    def load(cls, path: str | Path) -> "SchedulePrice":
        path = Path(path).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PowerFeedError(f"{path}: {exc.strerror}") from None
        if len(data) > MAX_FEED_BYTES:
            raise PowerFeedError(f"{path}: larger than {MAX_FEED_BYTES} bytes")
        text = data.decode("utf-8", errors="replace")
        parse = parse_json if path.suffix.lower() == ".json" else parse_csv
        return cls(parse(text, str(path)))

    async def price(self, now_s: float) -> PricePoint | None:
        current = None
        for p in self.points:
            if p.ts_s > now_s:
                break
            current = p
        return current


class HttpPrice:
    """An HTTP endpoint answering JSON points; the newest point not in the future is the price."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise PowerFeedError(f"{url!r}: not an http(s) URL")
        self.url, self.timeout_s = url, timeout_s

    def _get(self) -> bytes:
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:  # noqa: S310 (http(s) only)
            data = resp.read(MAX_FEED_BYTES + 1)
        if len(data) > MAX_FEED_BYTES:
            raise PowerFeedError(f"{self.url}: answer larger than {MAX_FEED_BYTES} bytes")
        return data

    async def price(self, now_s: float) -> PricePoint | None:
        try:
            with trio.fail_after(self.timeout_s + 1):
                data = await trio.to_thread.run_sync(self._get, abandon_on_cancel=True)
        except (OSError, trio.TooSlowError) as exc:
            raise PowerFeedError(f"{self.url}: {exc}") from None
        points = [p for p in parse_json(data.decode("utf-8", errors="replace"), self.url)
                  if p.ts_s <= now_s + 60]  # a feed's clock may run a little ahead
        return points[-1] if points else None


def price_source(spec: str) -> SchedulePrice | HttpPrice:
    """`http(s)://...` polls an endpoint; anything else is a schedule file (.json or CSV)."""
    if spec.startswith(("http://", "https://")):
        return HttpPrice(spec)
    return SchedulePrice.load(spec)


class CurtailmentRule:
    """Stop interruptible rentals above `stop_above`; offer them again below `resume_below`."""

    def __init__(self, stop_above: Decimal, resume_below: Decimal) -> None:
        if not resume_below < stop_above:
            raise ValueError("resume_below must be below stop_above (hysteresis)")
        self.stop_above, self.resume_below = stop_above, resume_below
        self.curtailed = False

    def update(self, price: Decimal) -> str | None:
        """"curtail" or "resume" when the state changes, else None."""
        if not self.curtailed and price > self.stop_above:
            self.curtailed = True
            return "curtail"
        if self.curtailed and price < self.resume_below:
            self.curtailed = False
            return "resume"
        return None


class PowerWatch:
    """Polls a source every `interval_s` and applies the rule; the node's callbacks act on it."""

    def __init__(self, source: SchedulePrice | HttpPrice, rule: CurtailmentRule, interval_s: float,
                 clock: Callable[[], float],
                 on_curtail: Callable[[PricePoint], Awaitable[None]],
                 on_resume: Callable[[PricePoint], Awaitable[None]]) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.source, self.rule, self.interval_s, self.clock = source, rule, interval_s, clock
        self.on_curtail, self.on_resume = on_curtail, on_resume
        self.last: PricePoint | None = None
        self.errors = 0
        self.last_error: str | None = None

    async def poll_once(self) -> str | None:
        try:
            point = await self.source.price(self.clock())
        except PowerFeedError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.warning("power price feed: %s", exc)
            return None
        if point is None:
            return None
        self.last = point
        change = self.rule.update(point.per_mwh)
        if change == "curtail":
            await self.on_curtail(point)
        elif change == "resume":
            await self.on_resume(point)
        return change

    async def run(self) -> None:
        start = trio.current_time()
        n = 0
        while True:  # no drift: poll k at start + k * interval
            await self.poll_once()
            n += 1
            await trio.sleep_until(max(trio.current_time(), start + n * self.interval_s))
