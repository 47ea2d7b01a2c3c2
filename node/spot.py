"""Interruptible capacity on the node (issue 18): which GPUs are sold as interruptible, the power
price watch that curtails them, preemption of the running interruptible rentals, and the
renter's `--on-preempt` hook.

The provider splits its GPUs: the last `interruptible_gpus` of its inventory (NVML order) form
one interruptible set with `interruptible_notice_s` and its own (lower) price; the rest are
on-demand. When the curtailment rule fires, every serving interruptible rental gets a notice
(stop = now + notice), service ends at the stop (the rental machine), the interruptible GPUs
leave the offer until the rule resumes, and `status` shows why (`curtailment`).

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
from protocol.messages import InterruptibleGpus, PreemptionNotice, PreemptionReason
from protocol.rental import State

from protocol.money import PriceError, price_units_per_second

from .config import ConfigError
from .power import CurtailmentRule, PowerWatch, PricePoint, price_source

log = logging.getLogger(__name__)

PREEMPT_HOOK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SpotSettings:
    """The provider's interruptible split and its power-price curtailment."""

    interruptible_gpus: int = 0  # the last N GPUs are sold as interruptible
    notice_s: int = 60  # least notice promised before a preemption
    price_per_gpu_hour: Decimal | None = None  # whole tokens; below the on-demand price
    power_source: str = ""  # a schedule file (.csv / .json) or an http(s) URL; "" = no watch
    power_poll_s: float = 60.0
    curtail_above_per_mwh: Decimal | None = None
    resume_below_per_mwh: Decimal | None = None

    @classmethod
    def from_section(cls, section: Any) -> "SpotSettings | None":
        """From the [provider] section (node.config.ProviderSection); None when it uses neither."""
        if not section.interruptible_gpus and not section.power_price_source:
            return None
        try:
            return cls(section.interruptible_gpus, section.interruptible_notice_s,
                       section.interruptible_price_per_gpu_hour, section.power_price_source,
                       section.power_poll_s, section.curtail_above_per_mwh, section.resume_below_per_mwh)
        except ValueError as exc:
            raise ConfigError(f"provider: {exc}") from None

    def __post_init__(self) -> None:
        if self.interruptible_gpus < 0 or self.notice_s < 1 or self.power_poll_s <= 0:
            raise ValueError("interruptible_gpus >= 0, notice_s >= 1 and power_poll_s > 0")
        if self.interruptible_gpus and self.price_per_gpu_hour is None:
            raise ValueError("interruptible GPUs need an interruptible price_per_gpu_hour")
        if self.power_source and (self.curtail_above_per_mwh is None or self.resume_below_per_mwh is None):
            raise ValueError("a power source needs curtail_above_per_mwh and resume_below_per_mwh")
        if self.power_source and not self.resume_below_per_mwh < self.curtail_above_per_mwh:
            raise ValueError("resume_below_per_mwh must be below curtail_above_per_mwh (hysteresis)")


class SpotMixin:
    """Node methods for interruptible capacity (mixed into node.node.Node)."""

    spot: SpotSettings | None = None
    spot_gpus: frozenset[bytes] = frozenset()
    spot_price_units: int = 0
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
        if spot.interruptible_gpus:
            if spot.interruptible_gpus > len(self._all_gpus):
                raise ConfigError(f"provider.interruptible_gpus: {spot.interruptible_gpus} of "
                                  f"{len(self._all_gpus)} GPUs")
            try:
                self.spot_price_units = price_units_per_second(spot.price_per_gpu_hour, decimals)
            except PriceError as exc:
                raise ConfigError(f"provider.interruptible_price_per_gpu_hour: {exc}") from None
            if not 0 < self.spot_price_units < on_demand_price:
                raise ConfigError("provider.interruptible_price_per_gpu_hour must be below "
                                  "price_per_gpu_hour")
            self.spot_gpus = frozenset(g.uuid_digest for g in self._all_gpus[-spot.interruptible_gpus:])
        if spot.power_source:
            rule = CurtailmentRule(spot.curtail_above_per_mwh, spot.resume_below_per_mwh)
            self.power_watch = PowerWatch(price_source(spot.power_source), rule, spot.power_poll_s,
                                          self.clock.time, self._curtail, self._resume_spot)
            nursery.start_soon(self.power_watch.run)

    def _spot_offer(self, free_gpus: Sequence[Any]) -> tuple[tuple[Any, ...], tuple[InterruptibleGpus, ...]]:
        """The GPUs the offer lists and its interruptible set: while curtailed the interruptible
        GPUs are left out altogether."""
        if self.spot is None or not self.spot_gpus:
            return tuple(free_gpus), ()
        if self.curtailment is not None:
            return tuple(g for g in free_gpus if g.uuid_digest not in self.spot_gpus), ()
        spot = tuple(g.uuid_digest for g in free_gpus if g.uuid_digest in self.spot_gpus)
        if not spot:
            return tuple(free_gpus), ()
        return tuple(free_gpus), (InterruptibleGpus(spot, self.spot.notice_s, self.spot_price_units),)

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
