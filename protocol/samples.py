"""Realistic sample data for tests, benchmarks, the simulator and the demo.

GPU facts are typical NVML readings for each model; prices come from the 2026 rental price
ranges in shared/data/gpu_market_prices_2026.csv (USD per GPU-hour, converted to a 6-decimal
USD stablecoin per GPU-second). Randomness comes only from the `random.Random` passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .identity import PeerKey
from .messages import Binding, GpuInfo, HostInfo, Offer, OfferTerms

USDC_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str  # as NVML reports it
    vram_mib: int
    cc: tuple[int, int]
    power_limit_w: int
    usd_per_hour: tuple[float, float]  # 2026 market range (low, high)


# VRAM as NVML reports it (MiB); price ranges from shared/data/gpu_market_prices_2026.csv.
GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("NVIDIA GeForce RTX 4090", 24564, (8, 9), 450, (0.29, 0.80)),
    GpuModel("NVIDIA GeForce RTX 3090", 24576, (8, 6), 350, (0.35, 0.55)),
    GpuModel("NVIDIA A100-SXM4-40GB", 40960, (8, 0), 400, (0.84, 1.80)),
    GpuModel("NVIDIA A100-SXM4-80GB", 81920, (8, 0), 400, (1.39, 2.40)),
)

REGIONS = ("us-dallas", "ca-toronto", "us-washington", "eu-frankfurt", "eu-london", "eu-madrid",
           "jp-osaka", "au-sydney", "jp-tokyo", "br-saopaulo")


def usd_per_hour_to_units_per_second(usd_per_hour: float, decimals: int = USDC_DECIMALS) -> int:
    """Price per GPU-second in the token's smallest unit (rounded, at least 1)."""
    return max(1, round(usd_per_hour * 10**decimals / 3600))


def sample_gpu(model: GpuModel, index: int, host_tag: bytes) -> GpuInfo:
    uuid = f"GPU-{hashlib.sha256(host_tag + bytes([index])).hexdigest()[:32]}"
    return GpuInfo(
        model=model.name,
        uuid_digest=hashlib.sha256(uuid.encode()).digest(),
        vram_mib=model.vram_mib,
        cc_major=model.cc[0],
        cc_minor=model.cc[1],
        driver_version="550.54.15",
        cuda_version=12040,
        pcie_gen=4,
        pcie_width=16,
        power_limit_w=model.power_limit_w,
    )


def sample_terms(
    chain_id: int, escrow: bytes, token: bytes, price_per_gpu_second: int,
    heartbeat_interval_s: int = 30,
) -> OfferTerms:
    return OfferTerms(
        chain_id=chain_id,
        token=token,
        token_symbol="USDC",
        token_decimals=USDC_DECIMALS,
        price_per_gpu_second=price_per_gpu_second,
        escrow=escrow,
        min_duration_s=600,
        max_duration_s=7 * 24 * 3600,
        heartbeat_interval_s=heartbeat_interval_s,
        grace_s=max(600, 4 * heartbeat_interval_s),
        arbiter=b"\x00" * 20,
        dispute_window_s=0,
    )


def make_offer(
    peer: PeerKey,
    binding: Binding,
    rng,  # random.Random
    now_ms: int,
    *,
    seq: int = 1,
    model: GpuModel | None = None,
    gpu_count: int | None = None,
    region: str | None = None,
    price_per_gpu_second: int | None = None,
    escrow: bytes = b"\xee" * 20,
    token: bytes = b"\x70" * 20,
    lifetime_ms: int = 3_600_000,
    heartbeat_interval_s: int = 30,
) -> Offer:
    """A signed offer with plausible facts; anything not given is drawn from `rng`."""
    model = model or rng.choice(GPU_MODELS)
    gpu_count = gpu_count or rng.choice((1, 1, 2, 4, 8))
    low, high = model.usd_per_hour
    if price_per_gpu_second is None:
        price_per_gpu_second = usd_per_hour_to_units_per_second(rng.uniform(low, high))
    gpus = tuple(sample_gpu(model, i, peer.public) for i in range(gpu_count))
    host = HostInfo(
        cpu_cores=max(8, 8 * gpu_count),
        ram_mib=65536 * max(1, gpu_count // 2),
        disk_gib=1000 * gpu_count,
        bandwidth_mbps=rng.choice((500, 1000, 2500, 10000)),
        region=region or rng.choice(REGIONS),
    )
    terms = sample_terms(binding.chain_id, escrow, token, price_per_gpu_second, heartbeat_interval_s)
    return Offer(
        provider=peer.public, seq=seq, created_ms=now_ms, expires_ms=now_ms + lifetime_ms,
        gpus=gpus, host=host, terms=terms, binding=binding,
    ).sign(peer)


def make_provider(rng, chain_id: int = 31337) -> tuple[PeerKey, bytes, Binding]:
    """A fresh provider identity: ed25519 peer key, wallet key, and their binding."""
    peer = PeerKey(rng.randbytes(32))
    wallet_key = rng.randbytes(32)
    return peer, wallet_key, Binding.create(peer, wallet_key, chain_id)
