"""Discovery beyond the bootstrap list (issue 15): node/discovery.py ("ours") beside py-libp2p
0.8.1's Kademlia DHT (a self-lookup every 2 s) and gossipsub v1.1 peer exchange, bare library, N hosts on 127.0.0.1 in one process, each bootstrapped
to one seed only. Figures: seconds until every node knows >= K other peers (and is connected to
>= K), lookups/PRUNEs spent, and bytes written on all TCP connections (all protocols: gossipsub
heartbeats are part of the PX figure, since PX needs the mesh).

    PYTHONPATH=. python -m tests.benchmarks.bench_discovery [--nodes 12] [--k 4] [--seconds 40]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp import tcp as tcp_mod

from node.host import build_libp2p_host
from node.identity import NodeIdentity

LOCAL = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
BYTES = [0]


def count_bytes() -> None:
    write = tcp_mod.TrioTCPStream.write

    async def counted(self, data: bytes) -> None:
        BYTES[0] += len(data)
        await write(self, data)

    tcp_mod.TrioTCPStream.write = counted  # type: ignore[method-assign]


async def start_host(stack: AsyncExitStack):
    h = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [LOCAL])
    await stack.enter_async_context(h.run([LOCAL]))
    return h


def addr_of(h) -> str:
    return f"{h.get_transport_addrs()[0]}/p2p/{h.get_id()}"


async def run_dht(n: int, k: int, seconds: float) -> dict:
    async with AsyncExitStack() as stack:
        hosts, dhts = [], []
        for _ in range(n):
            h = await start_host(stack)
            d = KadDHT(h, DHTMode.SERVER, enable_providers=False, enable_values=False)
            await stack.enter_async_context(background_trio_service(d))
            hosts.append(h)
            dhts.append(d)
        seed = hosts[0]
        BYTES[0] = 0
        lookups = [0]
        t0 = trio.current_time()

        async def node(i: int) -> None:
            h, d = hosts[i], dhts[i]
            await h.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr_of(seed))))
            await d.add_peer(seed.get_id())
            while True:  # a self-lookup every 2 s (py-libp2p's own refresh: every 600 s)
                await d.peer_routing.find_closest_peers_network(h.get_id().to_bytes())
                lookups[0] += 1
                await trio.sleep(2)

        return await measure(hosts, [lambda i=i: dhts[i].routing_table.size() for i in range(n)],
                             node, k, seconds, t0, lambda: {"lookups": lookups[0]})


async def run_px(n: int, k: int, seconds: float, seed_degree: int) -> dict:
    async with AsyncExitStack() as stack:
        hosts, routers = [], []
        for i in range(n):
            h = await start_host(stack)
            degree = seed_degree if i == 0 else 6
            g = GossipSub([PROTOCOL_ID_V11], degree=degree, degree_low=min(4, degree),
                          degree_high=max(12 if degree else 0, degree), heartbeat_interval=1,
                          do_px=True)
            p = Pubsub(h, g)
            await stack.enter_async_context(background_trio_service(p))
            await stack.enter_async_context(background_trio_service(g))
            await p.wait_until_ready()
            await p.subscribe("offers")
            hosts.append(h)
            routers.append(g)
        seed = hosts[0]
        BYTES[0] = 0
        t0 = trio.current_time()

        async def node(i: int) -> None:
            await hosts[i].connect(info_from_p2p_addr(multiaddr.Multiaddr(addr_of(seed))))
            await trio.sleep_forever()

        def known(i: int) -> int:
            me = hosts[i].get_id()
            return len([p for p in hosts[i].get_peerstore().peers_with_addrs() if p != me])

        return await measure(hosts, [lambda i=i: known(i) for i in range(n)], node, k, seconds,
                             t0, lambda: {})


async def measure(hosts, known, node, k, seconds, t0, extra) -> dict:
    n = len(hosts)
    t_known = [None] * n
    t_conn = [None] * n
    async with trio.open_nursery() as nursery:
        for i in range(1, n):
            nursery.start_soon(node, i)
        with trio.move_on_after(seconds):
            while True:
                now = trio.current_time() - t0
                for i in range(1, n):
                    if t_known[i] is None and known[i]() >= k:
                        t_known[i] = now
                    if t_conn[i] is None and len(hosts[i].get_connected_peers()) >= k:
                        t_conn[i] = now
                if all(t is not None for t in t_known[1:] + t_conn[1:]):
                    break
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    done_k = [t for t in t_known[1:] if t is not None]
    done_c = [t for t in t_conn[1:] if t is not None]
    return {"nodes_reaching_k_known": len(done_k), "nodes_reaching_k_connected": len(done_c),
            "of": n - 1, "max_s_known": round(max(done_k), 2) if done_k else None,
            "max_s_connected": round(max(done_c), 2) if done_c else None,
            "mean_known_at_end": round(sum(f() for f in known[1:]) / (n - 1), 1),
            "bytes_written": BYTES[0], **extra()}


async def run_ours(n: int, k: int, seconds: float) -> dict:
    """node/discovery.py with its default config but 4 dials per IP per round (first round after 2 s, then every 5 s while
    below 8 direct peers, else 30 s; 4 dials per round), on GossipHost (gossipsub runs too, as
    in the node). Discovery's counters share the host's Counter, so they are summed per host."""
    from node.discovery import Discovery, DiscoveryConfig
    from node.host import GossipHost, HostConfig
    from node.peer_table import PeerTable

    async with trio.open_nursery() as outer:
        hosts, discs = [], []
        for i in range(n):
            g = GossipHost(NodeIdentity.from_seed(os.urandom(32)),
                           HostConfig(listen_addrs=(str(LOCAL),), reachability=None))
            await outer.start(g.run)
            hosts.append(g)
            # every node here is at 127.0.0.1: allow the per-round dials per IP that distinct
            # addresses would get (4), else the default 1 per IP per round throttles loopback
            discs.append(Discovery(g, PeerTable(g, None, None).dialable,
                                   DiscoveryConfig(dials_per_ip_per_round=4)))
        seed = hosts[0]
        outer.start_soon(discs[0].run)
        BYTES[0] = 0
        t0 = trio.current_time()

        async def node(i: int) -> None:
            await hosts[i].connect(str(seed.addrs()[0]))
            await discs[i].run()

        def known(i: int) -> int:
            return len(hosts[i].host.get_network().connections) + len(discs[i].candidates)

        out = await measure([h.host for h in hosts], [lambda i=i: known(i) for i in range(n)],
                            node, k, seconds, t0,
                            lambda: {"queries": sum(d.counters["discovery.queries"] for d in discs),
                                     "dials": sum(d.counters["discovery.dials"] for d in discs)})
        outer.cancel_scope.cancel()
    return out


async def main(args) -> dict:
    out = {}
    for name, run in (("ours", lambda: run_ours(args.nodes, args.k, args.seconds)),
                      ("dht", lambda: run_dht(args.nodes, args.k, args.seconds)),
                      ("px_default_degree", lambda: run_px(args.nodes, args.k, args.seconds, 6)),
                      ("px_seed_degree_0", lambda: run_px(args.nodes, args.k, args.seconds, 0))):
        t = time.monotonic()
        out[name] = await run()
        out[name]["wall_s"] = round(time.monotonic() - t, 1)
        print(name, out[name], flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    count_bytes()
    result = trio.run(main, args)
    print(json.dumps({"nodes": args.nodes, "k": args.k, "load": os.getloadavg()[0], **result}))
