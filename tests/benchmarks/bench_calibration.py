"""Calibration of the simulator's network model against real nodes with delayed links.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_calibration.py
(defaults: 20 nodes in 4 processes, each dialling 3 others, 40 offers at 1 per second).

The same topology is run twice:

* real: GossipHost nodes (py-libp2p, TCP + Noise + yamux, our gossipsub settings) in
  ``--processes`` processes on 127.0.0.1. Every connection goes through a delaying TCP relay
  (node/delay_relay.py, run in the process of the dialled node) that adds the one-way delay of
  the two nodes' regions, RTT/2 from simulations/data/region_rtt_ms.csv, with the model's jitter
  (``--jitter``, per chunk). netem would be the usual tool; it is not available here (the
  error is recorded in the JSON). Each message is a real signed Offer (protocol.samples.make_offer)
  from a random node; every node validates it with protocol.validation.validate_offer before it
  is relayed. Latency = (time the receiver's validator accepted it) - (time just before the
  publish call), both time.time() on one machine.
* simulated: simulations/calibration.py drives the simulator's Network + Overlay on the same
  connections, regions, publish schedule and offer sizes, ``--sim-reps`` times with different
  seeds (jitter and mesh draws), once with the model's own mesh and once with the mesh the real
  nodes reported when publishing started.

Reported: p50/p90/p99 of both, the two-sample KS distance, real minus modelled per (message,
receiver), and the `per_message_cpu_ms` / `validate_ms` values that make the model fit best.
``--control direct|zero`` adds a run of the same plan with zero delay (no relays / zero-delay
relays): what the stack costs without propagation. On a small shared machine CPU contention
dominates the real figures; measured results and their reading: simulations/README.md,
"Calibration against real nodes". Prints a summary, then one JSON line (the last line). Every
child process is killed on the way out and a watchdog kills them all after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from node.delay_relay import LinkDelay, start_relays  # noqa: E402
from simulations.calibration import (  # noqa: E402
    FixedTopologyModel, hop_counts, ks_critical, ks_distance, one_way_ms, path_delay_bound,
    percentiles, region_names, topology,
)

TOPIC = "/gpumarket/calibration/offers"
CHAIN_ID = 31337


def netem_error() -> str:
    """Try the literal method once: netem on lo in a fresh network namespace. Returns '' when it
    works, else the error text (the namespace is always deleted)."""
    ns = f"gpmcal{os.getpid()}"
    try:
        r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10)
        if r.returncode:
            return f"ip netns add: {r.stderr.strip() or r.returncode}"
        try:
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                                "netem", "delay", "10ms"], capture_output=True, text=True, timeout=10)
            return "" if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"


def node_seed(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"bench-calibration/{seed}/{index}".encode()).digest()


# ------------------------------------------------------------------------------------------
# worker process: nodes [first, first + count)


async def worker_main(args) -> None:
    from libp2p.peer.id import ID

    from node.host import GossipHost, HostConfig
    from node.identity import NodeIdentity
    from node.testing import LOOPBACK, settle_meshes
    from protocol.errors import RemoteProtocolError
    from protocol.identity import PeerKey
    from protocol.messages import Binding
    from protocol.params import Params
    from protocol.samples import make_offer
    from protocol.validation import BindingCache, validate_offer

    first, count = args.first, args.count
    recv: dict[str, float] = {}  # "key/node" -> time the node's validator accepted it
    sent: dict[str, list] = {}  # key -> [message index, publisher, stamp before publish]
    rejected = [0]
    params = Params()

    def validator(index: int, bindings: BindingCache):
        def validate(payload: bytes, forwarder) -> bool:
            try:
                validate_offer(payload, int(time.time() * 1000), params, bindings)
            except RemoteProtocolError:
                rejected[0] += 1
                return False
            recv.setdefault(f"{hashlib.sha256(payload).hexdigest()[:16]}/{index}", time.time())
            return True
        return validate

    async def drain(sub) -> None:
        while True:
            await sub.get()

    with trio.fail_after(args.budget):
        async with trio.open_nursery() as nursery:
            nodes = []
            for k in range(count):
                index = first + k
                identity = NodeIdentity.from_seed(node_seed(args.seed, index))
                host = await nursery.start(GossipHost(identity, HostConfig(listen_addrs=LOOPBACK)).run)
                host.set_topic_validator(TOPIC, validator(index, BindingCache(64)))
                nursery.start_soon(drain, await host.subscribe(TOPIC))
                peer = PeerKey.from_signing_key(identity.signing_key)
                binding = Binding.create(peer, node_seed(args.seed + 1, index), CHAIN_ID)
                nodes.append({"host": host, "peer": peer, "binding": binding})
            print(json.dumps({"ports": [int(n["host"].addrs()[0].value_for_protocol("tcp")) for n in nodes],
                              "peer_ids": [n["host"].peer_id.to_base58() for n in nodes]}), flush=True)
            # the relays in front of this process's nodes (one per connection dialled to them)
            links = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))["links"]
            relays = await start_relays(nursery, [
                (("127.0.0.1", port), LinkDelay(ms, jitter, seed)) for _, port, ms, jitter, seed in links])
            print(json.dumps({"relay_ports": {str(k): r.port for (k, *_), r in zip(links, relays)}}),
                  flush=True)

            plan = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))
            index_of = {ID.from_base58(p): i for i, p in enumerate(plan["peer_ids"])}
            async with trio.open_nursery() as dials:
                for i, addr in plan["dials"]:
                    if first <= i < first + count:
                        dials.start_soon(nodes[i - first]["host"].connect_all, [addr])

            ready = await settle_meshes([n["host"] for n in nodes], TOPIC, args.mesh_timeout)
            print(json.dumps({"ready": ready}), flush=True)
            t0 = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))["t0"]
            await trio.sleep(max(0.0, t0 - time.time()))

            def mesh_snapshot():
                return [sorted(index_of[p] for p in n["host"].mesh_peers(TOPIC) if p in index_of)
                        for n in nodes]

            mesh_at_start = mesh_snapshot()
            cpu0, wall0 = time.process_time(), time.time()
            rng = random.Random(args.seed * 1000 + first)
            sizes = {}
            for m, publisher, offset in plan["schedule"]:
                if not first <= publisher < first + count:
                    continue
                await trio.sleep(max(0.0, t0 + offset - time.time()))
                node = nodes[publisher - first]
                offer = make_offer(node["peer"], node["binding"], rng, int(time.time() * 1000),
                                   seq=m + 1, region=plan["regions"][publisher])
                data = offer.encode()
                key = hashlib.sha256(data).hexdigest()[:16]
                sent[key] = [m, publisher, time.time()]
                sizes[m] = len(data)
                await node["host"].publish(TOPIC, data)
            await trio.sleep(max(0.0, t0 + plan["end"] - time.time()))
            cpu_frac = (time.process_time() - cpu0) / max(1e-9, time.time() - wall0)
            late = [x for r in relays for x in r.late_ms]
            print(json.dumps({"cpu_frac": round(cpu_frac, 3), "relay_late_ms": late,
                              "relay_bytes": sum(r.bytes for r in relays), "sent": sent, "recv": recv,
                              "sizes": sizes, "rejected": rejected[0],
                              "mesh_at_start": mesh_at_start, "mesh_at_end": mesh_snapshot()}),
                  flush=True)
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# driver


def make_plan(nodes: int, dials: int, messages: int, rate: float, seed: int) -> dict:
    """Regions (every region used about equally, seeded order), topology and publish schedule."""
    rng = random.Random(seed)
    regions = [i % 10 for i in range(nodes)]
    rng.shuffle(regions)
    pairs = topology(nodes, dials, rng)
    schedule = [(m, rng.randrange(nodes), round(m / rate, 4)) for m in range(messages)]
    return {"regions": regions, "pairs": pairs, "schedule": schedule}


class Children:
    """Child processes started by the driver; a watchdog kills them all after `budget` s."""

    def __init__(self, budget: float) -> None:
        self.procs: list[subprocess.Popen] = []
        self.timer = threading.Timer(budget, self.kill)
        self.timer.daemon = True
        self.timer.start()
        self.env = dict(os.environ, PYTHONPATH=ROOT)

    def spawn(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        self.procs.append(p)
        return p

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def close(self) -> None:
        self.timer.cancel()
        for p in self.procs:
            for stream in (p.stdin, p.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def send(p: subprocess.Popen, obj) -> None:
    p.stdin.write(json.dumps(obj) + "\n")
    p.stdin.flush()


def receive(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"child {p.args[2:]} exited (rc {p.poll()}) or was killed by the watchdog")
    return json.loads(line)


def run_real(plan: dict, *, processes: int, jitter: float, seed: int, drain: float = 4.0,
             settle: float = 2.0, mesh_timeout: float = 30.0, budget: float = 170.0,
             delay_scale: float = 1.0, direct: bool = False) -> dict:
    """Run the plan on real nodes behind delaying relays. Returns the latency matrix [message,
    node] in ms (nan: publisher / not delivered) and what the nodes reported. The links get the
    plan's delays (times plan["delay_scale"], default 1); `delay_scale` 0:
    the same relays with no delay (what the stack and the relays cost); `direct`: no relays at all,
    nodes dial each other's loopback ports (what the stack alone costs)."""
    regions, pairs, schedule = plan["regions"], plan["pairs"], plan["schedule"]
    n = len(regions)
    per = [n // processes + (1 if k < n % processes else 0) for k in range(processes)]
    starts = [sum(per[:k]) for k in range(processes)]
    delay = one_way_ms(regions, scale=plan.get("delay_scale", 1.0) * delay_scale)
    end = (schedule[-1][2] if schedule else 0.0) + drain
    kids = Children(budget)
    t_start = time.time()
    try:
        workers = [kids.spawn("--worker", "--first", str(starts[k]), "--count", str(per[k]),
                              "--seed", str(seed), "--budget", str(budget), "--mesh-timeout",
                              str(mesh_timeout)) for k in range(processes)]
        ports, peer_ids = [], []
        for w in workers:
            r = receive(w)
            ports += r["ports"]
            peer_ids += r["peer_ids"]
        # one relay per connection, in the process of the dialled node, with that pair's delay
        owner = [w for w in range(processes) for _ in range(per[w])]
        for w, worker in enumerate(workers):
            send(worker, {"links": [] if direct else [
                [k, ports[j], float(delay[i, j]), jitter, seed * 100_003 + k]
                for k, (i, j) in enumerate(pairs) if owner[j] == w]})
        relay_ports = {int(k): v for w in workers for k, v in receive(w)["relay_ports"].items()}
        dials = [[i, f"/ip4/127.0.0.1/tcp/{ports[j] if direct else relay_ports[k]}/p2p/{peer_ids[j]}"]
                 for k, (i, j) in enumerate(pairs)]
        for w in workers:
            send(w, {"dials": dials, "peer_ids": peer_ids, "schedule": schedule, "end": end,
                     "regions": region_names(regions)})
        ready = [x for w in workers for x in receive(w)["ready"]]
        meshed_s = time.time() - t_start
        for w in workers:
            send(w, {"t0": time.time() + settle})
        outs = [receive(w) for w in workers]
    finally:
        kids.close()
    late = [x for o in outs for x in o["relay_late_ms"]]
    relay_stats = {"bytes": sum(o["relay_bytes"] for o in outs), "chunks": len(late),
                   "late_ms": percentiles(late), "late_max_ms": round(max(late, default=0.0), 2)}
    sent, recv, sizes, mesh_start, mesh_end, rejected = {}, {}, {}, [], [], 0
    for o in outs:
        sent.update(o["sent"])
        recv.update(o["recv"])
        sizes.update({int(k): v for k, v in o["sizes"].items()})
        mesh_start += o["mesh_at_start"]
        mesh_end += o["mesh_at_end"]
        rejected += o["rejected"]
    lat = np.full((len(schedule), n), np.nan)
    for key, (m, publisher, stamp) in sent.items():
        for r in range(n):
            if r != publisher and f"{key}/{r}" in recv:
                lat[m, r] = (recv[f"{key}/{r}"] - stamp) * 1000
    return {"lat": lat, "sizes": [sizes.get(m, 0) for m in range(len(schedule))],
            "published": len(sent), "mesh_ready": ready, "mesh_at_start": mesh_start,
            "mesh_at_end": mesh_end, "rejected": rejected, "meshed_s": round(meshed_s, 2),
            "worker_cpu_frac": [o["cpu_frac"] for o in outs], "relay": relay_stats}


def simulate(plan: dict, sizes, *, reps: int, jitter: float, mesh=None, **network) -> np.ndarray:
    """[rep, message, node] latencies (ms) from the simulator's model, `reps` seeds."""
    sched = [(p, t) for _, p, t in plan["schedule"]]
    scale = plan.get("delay_scale", 1.0)
    return np.stack([
        FixedTopologyModel(plan["pairs"], plan["regions"], seed=s, mesh=mesh, rtt_scale=scale,
                           network={"jitter_frac": jitter, **network}).latencies(sched, sizes)
        for s in range(1, reps + 1)])


def fit(plan: dict, sizes, real: np.ndarray, *, param: str, grid, reps: int, jitter: float) -> dict:
    """The value of one model parameter (ms) that minimises the KS distance to `real`."""
    best = None
    for v in grid:
        sim = simulate(plan, sizes, reps=reps, jitter=jitter, **{param: float(v)})
        d = ks_distance(real, sim[np.isfinite(sim)])
        if best is None or d < best[1]:
            best = (float(v), d, percentiles(sim))
    return {"value_ms": best[0], "ks": round(best[1], 4), "sim": best[2],
            "at_grid_edge": best[0] in (float(grid[0]), float(grid[-1]))}


def compare(plan: dict, real: dict, *, jitter: float, reps: int, fit_reps: int = 5) -> dict:
    """Everything reported: real vs simulated distributions, paired differences, best fits."""
    regions, pairs, schedule = plan["regions"], plan["pairs"], plan["schedule"]
    n = len(regions)
    lat = real["lat"]
    others = np.ones_like(lat, dtype=bool)
    for m, p, _ in schedule:
        others[m, p] = False
    real_ok = lat[np.isfinite(lat)]
    sim = simulate(plan, real["sizes"], reps=reps, jitter=jitter)
    sim_ok = sim[np.isfinite(sim)]
    sim_rm = simulate(plan, real["sizes"], reps=reps, jitter=jitter,
                      mesh=[set(m) for m in real["mesh_at_start"]])
    pure = simulate(plan, real["sizes"], reps=reps, jitter=jitter, per_message_cpu_ms=0.0,
                    validate_ms=0.0, bandwidth_mbps=1e6)
    bound = path_delay_bound(pairs, regions, jitter, scale=plan.get("delay_scale", 1.0))
    bound_mr = np.array([bound[p] for _, p, _ in schedule])  # [message, receiver]
    hops = hop_counts(pairs, n)
    hops_mr = np.array([hops[p] for _, p, _ in schedule])
    with warnings.catch_warnings():  # the publisher's column is all nan
        warnings.simplefilter("ignore", RuntimeWarning)
        diff = lat - np.nanmean(sim, axis=0)  # real - modelled (mean over reps), per delivery
        over = lat - np.nanmean(pure, axis=0)  # real - pure propagation (no CPU in the model)
    f = np.isfinite(lat)
    grid = np.arange(0.0, 60.01, 1.0)
    return {
        "expected": int(others.sum()),
        "real_delivered": int(f.sum()),
        "sim_delivered_per_rep": round(float(np.isfinite(sim).sum()) / reps, 1),
        "real": percentiles(real_ok),
        # queueing shows as a drift over the run: p50 of the messages in each third of the schedule
        "real_p50_by_third": [percentiles(part[np.isfinite(part)], (50,))["p50"]
                              for part in np.array_split(lat, 3)],
        "sim": percentiles(sim_ok),
        "ks": round(ks_distance(real_ok, sim_ok), 4),
        "ks_crit_005": round(ks_critical(len(real_ok), len(sim_ok)), 4),
        "sim_real_mesh": percentiles(sim_rm[np.isfinite(sim_rm)]),
        "ks_real_mesh": round(ks_distance(real_ok, sim_rm[np.isfinite(sim_rm)]), 4),
        "sim_no_cpu": percentiles(pure[np.isfinite(pure)]),
        "ks_no_cpu": round(ks_distance(real_ok, pure[np.isfinite(pure)]), 4),
        "real_minus_model_ms": percentiles(diff[f]),
        "real_minus_propagation_ms": percentiles(over[f]),
        "real_minus_propagation_per_min_hop_ms": percentiles((over / np.maximum(hops_mr, 1))[f]),
        "path_bound": {"min_slack_ms": round(float(np.nanmin((lat - bound_mr)[f])), 2) if f.any() else None,
                       "below_bound": int(((lat - bound_mr)[f] < 0).sum())},
        "fit_per_message_cpu_ms": fit(plan, real["sizes"], real_ok, param="per_message_cpu_ms",
                                      grid=grid, reps=fit_reps, jitter=jitter),
        "fit_validate_ms": fit(plan, real["sizes"], real_ok, param="validate_ms", grid=grid,
                               reps=fit_reps, jitter=jitter),
    }


def main(args) -> None:
    t_begin = time.time()
    err = netem_error()
    method = "netem" if not err else f"userspace relay (netem unavailable: {err})"
    print(f"delay method: {method}", flush=True)
    plan = make_plan(args.nodes, args.dials, args.messages, args.rate, args.seed)
    plan["delay_scale"] = args.delay_scale
    load0 = os.getloadavg()
    real = run_real(plan, processes=args.processes, jitter=args.jitter, seed=args.seed,
                    drain=args.drain, budget=args.budget)
    load1 = os.getloadavg()
    control = None
    if args.control != "none":
        zero = run_real(plan, processes=args.processes, jitter=0.0, seed=args.seed,
                        drain=args.drain, budget=args.budget, delay_scale=0.0,
                        direct=args.control == "direct")
        zl = zero["lat"]
        hops = hop_counts(plan["pairs"], args.nodes)
        hops_mr = np.array([hops[p] for _, p, _ in plan["schedule"]])
        f = np.isfinite(zl)
        control = {"mode": {"zero": "relays with zero delay", "direct": "no relays"}[args.control],
                   "delivered": int(f.sum()), **percentiles(zl),
                   "per_min_hop_ms": percentiles(zl[f] / np.maximum(hops_mr[f], 1)),
                   "worker_cpu_frac": zero["worker_cpu_frac"]}
    c = compare(plan, real, jitter=args.jitter, reps=args.sim_reps)
    print(f"{args.nodes} nodes in {args.processes} processes, {len(plan['pairs'])} connections, "
          f"regions {region_names(plan['regions'])}")
    print(f"mesh sizes when publishing started: {[len(m) for m in real['mesh_at_start']]}")
    relay = real["relay"]
    print(f"CPU while publishing (fraction of a core, relays included): workers "
          f"{real['worker_cpu_frac']}; relay lateness over the configured delay {relay['late_ms']} "
          f"(max {relay['late_max_ms']} ms, {relay['chunks']} chunks); "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print(f"delivered: real {c['real_delivered']}/{c['expected']}, "
          f"simulated {c['sim_delivered_per_rep']}/{c['expected']} per rep")
    for name in ("real", "sim", "sim_real_mesh", "sim_no_cpu"):
        print(f"  {name:14s} {c[name]}")
    print(f"real p50 by third of the run: {c['real_p50_by_third']}")
    print(f"KS distance real vs sim: {c['ks']} (model mesh), {c['ks_real_mesh']} (real mesh), "
          f"{c['ks_no_cpu']} (no CPU in the model); 5% critical value ~{c['ks_crit_005']}")
    print(f"real - modelled per delivery: {c['real_minus_model_ms']}")
    print(f"real - pure propagation: {c['real_minus_propagation_ms']}; per hop of the shortest "
          f"path: {c['real_minus_propagation_per_min_hop_ms']}")
    if control:
        print(f"control, same plan with zero delay ({control['mode']}): {control}")
    print(f"best fit: per_message_cpu_ms={c['fit_per_message_cpu_ms']}, "
          f"validate_ms={c['fit_validate_ms']}")
    result = {
        "bench": "calibration", "delay_method": method, "nodes": args.nodes,
        "processes": args.processes, "dials_per_node": args.dials, "connections": len(plan["pairs"]),
        "messages": args.messages, "published": real["published"], "rate_per_s": args.rate,
        "jitter_frac": args.jitter, "delay_scale": args.delay_scale, "sim_reps": args.sim_reps,
        "seed": args.seed,
        "offer_bytes_mean": round(float(np.mean(real["sizes"])), 1),
        "mesh_at_start": [len(m) for m in real["mesh_at_start"]],
        "rejected": real["rejected"], "relay": real["relay"],
        "worker_cpu_frac": real["worker_cpu_frac"],
        **{k: v for k, v in c.items()},
        "control_zero_delay": control,
        "loadavg_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "wall_s": round(time.time() - t_begin, 1),
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    if args.dump:
        with open(args.dump, "w") as fh:
            raw = np.where(np.isfinite(real["lat"]), real["lat"], -1).round(3)  # -1: none
            json.dump({"plan": plan, "lat_ms": raw.tolist(),
                       "sizes": real["sizes"], "mesh_at_start": real["mesh_at_start"],
                       "mesh_at_end": real["mesh_at_end"], "result": result}, fh)
    print(json.dumps(result))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--first", type=int)
    p.add_argument("--count", type=int)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--dials", type=int, default=3)
    p.add_argument("--messages", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--jitter", type=float, default=0.1, help="as network.jitter_frac")
    p.add_argument("--delay-scale", type=float, default=1.0,
                   help="multiply every link's delay (real and simulated) by this")
    p.add_argument("--sim-reps", type=int, default=20)
    p.add_argument("--drain", type=float, default=4.0)
    p.add_argument("--mesh-timeout", type=float, default=30.0)
    p.add_argument("--budget", type=float, default=170.0, help="watchdog: children killed after this (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--control", choices=("none", "zero", "direct"), default="none",
                   help="also run the same plan with zero delay, through the relays (zero) or "
                        "dialling directly (direct); doubles the run time")
    p.add_argument("--dump", help="write the plan and the raw real latencies (JSON) here")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    if a.worker:
        trio.run(worker_main, a)
    else:
        main(a)
