"""Offer propagation: 20 nodes in 4 processes, the node's offer service vs bare gossipsub.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_offer_propagation.py
Two phases in one run, each with fresh processes, the same seeded topology (every node dials
``--degree`` random others) and the same publish schedule (``--messages`` at ``--rate`` per second
network-wide, publishers rotating over all nodes):

* ``baseline``: GossipHost (our gossipsub settings) with a validator that accepts everything; the
  payload is random bytes of exactly the size of the offer the same node publishes in the other
  phase; no book, no store.
* ``node``: GossipHost + OfferService (validation against the book, binding check, store with
  synchronous=FULL, counters) + OfferPublisher on every node (fake GPUs; each publish is a new
  seq, reserved in the store, signed, and validated by the publisher's own node first).

Latency = (time our validator accepted the message at a node) - (time just before the publish
call), for every node except the publisher, with time.time() (processes on one machine share the
system clock). In the node phase the validator's accept is the moment the offer is in the book.
Prints a summary, then one JSON line (the last line).
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
import tempfile
import time

import trio

from node.fake_nvml import FakeNvml
from node.gpu import GpuProbe
from node.host import GossipHost, HostConfig, Verdict
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC, OfferService
from node.publisher import OfferPublisher, offer_facts
from node.store import Store
from node.testing import LOOPBACK, settle_meshes
from protocol.identity import PeerKey
from protocol.messages import Binding, Offer
from protocol.samples import sample_terms

CHAIN_ID = 31337
GPU_COUNTS = (1, 2, 4, 8)


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else None


def node_seed(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"bench-propagation/{seed}/{index}".encode()).digest()


def provider_config(gpus: int):
    from node.publisher import ProviderConfig

    return ProviderConfig(
        terms=sample_terms(CHAIN_ID, b"\xee" * 20, b"\x70" * 20, 100),
        region="eu-frankfurt", bandwidth_mbps=1000, lifetime_ms=30 * 60_000,
        publish_interval_s=1.0, publish_burst=3,
    )


def offer_size(identity: NodeIdentity, binding: Binding, gpus: int) -> int:
    """Bytes of the offer this node publishes in the node phase (same facts, same encoding)."""
    with GpuProbe(FakeNvml.with_gpus(gpus)) as probe:
        facts = probe.static_facts(".")
    gpu_infos, host = offer_facts(facts, region="eu-frankfurt", bandwidth_mbps=1000)
    key = PeerKey.from_signing_key(identity.signing_key)
    now = int(time.time() * 1000)
    offer = Offer(provider=key.public, seq=now, created_ms=now, expires_ms=now + 30 * 60_000,
                  gpus=gpu_infos, host=host, terms=provider_config(gpus).terms, binding=binding).sign(key)
    return len(offer.encode())


# ------------------------------------------------------------------------------------------
# worker: runs nodes [first, first + count) in this process


async def worker(args) -> None:
    mode, first, count = args.mode, args.first, args.count
    recv: dict[str, float] = {}  # "key/node" -> first accept time
    sent: dict[str, list] = {}  # key -> [stamp at the gossip publish call, publisher, stamp at publish()]
    sizes: list[int] = []
    nodes = []
    tmp = tempfile.mkdtemp(prefix="bench-prop-")

    def recorder(index, inner=None):
        def validate(payload, forwarder):
            verdict = inner(payload, forwarder) if inner else Verdict.ACCEPT
            if verdict is Verdict.ACCEPT:
                recv.setdefault(f"{hashlib.sha256(payload).hexdigest()[:16]}/{index}", time.time())
            return verdict
        return validate

    gossip_stamp: dict[str, float] = {}

    def stamping(host):
        inner = host.publish

        async def publish(topic, payload):
            gossip_stamp[hashlib.sha256(payload).hexdigest()[:16]] = time.time()
            await inner(topic, payload)
        host.publish = publish

    async with trio.open_nursery() as nursery:
        for k in range(count):
            index = first + k
            identity = NodeIdentity.from_seed(node_seed(args.seed, index))
            host = await nursery.start(GossipHost(identity, HostConfig(listen_addrs=LOOPBACK)).run)
            binding = Binding.create(PeerKey.from_signing_key(identity.signing_key),
                                     node_seed(args.seed + 1, index), CHAIN_ID)
            gpus = GPU_COUNTS[index % len(GPU_COUNTS)]
            node = {"index": index, "host": host, "size": offer_size(identity, binding, gpus)}
            if mode == "baseline":
                host.set_topic_validator(OFFER_TOPIC, recorder(index))

                async def drain(sub):
                    while True:
                        await sub.get()

                nursery.start_soon(drain, await host.subscribe(OFFER_TOPIC))
            else:
                stamping(host)
                store = await Store.open(os.path.join(tmp, f"n{index}.db"))
                service = OfferService(host, store)
                await nursery.start(service.run)
                # wrap the service's validator to record when an offer enters the book
                host.set_topic_validator(OFFER_TOPIC, recorder(index, service.validate_gossip))
                pub = OfferPublisher(service, identity, binding, provider_config(gpus),
                                     nvml=FakeNvml.with_gpus(gpus))
                node["pub"] = await nursery.start(pub.run)
                node["service"] = service
            nodes.append(node)
        print(json.dumps({"addrs": [str(n["host"].addrs()[0]) for n in nodes]}), flush=True)

        plan = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))
        addrs = plan["addrs"]
        async with trio.open_nursery() as dials:
            for i, j in plan["pairs"]:
                if first <= i < first + count:
                    dials.start_soon(nodes[i - first]["host"].connect_all, [addrs[j]])
        # barrier: every node's mesh holds min(D_low, its subscribed peers) before the clock starts
        ready = await settle_meshes([n["host"] for n in nodes], OFFER_TOPIC, args.mesh_timeout)
        print(json.dumps({"ready": ready}), flush=True)
        t0 = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))["t0"]
        await trio.sleep(max(0.0, t0 - time.time()))
        mesh = [len(n["host"].mesh_peers(OFFER_TOPIC)) for n in nodes]
        rng = random.Random(args.seed * 1000 + first)
        for m, publisher_index, offset in plan["schedule"]:
            if not first <= publisher_index < first + count:
                continue
            await trio.sleep(max(0.0, t0 + offset - time.time()))
            node = nodes[publisher_index - first]
            if mode == "baseline":
                payload = rng.randbytes(node["size"])
                stamp = time.time()
                sent[hashlib.sha256(payload).hexdigest()[:16]] = [stamp, publisher_index, stamp]
                await node["host"].publish(OFFER_TOPIC, payload)
                sizes.append(len(payload))
            else:
                # publish() reserves the seq in the store, builds and signs the offer, then calls
                # the gossip publish (stamped by the wrapper below, the baseline's stamp point)
                stamp = time.time()
                offer = await node["pub"].publish()
                key = hashlib.sha256(offer.encode()).hexdigest()[:16]
                sent[key] = [gossip_stamp.pop(key), publisher_index, stamp]
                sizes.append(len(offer.encode()))
        await trio.sleep(max(0.0, t0 + plan["end"] - time.time()))
        counters = {}
        for n in nodes:
            if "service" in n:
                for k, v in n["service"].counters.items():
                    counters[k] = counters.get(k, 0) + v
        print(json.dumps({"sent": sent, "recv": recv, "sizes": sizes, "mesh": mesh,
                          "counters": counters}), flush=True)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# driver


def run_phase(mode: str, args) -> dict:
    n, procs_n = args.nodes, args.processes
    per = [n // procs_n + (1 if k < n % procs_n else 0) for k in range(procs_n)]
    starts = [sum(per[:k]) for k in range(procs_n)]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mode", mode, "--first", str(starts[k]),
             "--count", str(per[k]), "--seed", str(args.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for k in range(procs_n)
    ]
    try:
        t_start = time.time()
        addrs = []
        for p in procs:
            addrs += json.loads(p.stdout.readline())["addrs"]
        startup_s = time.time() - t_start
        rng = random.Random(args.seed)
        pairs = set()
        for i in range(n):
            for j in rng.sample([k for k in range(n) if k != i], args.degree):
                if (j, i) not in pairs:
                    pairs.add((i, j))
        schedule = [(m, (m * 7) % n, round(m / args.rate, 4)) for m in range(args.messages)]
        end = args.messages / args.rate + args.drain
        plan = {"addrs": addrs, "pairs": sorted(pairs), "schedule": schedule, "end": end}
        for p in procs:
            p.stdin.write(json.dumps(plan) + "\n")
            p.stdin.flush()
        ready = [json.loads(p.stdout.readline())["ready"] for p in procs]
        ready_s = time.time() - t_start
        for p in procs:
            p.stdin.write(json.dumps({"t0": time.time() + args.settle}) + "\n")
            p.stdin.flush()
        outs = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    sent, recv, sizes, mesh, counters = {}, {}, [], [], {}
    for o in outs:
        sent.update(o["sent"])
        recv.update(o["recv"])
        sizes += o["sizes"]
        mesh += o["mesh"]
        for k, v in o["counters"].items():
            counters[k] = counters.get(k, 0) + v
    lat_ms, to_all, prepare_ms = [], [], []
    for key, (stamp, publisher, called) in sent.items():
        prepare_ms.append((stamp - called) * 1000)
        remote = [(recv[f"{key}/{node}"] - stamp) * 1000 for node in range(n)
                  if node != publisher and f"{key}/{node}" in recv]
        lat_ms += remote
        if len(remote) == n - 1:
            to_all.append(max(remote))
    expected = len(sent) * (n - 1)
    return {
        "delivered": len(lat_ms), "expected": expected, "published": len(sent),
        "payload_bytes_mean": round(sum(sizes) / len(sizes), 1) if sizes else None,
        "mesh_sizes": mesh, "startup_s": round(startup_s, 2), "meshed_s": round(ready_s, 2),
        "p50_ms": round(pct(lat_ms, 50), 2) if lat_ms else None,
        "p95_ms": round(pct(lat_ms, 95), 2) if lat_ms else None,
        "max_ms": round(max(lat_ms), 2) if lat_ms else None,
        "to_all_p50_ms": round(pct(to_all, 50), 2) if to_all else None,
        "to_all_p95_ms": round(pct(to_all, 95), 2) if to_all else None,
        "publish_prepare_p50_ms": round(pct(prepare_ms, 50), 2) if prepare_ms else None,
        "publish_prepare_max_ms": round(max(prepare_ms), 2) if prepare_ms else None,
        "counters": {k: v for k, v in sorted(counters.items()) if ".accept." not in k},
        "accepted_offers": counters.get("offers.gossip.accept.offer"),
    }


def main(args) -> None:
    phases = {}
    for mode in ("baseline", "node"):
        phases[mode] = run_phase(mode, args)
        r = phases[mode]
        print(f"{mode}: delivered {r['delivered']}/{r['expected']}, p50 {r['p50_ms']} ms,"
              f" p95 {r['p95_ms']} ms, max {r['max_ms']} ms, mesh {r['mesh_sizes']}", flush=True)
    b, o = phases["baseline"], phases["node"]
    ratio = round(o["p95_ms"] / b["p95_ms"], 3) if b["p95_ms"] and o["p95_ms"] else None
    result = {
        "bench": "offer_propagation", "nodes": args.nodes, "processes": args.processes,
        "dial_degree": args.degree, "messages": args.messages, "rate_per_s": args.rate,
        "baseline": b, "node": o, "overhead_ratio_p95": ratio, "target_ratio_p95": 1.3,
        "python": platform.python_version(), "cpus": os.cpu_count(), "seed": args.seed,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=("baseline", "node"))
    parser.add_argument("--first", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--rate", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--mesh-timeout", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    if a.worker:
        trio.run(worker, a)
    else:
        main(a)
