"""One node in its own OS process, for multi-process tests and benchmarks (not the user CLI).

    python -m node.process --data-dir D --chain-url URL --escrow 0x.. [--token 0x..]
        --wallet-key-file F --role provider|renter [--listen MULTIADDR] [--bootstrap ADDR ...]
        [--params JSON] [provider: --fake-gpus N --price UNITS ...]
        [renter: --rent QUERY --duration S --gpu-count N --max-price UNITS]

It prints one JSON object per line on stdout:
  {"event": "ready", "peer_id", "addrs", "wallet", "resumed"}  once the node runs (`resumed`:
      what the restart did with each unsettled agreement in the data dir, node.Node.resumed)
  {"event": "rented", "agreement_id", "started_s", "deposit", "provider"}  (renter with --rent)
  {"event": "rent_failed", "error"}
  {"event": "reachability", "reachability", "relay_service", "relays", "circuit_addrs",
      "offer_addrs"}  whenever one of these changes (node/reachability.py)
  {"event": "stopped", "signal"}  after SIGINT/SIGTERM and a clean shutdown
and exits 0. The wallet key file holds the key as hex (a test wallet; the user CLI uses the
keystore). The same data dir restarts the same node (identity, store, rentals).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import trio

from protocol.money import tokens
from protocol.params import Params

from .chain import AsyncChain, Chain
from .fake_nvml import FakeGpu, FakeNvml
from .node import Node, NodeConfig, ProviderSettings, RentError
from .runtime import DockerSettings
from .stalldump import StallDumper
from .reachability import ReachabilityConfig

FIND_POLL_S = 0.2


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _hex(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m node.process", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--chain-url", required=True)
    p.add_argument("--escrow", required=True, type=_hex)
    p.add_argument("--token", type=_hex)
    p.add_argument("--wallet-key-file", required=True, type=Path)
    p.add_argument("--role", required=True, choices=("provider", "renter"))
    p.add_argument("--name", default=None)
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--params", default="{}", help="JSON object of protocol.params.Params fields")
    p.add_argument("--chain-poll-s", type=float, default=0.3)
    n = p.add_argument_group("reachability (node/reachability.py)")
    n.add_argument("--relay-service", default="auto", choices=("auto", "on", "off"))
    n.add_argument("--relay-circuit-seconds", type=int, default=ReachabilityConfig.circuit_max_seconds)
    n.add_argument("--relay-circuit-bytes", type=int, default=ReachabilityConfig.circuit_max_bytes)
    n.add_argument("--relay-circuits-per-peer", type=int,
                   default=ReachabilityConfig.max_circuits_per_peer)
    n.add_argument("--relay-reservations-per-ip", type=int,
                   default=ReachabilityConfig.max_reservations_per_ip)
    n.add_argument("--autonat-interval", type=float, default=ReachabilityConfig.autonat_interval_s)
    n.add_argument("--no-hole-punch", action="store_true")
    g = p.add_argument_group("provider")
    g.add_argument("--fake-gpus", type=int, default=0, help="simulated GPUs (0: the real NVML)")
    g.add_argument("--gpu-model", default="NVIDIA GeForce RTX 4090")
    g.add_argument("--price", type=int, default=100, help="token units per GPU-second")
    g.add_argument("--heartbeat-interval", type=int, default=1)
    g.add_argument("--grace", type=int, default=300, help="seconds (the escrow's minimum: 300)")
    g.add_argument("--min-duration", type=int, default=5)
    g.add_argument("--publish-interval", type=float, default=0.5)
    g.add_argument("--docker-image", default=None,
                   help="a container per rental from this image (no GPU request, no network: tests)")
    r = p.add_argument_group("renter")
    r.add_argument("--rent", default=None, help="rent the cheapest offer matching this query")
    r.add_argument("--duration", type=int, default=10)
    r.add_argument("--gpu-count", type=int, default=1)
    r.add_argument("--max-price", type=int, default=10**6)
    r.add_argument("--find-timeout", type=float, default=20.0)
    r.add_argument("--rent-every", type=float, default=0.0,
                   help="rent again every S seconds (0: once); each round prints a 'round' event")
    r.add_argument("--rent-rounds", type=int, default=1)
    p.add_argument("--book-stats-every", type=float, default=0.0,
                   help="seconds between `book` events (offers held, bytes, book_full so far); 0: off")
    r.add_argument("--rent-candidates", type=int, default=1,
                   help="negotiate with the first N matching offers at once")
    r.add_argument("--watch-provider", default=None,
                   help="(benchmarks) a provider key in hex: each round says whether the book "
                        "holds its offer and where it ranks in the hits")
    return p.parse_args(argv)


def build_node(args: argparse.Namespace) -> Node:
    chain = Chain.connect(args.chain_url, escrow=args.escrow, token=args.token)
    provider = None
    if args.role == "provider":
        name = args.name or "provider"
        nvml = None
        if args.fake_gpus:
            nvml = FakeNvml([FakeGpu(name=args.gpu_model, uuid=f"GPU-{name}-{i:04d}",
                                     memory_total_mib=24564, compute_capability=(8, 9),
                                     utilization_pct=90, temperature_c=60, power_mw=300_000)
                             for i in range(args.fake_gpus)])
        # --price is in units per GPU-second; the settings take whole tokens per GPU-hour
        per_hour = tokens(args.price * 3600, chain.decimals(chain.token_address))
        provider = ProviderSettings(
            price_per_gpu_hour=per_hour, min_duration_s=args.min_duration,
            max_duration_s=3600, heartbeat_interval_s=args.heartbeat_interval,
            grace_s=args.grace, region="local", offer_lifetime_ms=10 * 60 * 1000,
            publish_interval_s=args.publish_interval, nvml=nvml,
            docker=None if args.docker_image is None else DockerSettings(
                images=(args.docker_image,), gpus="none", network="none", cpus=1.0, memory_mib=256))
    key = _hex(args.wallet_key_file.read_text().strip())
    config = NodeConfig(data_dir=args.data_dir, wallet_key=key, listen=(args.listen,),
                        bootstrap=tuple(args.bootstrap), params=Params(**json.loads(args.params)),
                        provider=provider, name=args.name or args.role,
                        chain_poll_s=args.chain_poll_s,
                        reachability=ReachabilityConfig(
                            relay_service=args.relay_service,
                            circuit_max_seconds=args.relay_circuit_seconds,
                            circuit_max_bytes=args.relay_circuit_bytes,
                            max_circuits_per_peer=args.relay_circuits_per_peer,
                            max_reservations_per_ip=args.relay_reservations_per_ip,
                            autonat_interval_s=args.autonat_interval,
                            hole_punch=not args.no_hole_punch))
    return Node(config, AsyncChain(chain))


async def rent_cheapest(node: Node, args: argparse.Namespace) -> None:
    hits = []
    with trio.move_on_after(args.find_timeout):
        for _ in range(int(args.find_timeout / FIND_POLL_S) + 1):
            hits = node.search(args.rent, "price")
            if hits:
                break
            if node.config.bootstrap:  # started before its bootstrap peer was up: dial again
                await node.host.connect_all(node.config.bootstrap)
            await node.offers.sync()
            await trio.sleep(FIND_POLL_S)
    if not hits:
        say(event="rent_failed", error=f"no offer matches {args.rent!r}")
        return
    try:
        rental = await node.rent(hits[:1], gpu_count=args.gpu_count, duration_s=args.duration,
                                 max_price_per_gpu_second=args.max_price)
    except RentError as exc:
        say(event="rent_failed", error=str(exc))
        return
    say(event="rented", agreement_id=rental.agreement_id.hex(), started_s=rental.started_s,
        deposit=rental.terms.deposit, provider=rental.terms.provider.hex())


async def rent_repeatedly(node: Node, args: argparse.Namespace) -> None:
    """A steady honest renter (benchmarks): every `rent_every` seconds, search the book as the
    CLI does (rank order) and rent as a user picking from that list would: the first
    `rent_candidates` hits at once, then the next ones if none agreed (at most four batches).
    One `round` event per round with the search time, the outcome and how long the rent took."""
    start = trio.current_time()
    for n in range(args.rent_rounds):
        await trio.sleep_until(start + (n + 1) * args.rent_every)
        t0 = trio.current_time()
        hits = node.search(args.rent, "rank", limit=4 * args.rent_candidates)  # as `offers search`
        search_ms = (trio.current_time() - t0) * 1000
        outcome: dict = {"round": n, "search_ms": round(search_ms, 3), "book": len(node.book),
                         "hits": len(hits), "batches": 0}
        t0 = trio.current_time()
        errors = []
        with trio.move_on_after(max(args.rent_every, 30.0)):
            for b in range(0, len(hits), args.rent_candidates):
                outcome["batches"] += 1
                try:
                    rental = await node.rent(hits[b:b + args.rent_candidates],
                                             gpu_count=args.gpu_count, duration_s=args.duration,
                                             max_price_per_gpu_second=args.max_price)
                except RentError as exc:
                    errors.append(str(exc))
                    continue
                outcome.update(ok=True, provider=rental.terms.provider.hex())
                break
        if not outcome.get("ok"):
            outcome.update(ok=False, error=errors[-1] if errors else
                           (f"no offer matches {args.rent!r}" if not hits else "timed out"))
        outcome["rent_s"] = round(trio.current_time() - t0, 3)
        # What the renter's gossip guard dropped so far (evidence for a missing offer), and
        # where the provider it rented from last time sat in this round's hits.
        outcome["drops"] = {k.removeprefix("p2p.pubsub.drop."): v
                            for k, v in node.host.counters.items()
                            if k.startswith("p2p.pubsub.drop.")}
        if args.watch_provider:
            held = node.book.held(_hex(args.watch_provider))
            outcome["watched"] = {
                "held": held is not None,
                "seq": held.seq if held is not None else None,
                "hit_index": next((i for i, e in enumerate(hits)
                                   if e.provider == _hex(args.watch_provider)), None)}
        say(event="round", **outcome)


async def report_book(node: Node, every_s: float) -> None:
    """A `book` event every `every_s` (benchmarks: when the book reaches its byte cap)."""
    while True:
        counters = node.offers.counters
        say(event="book", offers=len(node.book), bytes=node.book.bytes,
            book_full=sum(v for k, v in counters.items() if k.endswith(".book_full")))
        await trio.sleep(every_s)


async def report_reachability(node: Node) -> None:
    """One `reachability` line whenever what the node knows about it changes (polled)."""
    last = None
    while node.host.reachability is not None:
        now = dict(node.host.reachability.summary(), offer_addrs=list(node.announce_addrs()))
        if now != last:
            say(event="reachability", **now)
            last = now
        await trio.sleep(0.2)


async def main(args: argparse.Namespace) -> None:
    node = build_node(args)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            dumper = StallDumper.from_env(node.host.host)  # diagnostics, off unless asked
            if dumper is not None:
                await nursery.start(dumper.run)
            say(event="ready", peer_id=str(node.peer_id), addrs=node.addrs(),
                wallet=node.binding.wallet.hex(), resumed=node.resumed)
            nursery.start_soon(report_reachability, node)
            if args.book_stats_every > 0:
                nursery.start_soon(report_book, node, args.book_stats_every)
            if args.role == "renter" and args.rent is not None:
                nursery.start_soon(rent_repeatedly if args.rent_every else rent_cheapest, node, args)
            got = None
            async for got in signals:
                break
            nursery.cancel_scope.cancel()  # Node.run's finally withdraws, flushes, closes
    say(event="stopped", signal=signal.Signals(got).name if got else None)


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # thread stacks to stderr, for a stuck test
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(main, parse_args())
