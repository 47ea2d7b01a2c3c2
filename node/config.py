"""The node's configuration file (TOML), with defaults and one-line errors.

`gpumarket init` writes one with sane defaults; every key is optional except where noted. Unknown
keys are errors (a typo must not silently fall back to a default). The wallet key is never in
this file: `chain.keystore` names an encrypted eth-account keystore.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("~/.gpumarket").expanduser()
CONFIG_NAME = "config.toml"


class ConfigError(Exception):
    """The configuration file is missing, corrupt, or has a bad value; str() is one line."""


@dataclass(frozen=True)
class ChainSection:
    # "embedded" (an in-process EVM for this node alone), or a JSON-RPC URL (anvil, a testnet)
    rpc: str = "embedded"
    chain_id: int | None = None
    escrow: bytes | None = None
    token: bytes | None = None
    keystore: str = "wallet.json"  # relative to the data directory


@dataclass(frozen=True)
class ProviderSection:
    """The [provider] section: the one source of a provider's settings and their defaults
    (node.node.ProviderSettings derives from it); checked here, once."""

    enabled: bool = False
    price_per_gpu_hour: Decimal = Decimal("0.50")  # whole token units (e.g. USDC)
    min_price_per_gpu_hour: Decimal | None = None  # negotiation floor (default: the price)
    min_duration_s: int = 600
    max_duration_s: int = 7 * 24 * 3600
    heartbeat_interval_s: int = 30
    grace_s: int = 600
    region: str = "unknown"
    bandwidth_mbps: int = 1000
    access_hook: tuple[str, ...] = ()
    fake_gpus: int = 0  # >0: simulated GPUs instead of NVML (demos and tests only)
    # What a rental hands over (node/runtime.py, specs/runtime.md): "docker" (a container per
    # agreement), "hook" (access_hook), or "" (the hook if one is set, else nothing)
    runtime: str = ""
    images: tuple[str, ...] = ()  # docker: images renters may choose (the first: the default)
    docker_gpus: str = "nvidia"  # "nvidia": the rented GPUs by UUID; "none": no GPU (testing)
    docker_network: str = "bridge"  # "bridge": outbound only, not the host; "none": no network
    docker_cpus: float = 0.0  # CPUs shared out over all GPUs (0: all of the host's)
    docker_memory_mib: int = 0  # memory shared out over all GPUs (0: 90% of the host's)
    docker_pids: int = 4096  # processes shared out over all GPUs
    docker_scratch: bool = False  # a per-rental volume at /scratch, removed at teardown
    # Interruptible capacity (node/spot.py, specs/node.md "Power price and curtailment")
    interruptible_gpus: int = 0  # the last N GPUs are sold as interruptible
    interruptible_notice_s: int = 60
    interruptible_price_per_gpu_hour: Decimal | None = None
    power_price_source: str = ""  # schedule file (.csv/.json) or http(s) URL polled
    power_poll_s: float = 60.0
    curtail_above_per_mwh: Decimal | None = None
    resume_below_per_mwh: Decimal | None = None
    # Several interruptible sets ([[provider.interruptible]] tables; instead of the three
    # interruptible_* keys above, which describe one set)
    interruptible: tuple["InterruptibleSet", ...] = ()

    def __post_init__(self) -> None:
        if self.runtime not in ("", "docker", "hook"):
            raise ConfigError(f"provider.runtime: {self.runtime!r} is not docker or hook")
        if self.runtime == "docker" and not self.images:
            raise ConfigError("provider.images: the docker runtime needs at least one image")
        if self.runtime == "hook" and not self.access_hook:
            raise ConfigError("provider.access_hook: the hook runtime needs a command")
        if self.docker_gpus not in ("nvidia", "none"):
            raise ConfigError(f"provider.docker_gpus: {self.docker_gpus!r} is not nvidia or none")
        if self.docker_network not in ("bridge", "none"):
            raise ConfigError(f"provider.docker_network: {self.docker_network!r} is not bridge or none")
        if self.docker_cpus < 0 or self.docker_memory_mib < 0 or self.docker_pids < 16:
            raise ConfigError("provider.docker_cpus/docker_memory_mib must not be negative, "
                              "docker_pids at least 16")
        for image in self.images:  # published in offers as wire text (specs/wire.md)
            if not (image.isascii() and image.isprintable()) or " " in image or not 0 < len(image) <= 128:
                raise ConfigError(f"provider.images: {image!r} must be 1-128 printable ASCII "
                                  f"characters without spaces")
        if len(self.images) > 8:
            raise ConfigError("provider.images: at most 8")
        for key in ("min_duration_s", "max_duration_s", "heartbeat_interval_s", "grace_s",
                    "bandwidth_mbps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"provider.{key}: must be positive")
        if self.fake_gpus < 0:
            raise ConfigError("provider.fake_gpus: must not be negative")
        if self.min_duration_s > self.max_duration_s:
            raise ConfigError("provider.min_duration_s: above max_duration_s")
        if self.min_price_per_gpu_hour is not None and self.min_price_per_gpu_hour > self.price_per_gpu_hour:
            raise ConfigError("provider.min_price_per_gpu_hour: above price_per_gpu_hour")


INTERRUPTIBLE_SET_KEYS = {"gpus": int, "notice_s": int, "price_per_gpu_hour": (str, int, float)}


@dataclass(frozen=True)
class InterruptibleSet:
    """One [[provider.interruptible]] table: `gpus` GPUs sold as interruptible with at least
    `notice_s` of notice before a preemption, at `price_per_gpu_hour` (whole tokens, below the
    on-demand price). Sets take GPUs from the end of the inventory, in the order written."""

    gpus: int
    notice_s: int
    price_per_gpu_hour: Decimal


def parse_interruptible(tables: object) -> tuple[InterruptibleSet, ...]:
    """[[provider.interruptible]] tables, checked: each key known and typed, gpus and notice_s
    positive, a price, a notice no two sets share (a renter names its set by the notice), at
    most 8 sets (one offer carries at most 8)."""
    # what one offer carries; imported here, not at the top: this module stays light (load_config
    # already imports node.reachability, and with it protocol.messages)
    from protocol.messages import MAX_INTERRUPTIBLE_SETS

    where = "provider.interruptible"
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: expected [[provider.interruptible]] tables")
    if len(tables) > MAX_INTERRUPTIBLE_SETS:
        raise ConfigError(f"{where}: {len(tables)} sets, at most {MAX_INTERRUPTIBLE_SETS} "
                          f"(an offer carries at most {MAX_INTERRUPTIBLE_SETS})")
    out: list[InterruptibleSet] = []
    for i, t in enumerate(tables):
        here = f"{where}[{i}]"
        _expect(t, INTERRUPTIBLE_SET_KEYS, here)
        missing = [k for k in INTERRUPTIBLE_SET_KEYS if k not in t]
        if missing:
            raise ConfigError(f"{here}: missing {', '.join(missing)}")
        for key in ("gpus", "notice_s"):
            if t[key] < 1:
                raise ConfigError(f"{here}.{key}: must be at least 1, got {t[key]}")
        price = _decimal(t["price_per_gpu_hour"], f"{here}.price_per_gpu_hour")  # > 0
        if any(o.notice_s == t["notice_s"] for o in out):
            raise ConfigError(f"{here}.notice_s: {t['notice_s']} is already another set's notice "
                              f"(a renter picks a set by its notice: each set needs its own)")
        out.append(InterruptibleSet(t["gpus"], t["notice_s"], price))
    return tuple(out)


@dataclass(frozen=True)
class RenterSection:
    # Arbiter wallets this renter accepts in an offer. An arbiter decides who gets the whole
    # deposit of a disputed agreement and nothing on chain stops a provider from naming its own
    # sock puppet, so the default trusts none: offers that name an arbiter are refused.
    arbiters: tuple[bytes, ...] = ()


# [relay]: node/reachability.py's ReachabilityConfig, key for key (specs/node.md, "Reachability")
RELAY_KEYS: dict[str, type | tuple] = {
    "relay_service": str, "max_reservations": int, "max_reservations_per_ip": int,
    "max_circuits": int, "max_circuits_per_peer": int, "circuit_max_seconds": int,
    "circuit_max_bytes": int, "reservation_ttl_s": int, "relays_to_reserve": int,
    "autonat_servers": int, "autonat_interval_s": (int, float), "hole_punch": bool,
    "hard_nat_punch": bool, "hard_nat_sockets": int, "hard_nat_probes": int,
    "hard_nat_window_s": (int, float), "hard_nat_runs_per_minute": (int, float),
}

# [discovery]: node/discovery.py's DiscoveryConfig, key for key (specs/node.md, "Reachability",
# item 9); seconds and rates may be written as integers
DISCOVERY_KEYS: dict[str, type | tuple] = {
    "enabled": bool, "interval_s": (int, float), "short_interval_s": (int, float),
    "first_round_s": (int, float), "target_peers": int, "queries_per_round": int,
    "dials_per_round": int, "dials_per_ip_per_round": int, "max_peers_per_answer": int,
    "max_addrs_per_peer": int, "max_candidates": int, "retry_s": (int, float),
    "serve_per_peer_per_second": (int, float), "allow_private": bool,
}


@dataclass(frozen=True)
class Config:
    path: Path
    data_dir: Path
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = False
    announce: tuple[str, ...] = ()
    chain: ChainSection = field(default_factory=ChainSection)
    provider: ProviderSection = field(default_factory=ProviderSection)
    renter: RenterSection = field(default_factory=RenterSection)
    relay: dict[str, Any] = field(default_factory=dict)  # [relay] keys given (RELAY_KEYS)
    discovery: dict[str, Any] = field(default_factory=dict)  # [discovery] keys (DISCOVERY_KEYS)

    @property
    def keystore_path(self) -> Path:
        return (self.data_dir / self.chain.keystore).expanduser()


def parse_address(value: Any, where: str) -> bytes:
    """A 0x-prefixed (or bare) 20-byte hex address; ConfigError naming `where` otherwise."""
    text = str(value)
    raw = text[2:] if text.startswith("0x") else text
    try:
        out = bytes.fromhex(raw)
    except ValueError:
        out = b""
    if len(out) != 20:
        raise ConfigError(f"{where}: {text!r} is not a 0x-prefixed 20-byte address")
    return out


def _decimal(value: Any, where: str) -> Decimal:
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: {value!r} is not a number like 0.45") from None
    if not out.is_finite():
        raise ConfigError(f"{where}: {value!r} is not a number like 0.45")
    if out <= 0:
        raise ConfigError(f"{where}: must be positive")
    return out


def _region(value: str) -> str:
    # published in every offer as wire text (specs/wire.md): printable ASCII, at most 32
    if not (value.isascii() and value.isprintable()) or len(value) > 32:
        raise ConfigError(f"provider.region: {value!r} must be printable ASCII (letters, digits, "
                          f"'-' and the like), at most 32 characters")
    return value


def check_multiaddrs(values, where: str, *, peer_id: bool = False) -> tuple[str, ...]:
    """Each a multiaddr that parses; with ``peer_id`` (bootstrap) each names the peer to dial,
    otherwise (listen, announce) none does (the node adds its own)."""
    import multiaddr

    out = []
    for value in values:
        text = str(value)
        try:
            addr = multiaddr.Multiaddr(text)
        except Exception as exc:
            raise ConfigError(f"{where}: {text!r} is not a multiaddr ({exc}); expected e.g. "
                              f"\"/ip4/203.0.113.7/tcp/4001{'/p2p/12D3KooW...' if peer_id else ''}\"") from None
        names = [p.name for p in addr.protocols()]
        if peer_id and "p2p" not in names:
            raise ConfigError(f"{where}: {text!r} does not end in /p2p/<peer id> (the peer to dial)")
        if not peer_id and "p2p" in names and "listen" in where:
            raise ConfigError(f"{where}: {text!r}: a listen address names no peer id")
        out.append(text)
    return tuple(out)


def _expect(section: dict, allowed: dict[str, type | tuple], where: str) -> None:
    for key, value in section.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
        if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}: expected {getattr(allowed[key], '__name__', allowed[key])}, "
                              f"got {type(value).__name__}")


def load_config(path: Path) -> Config:
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no configuration at {path}: run `gpumarket init` first") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    _expect(doc, {"node": dict, "chain": dict, "provider": dict, "renter": dict, "relay": dict,
                  "discovery": dict}, str(path))
    relay = doc.get("relay", {})
    _expect(relay, RELAY_KEYS, "relay")
    try:
        from node.reachability import ReachabilityConfig

        ReachabilityConfig(**relay)  # checked here, once
    except ValueError as exc:
        raise ConfigError(f"relay: {exc}") from None
    discovery = doc.get("discovery", {})
    _expect(discovery, DISCOVERY_KEYS, "discovery")
    discovery = {k: float(v) if DISCOVERY_KEYS[k] == (int, float) else v for k, v in discovery.items()}
    try:
        from node.discovery import DiscoveryConfig

        DiscoveryConfig(**discovery)  # checked here, once
    except ValueError as exc:
        raise ConfigError(f"discovery: {exc}") from None
    node = doc.get("node", {})
    _expect(node, {"data_dir": str, "listen": list, "bootstrap": list, "mdns": bool,
                   "announce": list}, "node")
    chain = doc.get("chain", {})
    _expect(chain, {"rpc": str, "chain_id": int, "escrow": str, "token": str, "keystore": str}, "chain")
    prov = doc.get("provider", {})
    _expect(prov, {"enabled": bool, "price_per_gpu_hour": (str, int, float),
                   "min_price_per_gpu_hour": (str, int, float), "min_duration_s": int,
                   "max_duration_s": int, "heartbeat_interval_s": int, "grace_s": int,
                   "region": str, "bandwidth_mbps": int, "access_hook": list, "fake_gpus": int,
                   "runtime": str, "images": list, "docker_gpus": str, "docker_network": str,
                   "docker_cpus": (int, float), "docker_memory_mib": int, "docker_pids": int,
                   "docker_scratch": bool,
                   "interruptible_gpus": int, "interruptible_notice_s": int,
                   "interruptible_price_per_gpu_hour": (str, int, float), "power_price_source": str,
                   "power_poll_s": (int, float), "curtail_above_per_mwh": (str, int, float),
                   "resume_below_per_mwh": (str, int, float), "interruptible": list},
            "provider")
    renter = doc.get("renter", {})
    _expect(renter, {"arbiters": list}, "renter")
    arbiters = tuple(parse_address(a, "renter.arbiters") for a in renter.get("arbiters", []))
    data_dir = Path(node.get("data_dir", str(path.parent))).expanduser()
    convert = {
        "price_per_gpu_hour": lambda v: _decimal(v, "provider.price_per_gpu_hour"),
        "min_price_per_gpu_hour": lambda v: _decimal(v, "provider.min_price_per_gpu_hour"),
        "region": _region,
        "access_hook": lambda v: tuple(str(a) for a in v),
        "images": lambda v: tuple(str(a) for a in v),
        "docker_cpus": float,
        "interruptible_price_per_gpu_hour": lambda v: _decimal(v, "provider.interruptible_price_per_gpu_hour"),
        "curtail_above_per_mwh": lambda v: Decimal(str(v)),  # power prices may be negative
        "resume_below_per_mwh": lambda v: Decimal(str(v)),
        "power_poll_s": float,
        "interruptible": parse_interruptible,
    }
    # Absent keys take ProviderSection's defaults: the one place they are written.
    provider = ProviderSection(**{k: convert.get(k, lambda v: v)(v) for k, v in prov.items()})
    return Config(
        path=path,
        data_dir=data_dir,
        listen=check_multiaddrs(node.get("listen", ["/ip4/0.0.0.0/tcp/4001"]), "node.listen"),
        bootstrap=check_multiaddrs(node.get("bootstrap", []), "node.bootstrap", peer_id=True),
        mdns=node.get("mdns", False),
        announce=check_multiaddrs(node.get("announce", []), "node.announce"),
        chain=ChainSection(
            rpc=chain.get("rpc", "embedded"),
            chain_id=chain.get("chain_id"),
            escrow=parse_address(chain["escrow"], "chain.escrow") if "escrow" in chain else None,
            token=parse_address(chain["token"], "chain.token") if "token" in chain else None,
            keystore=chain.get("keystore", "wallet.json"),
        ),
        provider=provider,
        renter=RenterSection(arbiters=arbiters),
        relay=dict(relay),
        discovery=discovery,
    )


def default_config_text(data_dir: Path, *, provider: bool = False) -> str:
    p = ProviderSection()
    return f"""# gpumarket node configuration (TOML). Every key is optional; these are the defaults.
[node]
data_dir = "{data_dir}"
listen = ["/ip4/0.0.0.0/tcp/4001"]
bootstrap = []          # multiaddrs ending in /p2p/<peer id>
mdns = false            # true: find and dial nodes on the same LAN by multicast DNS
# announce = ["/ip4/203.0.113.7/tcp/4001"]  # provider: public address put in offers

[chain]
rpc = "embedded"        # "embedded" (an in-process EVM for this node alone) or a JSON-RPC URL
# chain_id = 31337      # checked against the endpoint
# escrow = "0x..."      # the escrow contract's address on that chain
# token = "0x..."       # the ERC-20 offers are priced in (none: the native coin)
keystore = "wallet.json" # encrypted wallet keystore, relative to data_dir; never a plain key

[renter]
arbiters = []           # arbiter wallets you trust ("0x..."); offers naming any other arbiter
                        # are refused before negotiating (an arbiter rules on the whole deposit)

[relay]                 # NAT traversal (specs/node.md, "Reachability"); these are the defaults
relay_service = "auto"  # serve circuit relay v2 while publicly reachable; "on", "off"
# max_reservations = 128, max_reservations_per_ip = 8, max_circuits = 256,
# max_circuits_per_peer = 8, circuit_max_seconds = 3600, circuit_max_bytes = 67108864,
# relays_to_reserve = 2 (while unreachable), autonat_interval_s = 60, hole_punch = true,
# hard_nat_punch = true, hard_nat_sockets = 256, hard_nat_probes = 1024,
# hard_nat_window_s = 4.0, hard_nat_runs_per_minute = 4

[discovery]             # finding peers beyond the bootstrap list (specs/node.md, "Reachability")
enabled = true
# target_peers = 8 (dial candidates while fewer direct connections), interval_s = 30,
# short_interval_s = 5 (while below target_peers), dials_per_round = 4, retry_s = 600,
# allow_private = false (true: keep private/loopback addresses whoever named them; LANs)

[provider]
enabled = {"true" if provider else "false"}
price_per_gpu_hour = "{p.price_per_gpu_hour}"   # in whole token units (e.g. USDC), exact
min_duration_s = {p.min_duration_s}
max_duration_s = {p.max_duration_s}
heartbeat_interval_s = {p.heartbeat_interval_s}
grace_s = {p.grace_s}
region = "{p.region}"
bandwidth_mbps = {p.bandwidth_mbps}
# access_hook = ["/usr/local/bin/gpumarket-access-hook"]  # gets the agreement as JSON on stdin
# runtime = "docker"      # a container per rental, reached with `gpumarket shell` (specs/runtime.md)
# images = ["pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"]  # renters choose; first = default
# docker_gpus = "nvidia"  # the rented GPUs by UUID (NVIDIA container toolkit); "none": no GPU
# docker_network = "bridge"  # outbound allowed, not to this host nor other rentals; or "none"
# docker_cpus = 0         # CPUs shared out over all GPUs by rented share (0: all)
# docker_memory_mib = 0   # memory shared out likewise (0: 90% of this host's)
# docker_pids = 4096      # processes shared out likewise
# docker_scratch = false  # a per-rental volume at /scratch, removed when the rental ends
# Interruptible sets (up to 8): GPUs sold for less that may be preempted after notice_s of
# notice, taken from the end of the GPU list (specs/node.md, "Power price and curtailment")
# [[provider.interruptible]]
# gpus = 2
# notice_s = 60
# price_per_gpu_hour = "0.30"
"""
