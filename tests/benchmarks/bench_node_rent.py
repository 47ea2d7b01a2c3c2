"""Node latency: negotiation round trips between two real hosts, and "rent" to escrow opened.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_node_rent.py
    [--negotiations 40] [--rentals 8] [--chains embedded,anvil]

One provider node (fake GPUs) and one renter node in this process, libp2p on 127.0.0.1 (both ends
share one Python thread, so a round trip includes both sides' CPU time). Measured:
- negotiate: one complete negotiation (dial a stream, propose, accept, consent signature) with
  node.negotiate.negotiate_first, as Node.rent runs it; the provider's GPU reservation is released
  after each so the next one finds capacity.
- rent_to_open: Node.rent() from the call to its return: negotiation, the agreement row written
  (SQLite, synchronous=FULL), the ERC-20 approve and the escrow open mined, the session started.
  On the embedded chain (py-evm in-process) and on anvil with automine (a transaction is mined at
  once: a public chain adds its block time on top).
- accept_to_open: inside rent(), from the Accept (negotiation agreed) to the open transaction
  mined (the renter approved the escrow before proposing, so this is the open alone).
- hold_used: on the provider, from its Accept (the hold's start) to the renter's rental hello on
  the open escrow, which ends the hold: what the provider's open hold must cover.
Prints one line per measurement, then one JSON line (the last line) with millisecond percentiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import trio
from eth_utils import keccak

from node.anvil import AnvilProcess, find_anvil
from node.chain import AsyncChain, Chain
from node.fake_nvml import FakeGpu, FakeNvml
from node.negotiate import Candidate, negotiate_first
from node.node import Node, NodeConfig, ProviderSettings
from protocol.eth import private_key_address
from protocol.money import tokens
from protocol.params import Params

PRICE = 1_000
GPUS = 16
# 5 s heartbeats keep the background rentals cheap; a wide clock skew because eth-tester stamps
# a burst of blocks one second apart, ahead of the wall clock (see node/demo.py).
PARAMS = Params(clock_skew_ms=300_000, negotiation_step_timeout_ms=5_000)


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def summary(samples_s: list[float]) -> dict:
    ms = [x * 1000 for x in samples_s]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "max_ms": round(max(ms), 1)}


def make_chain(kind: str, stack) -> tuple[Chain, bytes, bytes]:
    """A chain with the market deployed; returns it with a provider and a renter wallet key."""
    if kind == "embedded":
        chain = Chain.embedded()
        keys = chain.dev_keys()
        deployer, provider, renter = keys[0], keys[1], keys[2]
    else:
        anvil = stack.enter_context(AnvilProcess())
        deployer, provider, renter = (keccak(b"bench wallet %d" % i) for i in range(3))
        for k in (deployer, provider, renter):
            anvil.fund(private_key_address(k), 10**21)
        chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
    chain.deploy_local_market(deployer)
    chain.fund(private_key_address(renter), token_units=10**15, minter_key=deployer)
    return chain, provider, renter


async def run_chain(kind: str, args: argparse.Namespace, workdir: Path) -> dict:
    from contextlib import ExitStack

    with ExitStack() as stack:
        chain, provider_key, renter_key = make_chain(kind, stack)
        await trio.sleep(chain.lead_s())
        achain = AsyncChain(chain)
        nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-bench-{i:04d}",
                                 memory_total_mib=24564, compute_capability=(8, 9))
                         for i in range(GPUS)])
        settings = ProviderSettings(price_per_gpu_hour=tokens(PRICE * 3600, 6), min_duration_s=5,
                                    max_duration_s=3600, heartbeat_interval_s=5, grace_s=300,
                                    publish_interval_s=0.5, nvml=nvml)
        result: dict = {}
        async with trio.open_nursery() as nursery:
            provider = await nursery.start(Node(NodeConfig(
                data_dir=workdir / f"{kind}-provider", wallet_key=provider_key, params=PARAMS,
                provider=settings, name="provider"), achain).run)
            renter = await nursery.start(Node(NodeConfig(
                data_dir=workdir / f"{kind}-renter", wallet_key=renter_key, params=PARAMS,
                bootstrap=(provider.addrs()[0],), name="renter"), achain).run)
            with trio.fail_after(20):
                while len(renter.book) == 0:
                    await renter.offers.sync()
                    await trio.sleep(0.1)

            # The provider checks the allowance before Accept (rent() approves by itself).
            await achain.run(chain.approve, renter_key, 10**15)
            if kind == "embedded":  # the negotiation does not touch the chain: measure it once
                samples = []
                for _ in range(args.negotiations):
                    with trio.fail_after(10):  # each hold re-announces the offer: use the newest
                        while (entry := renter.book.held(provider.key.public)) is None or \
                                len(entry.offer.gpus) != len(provider.capacity.free(
                                    int(time.time() * 1000))) or \
                                entry.digest != provider.book.held(provider.key.public).digest:
                            await trio.sleep(0.02)
                    t0 = time.perf_counter()
                    group = await negotiate_first(
                        renter.host, renter.key, renter.binding, [Candidate(entry.offer, entry.digest)],
                        gpu_count=1, duration_s=60, max_price_per_gpu_second=PRICE, access_key="",
                        params=PARAMS, rng=renter.rng)
                    samples.append(time.perf_counter() - t0)
                    assert group.winner is not None, "negotiation failed"
                    aid = group.winner.terms.agreement_id()
                    with trio.fail_after(5):  # the provider records it after the stream closes
                        while aid not in provider._pending:
                            await trio.sleep(0.005)
                    provider._pending.pop(aid)
                    provider.capacity.release(aid)
                    provider._offer_changed()
                result["negotiate"] = summary(samples)
                print(f"negotiate (loopback, one process): {result['negotiate']}")

            samples, accept_to_open = [], []
            for _ in range(args.rentals):
                with trio.fail_after(10):
                    while not (hits := renter.book.query("", "price")):
                        await trio.sleep(0.05)  # the provider re-announces its free GPUs
                t0 = time.perf_counter()
                rental = await renter.rent(hits[:1], gpu_count=1, duration_s=60,
                                           max_price_per_gpu_second=PRICE)
                samples.append(time.perf_counter() - t0)
                accept_to_open.append(renter.accept_to_open_s)
                assert rental.opened is not None
            with trio.fail_after(10):
                while len(provider.hold_used_ms) < args.rentals:
                    await trio.sleep(0.05)
            result["rent_to_open"] = summary(samples)
            result["accept_to_open"] = summary(accept_to_open)
            result["hold_used"] = summary([ms / 1000 for ms in provider.hold_used_ms])
            print(f"rent -> escrow open ({kind}): {result['rent_to_open']}")
            print(f"Accept -> open mined, renter ({kind}): {result['accept_to_open']}")
            print(f"Accept -> rental hello on the open escrow, provider ({kind}): "
                  f"{result['hold_used']}")
            nursery.cancel_scope.cancel()
        return result


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-node-rent-"))
    out = {"bench": "node_rent", "python": platform.python_version(), "cpus": os.cpu_count(),
           "negotiations": args.negotiations, "rentals": args.rentals}
    try:
        for kind in args.chains.split(","):
            if kind == "anvil" and find_anvil() is None:
                out["anvil"] = "skipped: anvil not installed"
                continue
            out[kind] = await run_chain(kind, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--negotiations", type=int, default=40)
    parser.add_argument("--rentals", type=int, default=8)
    parser.add_argument("--chains", default="embedded,anvil")
    trio.run(main, parser.parse_args())
