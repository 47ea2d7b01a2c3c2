"""What a provider hands the renter when a rental starts, and takes back when it ends.

A `Runtime` turns an open agreement into something the renter can use and tears it down at
every end (specs/runtime.md). Two implementations:

- `DockerRuntime`: one container per agreement, from an image in `provider.images`, limited to
  exactly the rented GPUs (a `DeviceRequest` with their NVML UUIDs) and to the rented share of
  the host's CPUs, memory and processes; no privileges, every capability dropped, no host
  mounts (only an optional per-rental scratch volume), labelled with the agreement id and the
  provider's peer id. The Docker SDK is blocking: every call runs on a worker thread
  (trio.to_thread), as the chain client's do. Podman's Docker-compatible socket takes the same
  calls (`DOCKER_HOST`).
- `HookRuntime`: the provider's own access hook (a command given the agreement as JSON on
  stdin; what it prints is the access text), for custom setups.

`container_config()` is a pure function of the rental and the settings, so the limits and the
GPU request are tested without a daemon.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

LABEL_AGREEMENT = "gpumarket.agreement"  # the agreement id, hex
LABEL_PROVIDER = "gpumarket.provider"  # the provider node's peer id: one daemon, many nodes
LABEL_RENTER = "gpumarket.renter"  # the renter's peer id (for the operator; not trusted)
SCRATCH_PATH = "/scratch"
NETWORK_NAME = "gpumarket"  # bridge for rental containers: no traffic between containers
BRIDGE_NAME = "gpumarket0"
DOCKER_TIMEOUT_S = 60.0  # one Engine API call (creating a container on vfs takes seconds)


class RuntimeError_(Exception):
    """The runtime could not start or stop a rental; str() is one line."""


@dataclass(frozen=True)
class RentalSpec:
    """One rental as a runtime needs it."""

    agreement_id: bytes
    renter_peer_id: str
    renter_wallet: bytes
    gpu_digests: tuple[bytes, ...]  # sha256 of each rented GPU's UUID (what the agreement names)
    gpu_uuids: tuple[str, ...]  # the same GPUs' NVML UUID strings, in the same order
    share: float  # rented GPUs / all GPUs of this provider, in (0, 1]
    max_seconds: int
    access_key: str
    image: str = ""  # "" = the provider's default (its first allowed image)

    @property
    def hex(self) -> str:
        return self.agreement_id.hex()


class Runtime(Protocol):
    name: str

    async def prepare(self) -> None:
        """Once, before the first rental (check the daemon, create the network)."""

    async def start(self, spec: RentalSpec) -> str:
        """Make the rental usable; return the access text for the renter. Idempotent: a rental
        whose container already runs (a restarted node resuming it) keeps it. Raises
        RuntimeError_."""

    async def stop(self, agreement_id: bytes) -> None:
        """Tear the rental down (idempotent; nothing left afterwards)."""

    async def alive(self, agreement_id: bytes) -> bool:
        """Whether the rental's environment still runs."""

    async def warn_stop(self, agreement_id: bytes) -> bool:
        """Service stops soon (a preemption notice went out): tell the renter's processes now
        (SIGTERM), so that they can checkpoint; the environment itself keeps running until
        `stop`. Whether anything was told."""

    async def reconcile(self, live: set[bytes]) -> dict[str, list[str]]:
        """At start: keep what belongs to `live` agreements, remove the rest of ours."""


# -- the access hook --------------------------------------------------------------------------


@dataclass
class HookRuntime:
    """The provider's own command: given the agreement as JSON on stdin, prints the access
    text. It has no stop (the hook is the provider's business), so stop and reconcile do
    nothing and a rental is taken to live as long as its agreement."""

    command: Sequence[str]
    timeout_s: float = 30.0
    name: str = "hook"

    async def prepare(self) -> None:
        return None

    async def start(self, spec: RentalSpec) -> str:
        doc = json.dumps({
            "agreement_id": spec.hex,
            "renter_wallet": "0x" + spec.renter_wallet.hex(),
            "renter_peer_id": spec.renter_peer_id,
            "gpus": [g.hex() for g in spec.gpu_digests],
            "max_seconds": spec.max_seconds,
            "access_key": spec.access_key,
        })
        try:
            with trio.fail_after(self.timeout_s):
                out = await trio.run_process(list(self.command), stdin=doc.encode(),
                                             capture_stdout=True, capture_stderr=True, check=False)
        except (trio.TooSlowError, OSError) as exc:
            raise RuntimeError_(f"access hook failed: {exc!r}") from None
        if out.returncode != 0:
            raise RuntimeError_(f"access hook exited {out.returncode}: "
                                f"{out.stderr.decode(errors='replace')[-200:]}")
        text = out.stdout.decode(errors="replace").strip()
        if not text:
            raise RuntimeError_("access hook printed nothing")
        return text

    async def stop(self, agreement_id: bytes) -> None:
        return None

    async def alive(self, agreement_id: bytes) -> bool:
        return True

    async def warn_stop(self, agreement_id: bytes) -> bool:
        return False  # the hook's environment is the provider's own business

    async def reconcile(self, live: set[bytes]) -> dict[str, list[str]]:
        return {}


# -- Docker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerSettings:
    """The [provider] keys for the Docker runtime (node/config.py), resolved."""

    images: tuple[str, ...]  # images a renter may choose; the first is the default
    gpus: str = "nvidia"  # "nvidia": DeviceRequest for the rented UUIDs; "none": no GPU (tests)
    network: str = "bridge"  # "bridge": outbound allowed, not to the host or other rentals; "none"
    cpus: float = 0.0  # CPUs handed out over all GPUs (0: every core of the host)
    memory_mib: int = 0  # memory handed out over all GPUs (0: 90% of the host's)
    pids: int = 4096  # processes handed out over all GPUs
    scratch: bool = False  # a per-rental volume at /scratch, removed at teardown
    cap_add: tuple[str, ...] = ()  # CUDA needs none; only what the provider chooses to allow
    # The container's command. It ignores SIGTERM (an ignored signal stays ignored across exec),
    # so that `warn_stop` can send SIGTERM to every process of the container and the container
    # itself lives on until the stop.
    keepalive: tuple[str, ...] = ("sh", "-c", "trap '' TERM; exec sleep 2147483647")
    block_host: bool = True  # bridge: drop traffic from rentals to the host's own addresses


def host_cpus() -> float:
    return float(os.cpu_count() or 1)


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@dataclass(frozen=True)
class Limits:
    nano_cpus: int
    memory_bytes: int
    pids: int


def share_limits(settings: DockerSettings, share: float) -> Limits:
    """The rented share of the CPUs, memory and processes handed out (rounded down, at least
    0.01 CPU, 64 MiB and 16 processes)."""
    if not 0 < share <= 1:
        raise ValueError(f"share {share} not in (0, 1]")
    cpus = settings.cpus or host_cpus()
    memory_mib = settings.memory_mib or int(host_memory_mib() * 0.9)
    return Limits(nano_cpus=max(10_000_000, int(cpus * share * 1e9)),
                  memory_bytes=max(64, math.floor(memory_mib * share)) * 1024 * 1024,
                  pids=max(16, math.floor(settings.pids * share)))


def container_name(agreement_id: bytes) -> str:
    return f"gpumarket-{agreement_id.hex()[:16]}"


def scratch_volume(agreement_id: bytes) -> str:
    return f"gpumarket-scratch-{agreement_id.hex()[:16]}"


def container_config(spec: RentalSpec, settings: DockerSettings, provider_peer_id: str) -> dict[str, Any]:
    """Keyword arguments for docker's `containers.create` (the high-level SDK call)."""
    import docker.types

    image = spec.image or settings.images[0]
    if image not in settings.images:
        raise RuntimeError_(f"image {image!r} is not one this provider offers")
    limits = share_limits(settings, spec.share)
    config: dict[str, Any] = {
        "image": image,
        "command": list(settings.keepalive),
        "name": container_name(spec.agreement_id),
        "labels": {LABEL_AGREEMENT: spec.hex, LABEL_PROVIDER: provider_peer_id,
                   LABEL_RENTER: spec.renter_peer_id},
        "detach": True,
        "init": True,  # a real PID 1 that reaps the renter's processes and forwards signals
        "privileged": False,
        "cap_drop": ["ALL"],
        "cap_add": list(settings.cap_add) or None,
        "security_opt": ["no-new-privileges:true"],
        "nano_cpus": limits.nano_cpus,
        "mem_limit": limits.memory_bytes,
        "memswap_limit": limits.memory_bytes,  # no swap beyond the memory limit
        "pids_limit": limits.pids,
        "network_mode": NETWORK_NAME if settings.network == "bridge" else "none",
        "mounts": [],
        "environment": {"GPUMARKET_AGREEMENT": spec.hex},
        "hostname": "rental",
        "stop_signal": "SIGKILL",  # teardown must not wait for the renter's processes
    }
    if settings.scratch:
        config["mounts"] = [docker.types.Mount(SCRATCH_PATH, scratch_volume(spec.agreement_id),
                                               type="volume", labels={LABEL_AGREEMENT: spec.hex})]
    if settings.gpus == "nvidia":
        # Exactly the agreement's GPUs, by UUID (never by index: indices change across reboots)
        config["device_requests"] = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=list(spec.gpu_uuids),
            capabilities=[["gpu", "compute", "utility"]])]
        config["environment"]["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpu_uuids)
    return config


@dataclass
class DockerRuntime:
    """One container per agreement (see the module docstring)."""

    settings: DockerSettings
    provider_peer_id: str
    base_url: str | None = None  # None: DOCKER_HOST or the default socket
    name: str = "docker"
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(4))
    host_blocked: bool = False  # whether traffic from the bridge to the host is dropped
    _client: Any = None

    # Every SDK call goes through here: one worker thread per call, bounded in number.
    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(DOCKER_TIMEOUT_S):
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.limiter,
                                                 abandon_on_cancel=True)

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            self._client = (docker.DockerClient(base_url=self.base_url, timeout=int(DOCKER_TIMEOUT_S))
                            if self.base_url else docker.from_env(timeout=int(DOCKER_TIMEOUT_S)))
        return self._client

    async def prepare(self) -> None:
        import docker.errors

        try:
            await self._call(self.client.ping)
        except Exception as exc:
            raise RuntimeError_(f"the Docker daemon does not answer: {exc}") from None
        if self.settings.network == "bridge":
            await self._call(self._ensure_network)
            if self.settings.block_host:
                self.host_blocked = await trio.to_thread.run_sync(block_host_traffic, BRIDGE_NAME)
                if not self.host_blocked:
                    log.warning("could not drop traffic from rental containers to this host "
                                "(iptables as root is needed): they can reach its ports")
        missing = []
        for image in self.settings.images:
            try:
                await self._call(self.client.images.get, image)
            except docker.errors.ImageNotFound:
                missing.append(image)
        if missing:
            log.warning("offered images not present locally (a rental would pull them): %s", missing)

    def _ensure_network(self) -> None:
        import docker.errors

        try:
            self.client.networks.get(NETWORK_NAME)
        except docker.errors.NotFound:
            try:
                self.client.networks.create(NETWORK_NAME, driver="bridge", options={
                    # containers on this bridge cannot talk to each other
                    "com.docker.network.bridge.enable_icc": "false",
                    "com.docker.network.bridge.name": BRIDGE_NAME,
                }, labels={LABEL_PROVIDER: "shared"})
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # another node created it meanwhile
                    raise

    # The low-level listing (dicts: Id, State, Labels): the high-level one inspects each
    # container after listing and fails when one is removed in between.
    def _find(self, agreement_id: bytes) -> dict | None:
        found = self.client.api.containers(all=True, filters={"label": [
            f"{LABEL_AGREEMENT}={agreement_id.hex()}", f"{LABEL_PROVIDER}={self.provider_peer_id}"]})
        return found[0] if found else None

    def _remove(self, container_id: str) -> None:
        import docker.errors

        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: its removal is already in progress
                raise

    def _start_blocking(self, spec: RentalSpec) -> str:
        import docker.errors

        existing = self._find(spec.agreement_id)
        if existing is not None:
            if existing["State"] == "running":
                return existing["Id"]  # resumed after a restart: the renter keeps its files
            self._remove(existing["Id"])
        config = container_config(spec, self.settings, self.provider_peer_id)
        try:
            container = self.client.containers.run(**config)
        except docker.errors.APIError as exc:
            raise RuntimeError_(f"creating the container failed: {exc.explanation or exc}") from None
        return container.id

    async def start(self, spec: RentalSpec) -> str:
        try:
            cid = await self._call(self._start_blocking, spec)
        except RuntimeError_:
            raise
        except Exception as exc:
            raise RuntimeError_(f"docker: {exc}") from None
        log.info("rental %s: container %s", spec.hex[:12], cid[:12])
        return (f"container {cid[:12]} ({spec.image or self.settings.images[0]}); "
                f"reach it with: gpumarket shell {spec.hex[:16]}")

    def _stop_blocking(self, agreement_id: bytes) -> None:
        import docker.errors

        container = self._find(agreement_id)
        if container is not None:
            self._remove(container["Id"])
        if self.settings.scratch:
            try:
                self.client.volumes.get(scratch_volume(agreement_id)).remove(force=True)
            except docker.errors.NotFound:
                pass

    async def stop(self, agreement_id: bytes) -> None:
        await self._call(self._stop_blocking, agreement_id)
        log.info("rental %s: container removed", agreement_id.hex()[:12])

    async def alive(self, agreement_id: bytes) -> bool:
        container = await self._call(self._find, agreement_id)
        return container is not None and container["State"] == "running"

    def _warn_stop_blocking(self, agreement_id: bytes) -> bool:
        container = self._find(agreement_id)
        if container is None or container["State"] != "running":
            return False
        # kill(-1) from inside: every process of the container's PID namespace but PID 1 (the
        # init) and the caller; the keepalive ignores it. As the container's root user, which
        # without CAP_KILL reaches the processes running as root (the renter's execs).
        ex = self.client.api.exec_create(container["Id"], ["sh", "-c", "kill -TERM -1"], user="0")
        self.client.api.exec_start(ex["Id"])  # attached: returns when the kill has run
        return self.client.api.exec_inspect(ex["Id"]).get("ExitCode") == 0

    async def warn_stop(self, agreement_id: bytes) -> bool:
        try:
            told = await self._call(self._warn_stop_blocking, agreement_id)
        except Exception as exc:
            log.warning("rental %s: SIGTERM to the container failed: %r", agreement_id.hex()[:12], exc)
            return False
        log.info("rental %s: SIGTERM sent to the container's processes (preemption notice)",
                 agreement_id.hex()[:12])
        return told

    async def container_id(self, agreement_id: bytes) -> str | None:
        container = await self._call(self._find, agreement_id)
        return None if container is None or container["State"] != "running" else container["Id"]

    async def container_ip(self, agreement_id: bytes) -> str | None:
        """The running container's address on the rental bridge (None without a network)."""
        container = await self._call(self._find, agreement_id)
        if container is None or container["State"] != "running":
            return None
        nets = (container.get("NetworkSettings") or {}).get("Networks") or {}
        return (nets.get(NETWORK_NAME) or {}).get("IPAddress") or None

    def _ours(self) -> list[dict]:
        return self.client.api.containers(all=True, filters={"label": [
            f"{LABEL_PROVIDER}={self.provider_peer_id}"]})

    async def reconcile(self, live: set[bytes]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"kept": [], "removed": []}
        live_hex = {a.hex() for a in live}
        for container in await self._call(self._ours):
            aid = (container.get("Labels") or {}).get(LABEL_AGREEMENT, "")
            if aid in live_hex and container["State"] == "running":
                out["kept"].append(aid)
                continue
            try:
                await self.stop(bytes.fromhex(aid))
            except ValueError:  # a label that is not an agreement id: remove it anyway
                await self._call(self._remove, container["Id"])
            out["removed"].append(aid)
        return out


def block_host_traffic(bridge: str) -> bool:
    """Drop packets from the rental bridge to this host's own addresses (INPUT), so a renter
    cannot reach the provider's ports; replies to connections the host made are let through.
    Idempotent. False where iptables cannot be run (not root, not installed)."""
    import subprocess

    rule = ["INPUT", "-i", bridge, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"]
    try:
        check = subprocess.run(["iptables", "-C", *rule], capture_output=True, timeout=10)
        if check.returncode == 0:
            return True
        added = subprocess.run(["iptables", "-I", *rule], capture_output=True, timeout=10)
        return added.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def nvml_uuids(nvml: Any) -> dict[bytes, str]:
    """sha256(UUID) -> UUID for every GPU NVML lists (the agreement names GPUs by digest; the
    container runtime needs the UUID itself)."""
    import hashlib

    out: dict[bytes, str] = {}
    nvml.nvmlInit()
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            out[hashlib.sha256(uuid.encode()).digest()] = uuid
    finally:
        nvml.nvmlShutdown()
    return out
