"""The vectorised flood (Overlay.flood) against a plain Dijkstra over the same links, with the
random parts of the model switched off (no jitter, every lazy link chosen at the next
heartbeat) so both must give the same arrival times."""

from __future__ import annotations

import heapq
import math
import random

import numpy as np

from simulations.config import resolve
from simulations.engine import EPOCH_MS, Engine
from simulations.network import INF, Network, Overlay


def _overlay(n: int, seed: int):
    cfg = resolve({"network": {"jitter_frac": 0.0, "connections": 5},
                   "gossip": {"D_lazy": 1000, "mcache_gossip": 1, "D": 3, "D_low": 2, "D_high": 5}})
    rng = random.Random(seed)
    regions = [rng.randrange(10) for _ in range(n)]
    online = [True] * n
    net = Network(cfg, Engine(EPOCH_MS), random.Random(1), regions, online, EPOCH_MS)
    ov = Overlay(cfg, net, np.random.Generator(np.random.PCG64(seed)), random.Random(2), n)
    for u in range(n):
        ov.join(u, list(range(u + 1)))
    ov.heartbeat()
    return cfg, net, ov


def _dijkstra(cfg, net, ov, origin, size, t0, forwards):
    c, g = cfg["network"], cfg["gossip"]
    tx = size * 8 / net.bits_per_ms + c["per_message_cpu_ms"]
    hb = g["heartbeat_ms"]
    dist = {origin: float(t0)}
    heap = [(float(t0), origin)]
    done = set()
    while heap:
        a, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        if u != origin and not forwards[u]:
            continue
        mesh = sorted(ov.mesh[u])
        for k, v in enumerate(mesh, 1):
            cand = a + c["validate_ms"] + k * tx + net.rtt[net.regions[u], net.regions[v]] / 2
            if cand < dist.get(v, math.inf):
                dist[v] = cand
                heapq.heappush(heap, (cand, v))
        nxt = math.ceil((a - ov.phase[u]) / hb) * hb + ov.phase[u]
        for v in sorted(ov.conn[u] - ov.mesh[u]):
            cand = nxt + c["validate_ms"] + 3 * net.rtt[net.regions[u], net.regions[v]] / 2 + tx
            if cand < dist.get(v, math.inf):
                dist[v] = cand
                heapq.heappush(heap, (cand, v))
    return dist


def test_flood__equals_dijkstra_when_the_model_is_deterministic():
    for seed in range(5):
        cfg, net, ov = _overlay(80, seed)
        forwards = np.ones(80, dtype=bool)
        forwards[np.random.default_rng(seed).choice(80, 10, replace=False)] = False
        t0 = EPOCH_MS + 123_457
        got = ov.flood(seed, 700, t0, forwards)
        want = _dijkstra(cfg, net, ov, seed, 700, t0, forwards)
        for v in range(80):
            if v in want:
                assert abs(int(got[v]) - math.ceil(want[v])) <= 1, (seed, v)
            else:
                assert got[v] == INF
