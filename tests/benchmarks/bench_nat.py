"""NAT traversal figures on a real NAT topology (issue 15): hole-punch success per pair of NAT
kinds, first reply relayed vs direct, round trip relayed vs direct.

Run as root from the repository root: PYTHONPATH=. python tests/benchmarks/bench_nat.py
[--tries 20] [--pairs eim-eim,eim-symmetric,symmetric-eim,symmetric-symmetric]

For each pair (provider's NAT - renter's NAT) it builds tests/nat/topology.py's lab, runs a relay
in the internet namespace (GuardedRelay, serving) and a provider behind NAT A holding a
reservation there, each in its own process. A renter process behind NAT B then makes ``--tries``
attempts; each attempt uses a fresh host (new identity, new listen port, so no NAT state of an
earlier attempt is reused) and:

1. dials the provider's ``/p2p-circuit`` address and sends one request on a new stream: the
   time from the dial to the reply is ``first_reply_relayed_s``;
2. sends 10 frames of 64 bytes one after another on one stream and takes the median round trip
   (``rtt_relayed_ms``, a heartbeat's round trip through the relay);
3. starts DCUtR (py-libp2p's, as node/reachability.py runs it): success means a direct
   connection to the provider exists afterwards;
4. if it succeeded: the time from the first dial (step 1) to the first reply on a new stream
   over the direct connection, less the time step 2 took, is ``first_reply_direct_s`` (dial via
   the relay, first relayed reply, hole punch, first direct reply), and ``rtt_direct_ms`` as in
   step 2.

What this measures and what it does not: the request is a length-prefixed echo on its own
protocol, carried exactly as the negotiation's first Proposal and its reply are (a new stream on
the connection), but it is not the negotiation state machine (which adds its own signing and
checks, a few ms, tests/benchmarks/bench_node_rent.py). Prints one line per attempt, a summary,
then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ECHO = "/gpumarket-bench/echo/1"


def allow_echo_when_relayed(host, counters) -> None:
    """The echo stands in for the negotiation stream, so it may use a relayed connection as
    the rental's own protocols may (relayed connections are limited: specs/node.md 6)."""
    from node.libp2p_nat_patches import limit_relayed_connections
    from node.reachability import RELAYED_CONN_PROTOCOLS

    limit_relayed_connections(host, RELAYED_CONN_PROTOCOLS | {ECHO}, counters)
# The birthday punch's shipped limit (4 runs a minute per node) would refuse most of 20 tries in a
# row against one provider: the bench lifts only that limit (tests/nat/test_birthday_punch.py
# tests the limit itself); sockets, probes and window are the defaults.
PUNCH = {"hard_nat_runs_per_minute": 60.0}


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


# -- the processes in the namespaces ------------------------------------------------------------

async def run_peer(role: str, relay_addr: str | None, tries: int) -> None:
    from collections import Counter

    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
    from libp2p.tools.anyio_service import background_trio_service

    from node.host import build_libp2p_host
    from node.identity import NodeIdentity
    from node.reachability import Reachability, ReachabilityConfig, is_relayed

    listen = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4001" if role != "renter" else "/ip4/0.0.0.0/tcp/0")]

    async def echo(stream) -> None:
        try:
            while data := await stream.read(4096):
                await stream.write(data)
        except Exception:
            pass

    def new_host():
        h = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), listen)
        h.set_stream_handler(TProtocol(ECHO), echo)
        return h

    if role in ("relay", "provider"):
        host = new_host()
        counters: Counter[str] = Counter()
        reach = Reachability(host, ReachabilityConfig(relay_service="on" if role == "relay" else "off",
                                                      circuit_max_seconds=600, **PUNCH), counters)
        allow_echo_when_relayed(host, counters)
        async with host.run(listen), background_trio_service(reach.relay):
            reach.relay.set_serving(role == "relay")
            if reach.birthday is not None:
                reach.birthday.attach()
            async with background_trio_service(reach.dcutr):
                if role == "relay":
                    say(event="ready", peer_id=str(host.get_id()))
                else:
                    relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
                    await host.connect(relay)
                    assert await reach.reserve(relay.peer_id), "no reservation"
                    say(event="ready", peer_id=str(host.get_id()), circuit=reach.circuit_addrs[0])
                await trio.sleep_forever()

    circuit = multiaddr.Multiaddr(relay_addr)  # for the renter: the provider's circuit address
    provider = info_from_p2p_addr(circuit).peer_id

    async def request(h, payload: bytes) -> float:
        t0 = time.monotonic()
        stream = await h.new_stream(provider, [TProtocol(ECHO)])
        await stream.write(payload)
        await stream.read(4096)
        await stream.close()
        return time.monotonic() - t0

    async def rtt_ms(h) -> float:
        stream = await h.new_stream(provider, [TProtocol(ECHO)])
        times = []
        for _ in range(10):
            t0 = time.monotonic()
            await stream.write(b"h" * 64)
            got = b""
            while len(got) < 64:
                got += await stream.read(64 - len(got))
            times.append((time.monotonic() - t0) * 1000)
        await stream.close()
        return statistics.median(times)

    def direct(h) -> bool:
        conns = h.get_network().connections.get(provider, [])
        return any(not is_relayed(c) for c in conns)

    for attempt in range(tries):
        host = new_host()
        counters = Counter()
        reach = Reachability(host, ReachabilityConfig(relay_service="off", **PUNCH), counters)
        allow_echo_when_relayed(host, counters)
        row: dict = {"event": "try", "try": attempt}
        try:
            with trio.fail_after(90):
                async with host.run(listen), background_trio_service(reach.relay):
                    if reach.birthday is not None:
                        reach.birthday.attach()
                    async with background_trio_service(reach.dcutr):
                        t_dial = time.monotonic()
                        await reach.dial_circuit(circuit)
                        await request(host, b"proposal")
                        row["first_reply_relayed_s"] = round(time.monotonic() - t_dial, 4)
                        t_rtt = time.monotonic()
                        row["rtt_relayed_ms"] = round(await rtt_ms(host), 3)
                        rtt_phase = time.monotonic() - t_rtt  # not part of the direct path
                        t0 = time.monotonic()
                        await reach.punch(provider)
                        row["hole_punch_s"] = round(time.monotonic() - t0, 3)
                        row["direct"] = direct(host)
                        if reach.birthday is not None and reach.birthday.last:
                            row["birthday"] = reach.birthday.last
                        row["counters"] = {k: v for k, v in counters.items() if k.startswith("nat.")}
                        if row["direct"]:
                            await request(host, b"proposal")
                            row["first_reply_direct_s"] = round(time.monotonic() - t_dial - rtt_phase, 4)
                            row["rtt_direct_ms"] = round(await rtt_ms(host), 3)
                        await host.get_network().close_peer(provider)
        except Exception as exc:
            row["error"] = repr(exc)[:200]
            row.setdefault("direct", False)
        say(**row)
    say(event="done")


# -- the driver (root namespace) ----------------------------------------------------------------

def start(lab, where: str, *args: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([*lab.exec_prefix(where), sys.executable, __file__, "--role", *args],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                            cwd=ROOT)


def read_event(proc: subprocess.Popen, name: str) -> dict:
    for line in proc.stdout:
        if line.startswith("{"):
            got = json.loads(line)
            if got["event"] == name:
                return got
    raise RuntimeError(f"process ended without {name!r}")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def bench_pair(kinds: tuple[str, str], tries: int, logs: Path, rows_out: list | None = None,
               fds_out: dict | None = None) -> dict:
    from tests.nat.topology import NatLab

    with NatLab({"a": kinds[0], "b": kinds[1]}) as lab:
        procs = []
        try:
            relay = start(lab, "inet", "relay", log=logs / "relay.log")
            procs.append(relay)
            relay_addr = f"/ip4/{lab.inet_addr}/tcp/4001/p2p/{read_event(relay, 'ready')['peer_id']}"
            provider = start(lab, "a", "provider", relay_addr, log=logs / "provider.log")
            procs.append(provider)
            circuit = read_event(provider, "ready")["circuit"]
            if fds_out is not None:
                fds_out["provider_ready"] = len(os.listdir(f"/proc/{provider.pid}/fd"))
            renter = start(lab, "b", "renter", circuit, "--tries", str(tries),
                           log=logs / "renter.log")
            procs.append(renter)
            rows = []
            for line in renter.stdout:
                got = json.loads(line)
                if got["event"] == "done":
                    break
                rows.append(got)
                print(f"  {kinds[0]}-{kinds[1]} {got}", flush=True)
            if fds_out is not None:  # open file descriptors of the long-lived provider
                fds_out["provider"] = len(os.listdir(f"/proc/{provider.pid}/fd"))
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
    if rows_out is not None:
        rows_out.extend(rows)
    ok = [r for r in rows if r.get("direct")]
    col = lambda rs, k: [r[k] for r in rs if k in r]  # noqa: E731
    return {
        "pair": f"{kinds[0]}-{kinds[1]}", "tries": len(rows),
        "relayed_ok": len(col(rows, "first_reply_relayed_s")), "direct_ok": len(ok),
        "hole_punch_success_rate": round(len(ok) / len(rows), 3) if rows else None,
        "first_reply_relayed_s": {"p50": pct(col(rows, "first_reply_relayed_s"), 0.5),
                                  "p95": pct(col(rows, "first_reply_relayed_s"), 0.95)},
        "first_reply_direct_s": {"p50": pct(col(ok, "first_reply_direct_s"), 0.5),
                                 "p95": pct(col(ok, "first_reply_direct_s"), 0.95)},
        "hole_punch_s": {"p50_ok": pct(col(ok, "hole_punch_s"), 0.5),
                         "p50_failed": pct([r["hole_punch_s"] for r in rows
                                            if not r.get("direct") and "hole_punch_s" in r], 0.5)},
        "rtt_relayed_ms_p50": pct(col(rows, "rtt_relayed_ms"), 0.5),
        "rtt_direct_ms_p50": pct(col(ok, "rtt_direct_ms"), 0.5),
        "errors": [r["error"] for r in rows if "error" in r][:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--pairs", default="eim-eim,eim-symmetric,symmetric-eim,symmetric-symmetric")
    p.add_argument("--logs", type=Path, default=Path("/tmp/bench_nat_logs"))
    p.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        import trio

        role, *rest = args.role
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("node.birthday_punch").setLevel(logging.INFO)
        trio.run(run_peer, role, rest[0] if rest else None, args.tries)
        return
    from tests.nat.topology import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        sys.exit(f"cannot build the NAT topology: {reason}")
    results = []
    t0 = time.monotonic()
    for pair in args.pairs.split(","):
        kinds = tuple(pair.split("-"))
        logs = args.logs / pair
        logs.mkdir(parents=True, exist_ok=True)
        results.append(bench_pair(kinds, args.tries, logs))
        print(json.dumps(results[-1]), flush=True)
    print(f"done in {time.monotonic() - t0:.0f} s")
    print(json.dumps({"bench": "nat", "tries_per_pair": args.tries, "cpus": os.cpu_count(),
                      "punch_config": PUNCH, "load_avg": os.getloadavg(), "pairs": results}))


if __name__ == "__main__":
    main()
