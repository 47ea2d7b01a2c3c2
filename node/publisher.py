"""A provider's offer on the market (specs/node.md is the prose twin).

:class:`OfferPublisher` turns the GPU probe's facts into one signed offer for the whole
inventory, publishes it on the node's :class:`~node.offers.OfferService` topic under a token
bucket, re-announces it with ``seq + 1`` at 2/3 of its lifetime, withdraws it when told and on
shutdown, and reserves every sequence number in the store before using it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from node.gpu import GpuProbe, NoGpuError, StaticFacts
from node.identity import NodeIdentity
from node.offers import OfferService
from node.ratelimit import TokenBucket, take_token
from protocol.encoding import to_wire_text
from protocol.identity import PeerKey
from protocol.messages import Binding, GpuInfo, HostInfo, Offer, OfferTerms, OfferWithdrawal
from protocol.validation import check_offer_static

log = logging.getLogger(__name__)


def _clip(text: str, limit: int) -> str:
    """Wire text (printable ASCII, specs/wire.md) of at most ``limit`` bytes."""
    return to_wire_text(text, limit)


def offer_facts(facts: StaticFacts, *, region: str, bandwidth_mbps: int) -> tuple[tuple[GpuInfo, ...], HostInfo]:
    """The probe's facts as the offer's GPU list and host info. Raises NoGpuError without GPUs."""
    if not facts.gpus:
        raise NoGpuError("the probe described no GPU; a provider needs at least one to offer")
    gpus = tuple(
        GpuInfo(
            model=_clip(g.model, 64),
            uuid_digest=g.uuid_sha256,
            vram_mib=g.vram_mib,
            cc_major=g.compute_capability[0],
            cc_minor=g.compute_capability[1],
            driver_version=_clip(facts.driver_version, 32),
            cuda_version=facts.cuda_driver_version,
            pcie_gen=g.pcie_generation or 0,  # 0: NVML did not report it
            pcie_width=g.pcie_width or 0,
            power_limit_w=min(g.power_limit_w or 0, 65535),
        )
        for g in facts.gpus
    )
    host = HostInfo(
        cpu_cores=min(facts.host.cpu_cores, 65535),
        ram_mib=facts.host.ram_mib,
        disk_gib=facts.host.disk_free_gib,
        bandwidth_mbps=bandwidth_mbps,
        region=_clip(region, 32),
    )
    return gpus, host


@dataclass(frozen=True)
class ProviderConfig:
    terms: OfferTerms
    region: str
    bandwidth_mbps: int
    lifetime_ms: int = 30 * 60 * 1000
    reannounce_at: float = 2 / 3  # fraction of the lifetime after which seq + 1 is published
    publish_interval_s: float = 10.0  # token bucket: one publication per interval ...
    publish_burst: int = 3  # ... with this burst (offers and withdrawals alike)
    addrs: tuple[str, ...] = ()  # where renters dial us, each ending in /p2p/<our peer id>
    images: tuple[str, ...] = ()  # container images rentals run in (node/runtime.py)
    data_dir: str = "."


@dataclass
class _Live:
    seq: int
    digest: bytes
    created_ms: int


class OfferPublisher:
    """A provider's offer on the topic; run with ``await nursery.start(pub.run)`` after the
    node's :class:`OfferService` is running. ``run`` probes the GPUs first and raises
    :class:`NoGpuError` (before ``started``) when there is nothing to offer."""

    def __init__(
        self,
        service: OfferService,
        identity: NodeIdentity,
        binding: Binding,
        config: ProviderConfig,
        *,
        probe: Callable[[], StaticFacts] | None = None,
        nvml: object | None = None,
    ) -> None:
        self.service = service
        self.key = PeerKey.from_signing_key(identity.signing_key)
        if binding.peer_key != self.key.public:
            raise ValueError("the wallet binding is for another peer key")
        self.binding = binding
        self.config = config
        self._probe = probe or (lambda: _probe_static(nvml, config.data_dir))
        self._bucket: TokenBucket | None = None  # made in run(): it reads trio's clock
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self.live: _Live | None = None
        self.last_seq: int | None = None
        self.gpus: tuple[GpuInfo, ...] = ()
        self.interruptible: tuple = ()  # InterruptibleGpus sets of the offer (node/spot.py)
        self.host_info: HostInfo | None = None

    @property
    def _seq_name(self) -> str:
        return f"provider.offer_seq.{self.key.public.hex()}"

    async def run(self, *, task_status: trio.TaskStatus[OfferPublisher] = trio.TASK_STATUS_IGNORED) -> None:
        self._bucket = TokenBucket(1 / self.config.publish_interval_s, self.config.publish_burst,
                                   trio.current_time())
        facts = await trio.to_thread.run_sync(self._probe)
        self.gpus, self.host_info = offer_facts(facts, region=self.config.region,
                                                bandwidth_mbps=self.config.bandwidth_mbps)
        try:
            await self.publish()
            task_status.started(self)
            while True:
                self._wake = trio.Event()
                if self.live is None:
                    await self._wake.wait()
                    continue
                due = self.live.created_ms + int(self.config.lifetime_ms * self.config.reannounce_at)
                with trio.move_on_after(max(0.0, (due - self.service.now_ms()) / 1000)) as scope:
                    await self._wake.wait()
                if scope.cancelled_caught:
                    await self.publish()
        finally:
            if self.live is not None:
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    try:
                        await self.withdraw(rate_limited=False)
                    except Exception:
                        log.exception("withdrawing the offer on shutdown failed")

    async def _token(self) -> None:
        if self._bucket is None:
            raise RuntimeError("OfferPublisher used before run()")
        await take_token(self._bucket)

    async def publish(self) -> Offer:
        """Publish the current inventory as a new offer (seq + 1); waits for a token."""
        svc = self.service
        async with self._lock:
            await self._token()
            now = svc.now_ms()
            if svc.store is None:
                raise RuntimeError("a provider needs a store to persist its offer sequence")
            seq = await svc.store.next_sequence(self._seq_name, first=now)
            self.last_seq = seq
            assert self.host_info is not None, "publish() before run() probed the GPUs"
            offer = Offer(
                provider=self.key.public, seq=seq, created_ms=now,
                expires_ms=now + self.config.lifetime_ms, gpus=self.gpus, host=self.host_info,
                terms=self.config.terms, binding=self.binding, addrs=self.config.addrs, images=self.config.images,
                interruptible=self.interruptible,
            ).sign(self.key)
            check_offer_static(offer, svc.params)  # our own configuration error: raise here
            data = offer.encode()
            await svc.host.publish(svc.config.topic, data)
            digest = hashlib.sha256(data).digest()
            held = svc.book.held(self.key.public)
            if held is None or held.digest != digest:
                log.warning("our own validator did not accept offer seq %d; see counters", seq)
            self.live = _Live(seq, digest, now)
            svc.count("offers.published")
            self._wake.set()
            return offer

    async def withdraw(self, *, rate_limited: bool = True) -> OfferWithdrawal | None:
        """Withdraw the live offer (capacity rented, or shutdown). Returns None if none is live."""
        svc = self.service
        async with self._lock:
            if self.live is None:
                return None
            if rate_limited:
                await self._token()
            msg = OfferWithdrawal(provider=self.key.public, seq=self.live.seq,
                                  created_ms=svc.now_ms()).sign(self.key)
            await svc.host.publish(svc.config.topic, msg.encode())
            self.live = None
            svc.count("offers.withdrawn")
            self._wake.set()
            return msg


def _probe_static(nvml: object | None, data_dir: str) -> StaticFacts:
    with GpuProbe(nvml) as probe:
        return probe.static_facts(data_dir)


__all__ = ["OfferPublisher", "ProviderConfig", "offer_facts"]
