"""Signed offers with chosen facts for offer-book and query tests (providers are cached: a
binding costs an EIP-712 signature to make and an ecrecover to verify)."""

from __future__ import annotations

import dataclasses
import functools
import random

from protocol.messages import OfferWithdrawal
from protocol.samples import GPU_MODELS, make_offer, make_provider

NOW = 1_800_000_000_000


@functools.cache
def provider(i: int):
    return make_provider(random.Random(f"provider-{i}"))


@functools.cache
def provider_of_wallet(i: int, owner: int):
    """Provider i's peer key bound to provider `owner`'s wallet (one wallet, several keys:
    a provider with several machines, or a Sybil reusing a wallet)."""
    from protocol.messages import Binding

    peer, _, _ = make_provider(random.Random(f"provider-{i}"))
    _, wallet_key, _ = provider(owner)
    return peer, wallet_key, Binding.create(peer, wallet_key, 31337)


def offer(i: int, *, seq: int = 1, now: int = NOW, model=GPU_MODELS[0], count: int = 1,
          region: str = "eu-frankfurt", price_per_gpu_second: int = 100, symbol: str = "USDC",
          decimals: int = 6, cuda: int = 12040, mixed_with=None, lifetime_ms: int = 3_600_000,
          chain_id: int = 31337, wallet_of: int | None = None):
    peer, _, binding = provider(i) if wallet_of is None else provider_of_wallet(i, wallet_of)
    o = make_offer(peer, binding, random.Random(i * 1000 + seq), now, seq=seq, model=model,
                   gpu_count=count, region=region, price_per_gpu_second=price_per_gpu_second,
                   lifetime_ms=lifetime_ms)
    gpus = tuple(dataclasses.replace(g, cuda_version=cuda) for g in o.gpus)
    if mixed_with is not None:
        gpus = gpus[:-1] + (dataclasses.replace(gpus[-1], model=mixed_with.name,
                                                vram_mib=mixed_with.vram_mib),)
    terms = dataclasses.replace(o.terms, token_symbol=symbol, token_decimals=decimals)
    return dataclasses.replace(o, gpus=gpus, terms=terms).sign(peer)


def withdrawal(i: int, seq: int, created_ms: int = NOW) -> bytes:
    peer, _, _ = provider(i)
    return OfferWithdrawal(provider=peer.public, seq=seq, created_ms=created_ms).sign(peer).encode()


def per_hour_to_per_second(units_per_hour: int) -> int:
    assert units_per_hour % 3600 == 0
    return units_per_hour // 3600


def fat_offer(i: int, **kw):
    """An offer padded to ~10.6 KB within the rules (64 GPUs, 64-byte model names, 32-byte
    driver strings): what a Sybil flood sends to spend a renter's memory per offer."""
    o = offer(i, count=64, **kw)
    peer, _, _ = provider(i)
    gpus = tuple(dataclasses.replace(g, model=("NVIDIA H100 80GB HBM3 " + "X" * 64)[:64],
                                     driver_version="5" * 32) for g in o.gpus)
    return dataclasses.replace(o, gpus=gpus).sign(peer)
