"""CPU a pubsub flood costs the node it targets (issue 11, item 6).

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_pubsub_flood.py
The victim (GossipHost + OfferService + Store) runs in this process; the attacker runs in a
child process (this script with ``--attack``), connects over TCP + Noise + yamux and writes
``--rate`` messages per second for ``--seconds`` on a meshsub stream, 10 per RPC frame; when
the victim cuts it off it returns under a new peer id (``--no-rotate``: it stops). Kinds:
``bad_sig`` (envelopes with a broken signature), ``reject`` (well-signed envelopes carrying a
malformed payload: the validator's REJECT), ``ignore`` (well-signed envelopes carrying
expired offers: the validator's IGNORE), ``valid`` (well-signed, valid offers). Measured in the
victim's process only: CPU seconds per wall second over the flood (idle baseline alongside),
messages that reached the signature check / the validator, bytes logged at WARNING and above,
the attacker's score. ``--upstream-pubsub`` runs py-libp2p's own pubsub read loop instead of
:class:`node.libp2p_patches.GuardedPubsub` (the figures from before the fix; the other patches
stay). Prints a summary, then one JSON line (the last line).

Measured here (2 shared cores, 1,500 msg/s for 10 s, attacker returning under new peer ids):
victim CPU 0.18 s/s (bad_sig), 0.19-0.22 (ignore), 0.20 (reject), 0.22 (valid), about 550
validator calls (burst 100 + 50/s per IP) out of 15,000; with ``--upstream-pubsub`` (one
connection, never cut off) 0.47 s/s for bad_sig, 0.28-0.32 for ignore/valid. WARNING+ log:
15 records / 2.2 KB per run. node.offers still logs one INFO line per REJECT it validates
(about 540 lines / 69 KB in the reject run): that call site is not rate-limited yet.
"""

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

import node.host
from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC
from node.reqresp import encode_uvarint
from node.testing import LOOPBACK
from protocol.samples import make_offer, make_provider

HOUR_MS = 3_600_000


# ---- attacker (child process) ---------------------------------------------------------------

async def attack(args) -> None:
    """Flood at ``--rate`` for ``--seconds``; when cut off, come back under a new peer id (the
    worst case: identities are free) unless ``--no-rotate``."""
    n = int(args.rate * args.seconds)
    now_ms = int(time.time() * 1000)
    rng = random.Random(7)
    peer, _, binding = make_provider(rng)
    payloads = []
    for i in range(n):
        if args.kind == "bad_sig":
            payloads.append(rng.randbytes(300))
        elif args.kind == "reject":
            payloads.append(b"\xc1" + rng.randbytes(40))  # not msgpack: REJECT malformed
        elif args.kind == "ignore":
            payloads.append(make_offer(peer, binding, rng, now_ms - 2 * HOUR_MS, seq=i + 1,
                                       lifetime_ms=HOUR_MS).encode())
        else:
            payloads.append(make_offer(peer, binding, rng, now_ms, seq=i + 1).encode())
    victim_id = info_from_p2p_addr(multiaddr.Multiaddr(args.attack)).peer_id
    per_frame = 10
    sent = connections = refused = 0
    async with trio.open_nursery() as nursery:
        print("start", flush=True)
        t0 = time.perf_counter()
        interval = per_frame / args.rate
        frame_no = 0
        while frame_no * per_frame < n and time.perf_counter() - t0 < args.seconds:
            host = await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                                                  HostConfig(listen_addrs=LOOPBACK)).run)
            key = host.identity.key_pair
            try:
                await host.connect(args.attack)
                stream = await host.host.new_stream(victim_id, [PROTOCOL_ID_V12])
                connections += 1
            except Exception:
                refused += 1
                await trio.sleep(0.1)
                continue
            while frame_no * per_frame < n:
                batch = []
                for i in range(frame_no * per_frame, min(n, (frame_no + 1) * per_frame)):
                    msg = rpc_pb2.Message(from_id=host.peer_id.to_bytes(), data=payloads[i],
                                          seqno=i.to_bytes(8, "big"), topicIDs=[OFFER_TOPIC])
                    sig = key.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
                    msg.signature = bytes([sig[0] ^ 1]) + sig[1:] if args.kind == "bad_sig" else sig
                    msg.key = key.public_key.serialize()
                    batch.append(msg)
                body = rpc_pb2.RPC(publish=batch).SerializeToString()
                try:
                    await stream.write(encode_uvarint(len(body)) + body)
                except Exception:
                    break  # reset or disconnected by the victim
                sent += len(batch)
                frame_no += 1
                delay = t0 + frame_no * interval - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
            if args.no_rotate:
                break
        print(f"sent {sent} messages in {time.perf_counter() - t0:.2f} s over {connections} "
              f"connections ({refused} dials refused)", flush=True)
        nursery.cancel_scope.cancel()


# ---- victim (this process) ------------------------------------------------------------------

class ByteCount(logging.Handler):
    def __init__(self, level: int = logging.WARNING, prefix: str = "") -> None:
        super().__init__(level)
        self.prefix = prefix
        self.records = 0
        self.bytes = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(self.prefix):
            return
        self.records += 1
        self.bytes += len(self.format(record)) + 1


class UpstreamPubsub(Pubsub):
    """py-libp2p's Pubsub with GuardedPubsub's configuration hook as a no-op."""

    def configure_guard(self, limits, counters) -> None:
        pass


async def victim(args) -> dict:
    from tests.node.offer_helpers import start_node

    if args.upstream_pubsub:
        node.host.GuardedPubsub = UpstreamPubsub  # type: ignore[misc]
    logs = ByteCount()
    logging.getLogger().addHandler(logs)
    # `gpumarket node run` logs node.* at INFO: count what those loggers write too
    node_info = ByteCount(logging.INFO, prefix="node.")
    logging.getLogger().addHandler(node_info)
    logging.getLogger("node").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            v = await start_node(nursery, Path(tmp) / "victim.db")
            addr = str(v.host.addrs()[0])
            # idle baseline over the same window
            c0, t0 = time.process_time(), time.perf_counter()
            await trio.sleep(min(args.seconds, 5))
            idle = (time.process_time() - c0) / (time.perf_counter() - t0)
            before = Counter(v.service.counters)
            proc = await trio.lowlevel.open_process(
                [sys.executable, __file__, "--attack", addr, "--kind", args.kind,
                 "--rate", str(args.rate), "--seconds", str(args.seconds)]
                + (["--no-rotate"] if args.no_rotate else []),
                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
            buf = b""
            with trio.fail_after(120):
                while b"start" not in buf:
                    chunk = await proc.stdout.receive_some(1024)
                    if not chunk:
                        raise RuntimeError("attacker exited before starting")
                    buf += chunk
            logs.records = logs.bytes = node_info.records = node_info.bytes = 0
            lowest = [0.0]  # the attacker's lowest score while connected (gone once it leaves)

            async def watch_scores() -> None:
                while True:
                    for p in list(v.host.host.get_network().connections):
                        lowest[0] = min(lowest[0], v.host.score(p, OFFER_TOPIC))
                    await trio.sleep(0.2)

            nursery.start_soon(watch_scores)
            c0, t0 = time.process_time(), time.perf_counter()
            with trio.fail_after(args.seconds * 3 + 60):
                while chunk := await proc.stdout.receive_some(1024):
                    buf += chunk
                await proc.wait()
            await trio.sleep(1.0)  # drain what was admitted
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            after = Counter(v.service.counters)
            validated = sum((after - before).values())
            score = lowest[0]
            hc = v.host.counters if hasattr(v.host, "counters") else Counter()
            result = {
                "bench": "pubsub_flood", "kind": args.kind, "rate": args.rate,
                "seconds": args.seconds, "upstream_pubsub": args.upstream_pubsub,
                "rotate": not args.no_rotate,
                "attacker_says": buf.decode(errors="replace").strip().splitlines()[-1],
                "victim_cpu_per_s": round(cpu / wall, 3), "idle_cpu_per_s": round(idle, 3),
                "wall_s": round(wall, 1),
                "signatures_checked_by_guard": hc["p2p.pubsub.reject.bad_signature"],
                "validator_calls": validated,
                "dropped_message_rate": hc["p2p.pubsub.drop.message_rate"],
                "dropped_graylisted_frames": hc["p2p.pubsub.drop.graylisted_rpc"],
                "attacker_lowest_score": round(score, 1),
                "log_records_warning_plus": logs.records, "log_bytes_warning_plus": logs.bytes,
                "node_info_log_records": node_info.records, "node_info_log_bytes": node_info.bytes,
            }
            nursery.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("bad_sig", "reject", "ignore", "valid"), default="bad_sig")
    parser.add_argument("--rate", type=float, default=1500.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--upstream-pubsub", action="store_true")
    parser.add_argument("--no-rotate", action="store_true",
                        help="the attacker stops when cut off instead of returning as a new peer")
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # child process: the victim's addr
    args = parser.parse_args()
    if args.attack:
        trio.run(attack, args)
        sys.exit(0)
    result = trio.run(victim, args)
    print(f"{result['kind']} flood at {result['rate']:.0f}/s, attacker: {result['attacker_says']} "
          f"({'py-libp2p read loop' if args.upstream_pubsub else 'GuardedPubsub'}): victim CPU "
          f"{result['victim_cpu_per_s']} s/s (idle {result['idle_cpu_per_s']}); validator calls "
          f"{result['validator_calls']}; signatures checked by the guard "
          f"{result['signatures_checked_by_guard']}; attacker's lowest score "
          f"{result['attacker_lowest_score']}; "
          f"log {result['log_records_warning_plus']} records / {result['log_bytes_warning_plus']} B "
          f"at WARNING+, node.* at INFO+ {result['node_info_log_records']} records / "
          f"{result['node_info_log_bytes']} B")
    print(json.dumps(result))
