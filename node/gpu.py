"""GPU probe on NVML (``pynvml`` from the ``nvidia-ml-py`` package) plus host facts.

Static facts go into a provider's offer; live metrics go into heartbeats. The NVML module is a
parameter (default: the real ``pynvml``) so tests and the demo pass :mod:`node.fake_nvml` while the
real path stays the default and untouched.

Privacy: a GPU's UUID identifies the physical card across rentals and owners, so only
``sha256(uuid string)`` (raw 32 bytes) leaves this module.

Failure policy:
* NVML missing, the driver not loaded, init failing, or zero devices -> :class:`NoGpuError`
  (renters need no GPU; a provider must refuse to publish).
* A GPU whose identity query fails (name, UUID, memory, compute capability) is left out of the
  static facts and listed in ``skipped`` with the NVML error; if every GPU fails that way,
  :class:`NoGpuError`. An offer must not advertise a card we cannot describe.
* Optional facts (PCIe link, power limit) and every live metric are ``None`` when NVML refuses
  that one query (NOT_SUPPORTED on many consumer cards, GPU_IS_LOST, ...): a heartbeat reports
  what it can.

PCIe: the *max* link generation/width is reported (the card/slot capability); the *current* link
downtrains at idle (a PCIe 5 card idles at gen 1), which would make an offer change with load.
The current link is the fallback when max is not supported.

NVML calls block (milliseconds); the node calls the probe through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import psutil

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
T = TypeVar("T")


class NoGpuError(Exception):
    """No usable NVIDIA GPU here (no driver, no NVML library, or no device); message says which."""


@dataclass(frozen=True)
class GpuFacts:
    index: int
    model: str
    uuid_sha256: bytes  # sha256 of the UUID string; never the UUID itself
    vram_mib: int
    compute_capability: tuple[int, int]
    pcie_generation: int | None
    pcie_width: int | None
    power_limit_w: int | None


@dataclass(frozen=True)
class HostFacts:
    cpu_cores: int
    ram_mib: int
    disk_free_gib: int


@dataclass(frozen=True)
class StaticFacts:
    driver_version: str
    cuda_driver_version: int  # as NVML reports it: 12040 = CUDA 12.4
    gpus: tuple[GpuFacts, ...]
    host: HostFacts
    skipped: tuple[tuple[int, str], ...] = ()  # (index, reason) of GPUs left out


@dataclass(frozen=True)
class GpuMetrics:
    index: int
    utilization_pct: int | None
    memory_used_mib: int | None
    temperature_c: int | None
    power_mw: int | None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def host_facts(data_dir: str | os.PathLike[str]) -> HostFacts:
    """CPU cores (logical, what a container can be given), RAM, free disk at ``data_dir``."""
    return HostFacts(
        cpu_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_mib=psutil.virtual_memory().total // MIB,
        disk_free_gib=shutil.disk_usage(os.fspath(data_dir)).free // GIB,
    )


class GpuProbe:
    """Open with ``with GpuProbe() as probe:``; NVML is initialised once and shut down on exit."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._open = False

    def __enter__(self) -> GpuProbe:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # nvidia-ml-py not installed
                raise NoGpuError("the nvidia-ml-py package (pynvml) is not installed") from exc
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NoGpuError(self._init_message(exc)) from exc
        self._open = True
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self.close()
            raise NoGpuError(f"NVML cannot count GPUs: {exc}") from exc
        if count == 0:
            self.close()
            raise NoGpuError("the NVIDIA driver is loaded but reports no GPU")
        self._count = count

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)

    def _init_message(self, exc: Exception) -> str:
        nvml = self._nvml
        code = getattr(exc, "value", None)
        if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return "no NVIDIA driver: the NVML library (libnvidia-ml.so) was not found"
        if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return "the NVIDIA kernel driver is not loaded"
        if code == nvml.NVML_ERROR_NO_PERMISSION:
            return "no permission to access the NVIDIA driver"
        return f"NVML failed to initialise: {exc}"

    def _handles(self) -> list[tuple[int, Any]]:
        if not self._open:
            raise RuntimeError("GpuProbe used before open() or after close()")
        nvml = self._nvml
        out = []
        for i in range(self._count):
            try:
                out.append((i, nvml.nvmlDeviceGetHandleByIndex(i)))
            except nvml.NVMLError as exc:
                log.warning("GPU %d: no handle: %s", i, exc)
                out.append((i, exc))
        return out

    def _optional(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def static_facts(self, data_dir: str | os.PathLike[str]) -> StaticFacts:
        """Facts for an offer; raises NoGpuError if no GPU can be described."""
        nvml = self._nvml
        gpus, skipped = [], []
        for index, handle in self._handles():
            if isinstance(handle, Exception):
                skipped.append((index, f"no handle: {handle}"))
                continue
            try:
                model = _text(nvml.nvmlDeviceGetName(handle))
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                vram = nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            except nvml.NVMLError as exc:
                log.warning("GPU %d left out of the offer: %s", index, exc)
                skipped.append((index, str(exc)))
                continue
            gen = self._optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)
            if gen is None:
                gen = self._optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
            width = self._optional(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)
            if width is None:
                width = self._optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
            limit_mw = self._optional(nvml.nvmlDeviceGetPowerManagementLimit, handle)
            if limit_mw is None:
                limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            gpus.append(
                GpuFacts(
                    index=index,
                    model=model,
                    uuid_sha256=hashlib.sha256(uuid.encode()).digest(),
                    vram_mib=int(vram),
                    compute_capability=(int(major), int(minor)),
                    pcie_generation=gen,
                    pcie_width=width,
                    power_limit_w=None if limit_mw is None else int(limit_mw) // 1000,
                )
            )
        if not gpus:
            reasons = "; ".join(f"GPU {i}: {r}" for i, r in skipped)
            raise NoGpuError(f"no GPU could be described ({reasons})")
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        except nvml.NVMLError as exc:
            raise NoGpuError(f"NVML cannot report the driver version: {exc}") from exc
        return StaticFacts(driver, cuda, tuple(gpus), host_facts(data_dir), tuple(skipped))

    def live_metrics(self) -> list[GpuMetrics]:
        """One sample per GPU for a heartbeat; a refused query gives None for that field."""
        nvml = self._nvml
        out = []
        for index, handle in self._handles():
            if isinstance(handle, Exception):
                out.append(GpuMetrics(index, None, None, None, None))
                continue
            util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            mem = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            out.append(
                GpuMetrics(
                    index=index,
                    utilization_pct=None if util is None else int(util.gpu),
                    memory_used_mib=None if mem is None else int(mem.used) // MIB,
                    temperature_c=self._optional(
                        nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
                    ),
                    power_mw=self._optional(nvml.nvmlDeviceGetPowerUsage, handle),
                )
            )
        return out
