"""Interruptible capacity on the node (issue 18): which GPUs are sold as interruptible, the power
price watch that curtails them, preemption of the running interruptible rentals, and the
renter's `--on-preempt` hook.

The provider splits its GPUs into on-demand ones and up to 8 interruptible sets, each with its
own notice and (lower) price: `[[provider.interruptible]]` tables, or the shorthand
`interruptible_gpus` / `interruptible_notice_s` / `interruptible_price_per_gpu_hour` for one
set. Sets take GPUs from the end of the inventory (NVML order) in the order written: the first
set the last GPUs. When the curtailment rule fires, every serving interruptible rental gets a
notice with its own agreement's notice (stop = now + notice_s), service ends at the stop (the
rental machine), every interruptible set leaves the offer until the rule resumes, and `status`
shows why (`curtailment`).

When a notice goes out, `on_preemption_notice` has the runtime send the container's processes
SIGTERM at once (so the renter's job can checkpoint: specs/runtime.md 1.4); the container is
removed at StopService("preempted"), at the notice's stop.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Sequence

import trio

from protocol.effects import Report
from protocol.messages import (MAX_INTERRUPTIBLE_SETS, InterruptibleGpus, PreemptionNotice,
                               PreemptionReason)
from protocol.rental import State

from protocol.money import PriceError, price_units_per_second

from .config import ConfigError, InterruptibleSet
from .power import CurtailmentRule, PowerWatch, PricePoint, price_source

log = logging.getLogger(__name__)

PREEMPT_HOOK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SpotSettings:
    """The provider's interruptible sets and its power-price curtailment."""

    interruptible_gpus: int = 0  # shorthand for one set: the last N GPUs ...
    notice_s: int = 60  # ... with this least notice before a preemption ...
    price_per_gpu_hour: Decimal | None = None  # ... at this price (whole tokens, below on-demand)
    power_source: str = ""  # a schedule file (.csv / .json) or an http(s) URL; "" = no watch
    power_poll_s: float = 60.0
    curtail_above_per_mwh: Decimal | None = None
    resume_below_per_mwh: Decimal | None = None
    sets: tuple[InterruptibleSet, ...] = ()  # several sets ([[provider.interruptible]])

    @classmethod
    def from_section(cls, section: Any) -> "SpotSettings | None":
        """From the [provider] section (node.config.ProviderSection); None when it uses neither."""
        if not section.interruptible_gpus and not section.power_price_source \
                and not section.interruptible:
            return None
        try:
            return cls(section.interruptible_gpus, section.interruptible_notice_s,
                       section.interruptible_price_per_gpu_hour, section.power_price_source,
                       section.power_poll_s, section.curtail_above_per_mwh,
                       section.resume_below_per_mwh, tuple(section.interruptible))
        except ValueError as exc:
            raise ConfigError(f"provider: {exc}") from None

    def __post_init__(self) -> None:
        if self.interruptible_gpus < 0 or self.notice_s < 1 or self.power_poll_s <= 0:
            raise ValueError("interruptible_gpus >= 0, notice_s >= 1 and power_poll_s > 0")
        if self.interruptible_gpus and self.price_per_gpu_hour is None:
            raise ValueError("interruptible GPUs need an interruptible price_per_gpu_hour")
        if self.interruptible_gpus and self.sets:
            raise ValueError("interruptible_gpus describes one set, [[provider.interruptible]] "
                             "several: use one or the other")
        if len(self.sets) > MAX_INTERRUPTIBLE_SETS:
            raise ValueError(f"at most {MAX_INTERRUPTIBLE_SETS} interruptible sets")
        if len({s.notice_s for s in self.sets}) != len(self.sets):
            raise ValueError("two interruptible sets with one notice_s (a renter picks a set by it)")
        if any(s.gpus < 1 or s.notice_s < 1 or s.price_per_gpu_hour <= 0 for s in self.sets):
            raise ValueError("each interruptible set needs gpus >= 1, notice_s >= 1 and a price")
        if self.power_source and (self.curtail_above_per_mwh is None or self.resume_below_per_mwh is None):
            raise ValueError("a power source needs curtail_above_per_mwh and resume_below_per_mwh")
        if self.power_source and not self.resume_below_per_mwh < self.curtail_above_per_mwh:
            raise ValueError("resume_below_per_mwh must be below curtail_above_per_mwh (hysteresis)")

    @property
    def all_sets(self) -> tuple[InterruptibleSet, ...]:
        """Every interruptible set, the shorthand's one included."""
        if self.interruptible_gpus:
            assert self.price_per_gpu_hour is not None
            return (InterruptibleSet(self.interruptible_gpus, self.notice_s, self.price_per_gpu_hour),)
        return self.sets


@dataclass(frozen=True)
class SpotSet:
    """An interruptible set as the node sells it: its GPUs, notice and price in token units."""

    gpus: tuple[bytes, ...]  # uuid digests, inventory order
    notice_s: int
    price_units: int  # per GPU-second


def split_sets(sets: Sequence[InterruptibleSet], inventory: Sequence[bytes], decimals: int,
               on_demand_price: int) -> tuple[SpotSet, ...]:
    """Give each set its GPUs from the end of `inventory`, in order, with its price in units;
    ConfigError when the sets need more GPUs than there are or a price is not below on-demand."""
    need = sum(s.gpus for s in sets)
    if need > len(inventory):
        raise ConfigError(f"provider.interruptible: the sets need {need} GPUs, this node has "
                          f"{len(inventory)}")
    out, end = [], len(inventory)
    for i, s in enumerate(sets):
        where = "provider.interruptible_price_per_gpu_hour" if len(sets) == 1 \
            else f"provider.interruptible[{i}].price_per_gpu_hour"
        try:
            units = price_units_per_second(s.price_per_gpu_hour, decimals)
        except PriceError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not 0 < units < on_demand_price:
            raise ConfigError(f"{where} must be below price_per_gpu_hour")
        out.append(SpotSet(tuple(inventory[end - s.gpus:end]), s.notice_s, units))
        end -= s.gpus
    return tuple(out)


class SpotMixin:
    """Node methods for interruptible capacity (mixed into node.node.Node)."""

    spot: SpotSettings | None = None
    spot_sets: tuple[SpotSet, ...] = ()
    spot_gpus: frozenset[bytes] = frozenset()  # every interruptible set's GPUs
    curtailment: dict | None = None  # while curtailed: {"reason", "price_per_mwh", "since_ms"}
    power_watch: PowerWatch | None = None
    on_preempt: Sequence[str] | None = None  # renter: command run when a notice arrives

    # -- provider ------------------------------------------------------------------------------

    async def _spot_start(self, nursery: trio.Nursery, spot: SpotSettings | None, decimals: int,
                          on_demand_price: int) -> None:
        """Split the inventory and start the power watch (after the publisher probed the GPUs)."""
        self.spot = spot
        if spot is None:
            return
        self.spot_sets = split_sets(spot.all_sets, [g.uuid_digest for g in self._all_gpus],
                                    decimals, on_demand_price)
        self.spot_gpus = frozenset(g for s in self.spot_sets for g in s.gpus)
        if spot.power_source:
            rule = CurtailmentRule(spot.curtail_above_per_mwh, spot.resume_below_per_mwh)
            self.power_watch = PowerWatch(price_source(spot.power_source), rule, spot.power_poll_s,
                                          self.clock.time, self._curtail, self._resume_spot)
            nursery.start_soon(self.power_watch.run)

    def _spot_offer(self, free_gpus: Sequence[Any]) -> tuple[tuple[Any, ...], tuple[InterruptibleGpus, ...]]:
        """The GPUs the offer lists and its interruptible sets (those with a free GPU, in config
        order): while curtailed the interruptible GPUs are left out altogether."""
        if self.spot is None or not self.spot_gpus:
            return tuple(free_gpus), ()
        if self.curtailment is not None:
            return tuple(g for g in free_gpus if g.uuid_digest not in self.spot_gpus), ()
        free = {g.uuid_digest for g in free_gpus}
        sets = tuple(InterruptibleGpus(tuple(g for g in s.gpus if g in free), s.notice_s, s.price_units)
                     for s in self.spot_sets if free & set(s.gpus))
        return tuple(free_gpus), sets

    async def _curtail(self, point: PricePoint) -> None:
        self.curtailment = {"reason": "power_price", "price_per_mwh": str(point.per_mwh),
                            "since_ms": self.clock.now_ms()}
        log.info("%s: power price %s/MWh above %s: curtailing interruptible rentals",
                 self.config.name, point.per_mwh, self.spot.curtail_above_per_mwh)
        await self.preempt_interruptible(PreemptionReason.POWER_PRICE,
                                         f"power price {point.per_mwh} per MWh")
        self._offer_changed()

    async def _resume_spot(self, point: PricePoint) -> None:
        log.info("%s: power price %s/MWh below %s: interruptible GPUs offered again",
                 self.config.name, point.per_mwh, self.spot.resume_below_per_mwh)
        self.curtailment = None
        self._offer_changed()

    async def preempt_interruptible(self, reason: PreemptionReason, detail: str) -> list[bytes]:
        """Send a notice to every serving interruptible rental: service stops `notice_s` from
        now. Returns the agreement ids preempted."""
        done = []
        for aid, rental in list(self.rentals.items()):
            session = rental.session
            if rental.role != "provider" or session is None or rental.details.notice_s == 0:
                continue
            if session.machine.state is not State.SERVING:
                continue
            # None also when the agreement ends before the stop anyway
            notice = await session.preempt(rental.details.notice_s * 1000, reason, detail)
            if notice is not None:
                done.append(aid)
                await self.on_preemption_notice(rental, notice)
        return done

    async def on_preemption_notice(self, rental: Any, notice: PreemptionNotice) -> None:
        """A notice went out: the runtime tells the rental's processes at once (the Docker
        runtime: SIGTERM to every process of the container, which keeps running), so that the
        renter's job can checkpoint; the container is removed at StopService("preempted"),
        which the machine emits at notice.stop_ms. In the background: one slow daemon must not
        hold up the other rentals' notices."""
        rental.events.append("PreemptionNotice")
        if getattr(self, "runtime", None) is not None:
            self._nursery.start_soon(self._warn_runtime, rental)

    async def _warn_runtime(self, rental: Any) -> None:
        if await self.runtime.warn_stop(rental.agreement_id):
            rental.events.append("SIGTERM")

    # -- renter --------------------------------------------------------------------------------

    async def _renter_report(self, rental: Any, report: Report) -> None:
        """A renter session's report: run `on_preempt` when a preemption notice arrives, with the
        notice in its environment (GPUMARKET_AGREEMENT, _STOP_MS, _REASON, _REMAINING_MS)."""
        if report.event != "preemption_notice" or not self.on_preempt:
            return
        env = {"GPUMARKET_AGREEMENT": rental.agreement_id.hex(),
               "GPUMARKET_STOP_MS": str(report.detail["stop_ms"]),
               "GPUMARKET_REASON": str(report.detail["reason"]),
               "GPUMARKET_REMAINING_MS": str(report.detail["remaining_ms"])}
        self._nursery.start_soon(_run_hook, list(self.on_preempt), env)


async def _run_hook(command: list[str], env: dict[str, str]) -> None:
    import os

    try:
        with trio.move_on_after(PREEMPT_HOOK_TIMEOUT_S):
            done = await trio.run_process(command, env={**os.environ, **env}, check=False,
                                          capture_stdout=True, capture_stderr=True)
            if done.returncode != 0:
                log.warning("on-preempt %s exited %d", shlex.join(command), done.returncode)
    except OSError as exc:
        log.warning("on-preempt %s failed: %s", shlex.join(command), exc)
