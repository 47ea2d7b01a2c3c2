"""The flood (Overlay.flood and its compiled pass `earliest_arrivals`) against two independent
references: a plain Dijkstra in Python over the overlay's mesh and connections, with the random
parts of the model switched off (no jitter, every lazy link chosen at the next heartbeat) so both
must give the same arrival times; and, with every random part on (jitter, lazy slots, loss, a
partition, graylisted links, nodes that do not relay), a vectorised label-correcting pass in
numpy over the same draws, which must agree bit for bit."""

from __future__ import annotations

import heapq
import math
import random

import numpy as np

from simulations.config import resolve
from simulations.engine import EPOCH_MS, Engine
from simulations import network
from simulations.network import INF, Network, Overlay, earliest_arrivals, link_uniform, splitmix64


def _overlay(n: int, seed: int, d_lazy: int = 1000):
    cfg = resolve({"network": {"jitter_frac": 0.0, "connections": 5},
                   "gossip": {"D_lazy": d_lazy, "mcache_gossip": 1, "D": 3, "D_low": 2, "D_high": 5}})
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


def _uniforms(key, which, m):
    """Each link's uniform `which` for the message with this key: SplitMix64 in numpy."""
    i = np.arange(m, dtype=np.uint64) * np.uint64(3) + np.uint64(which)
    z = np.uint64(key) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def test_link_uniforms__are_splitmix64():
    # the first outputs of SplitMix64 seeded with 0 (the reference generator's published ones)
    assert int(splitmix64(np.uint64(0), np.uint64(0))) == 0xE220A8397B1DCDAF
    assert int(splitmix64(np.uint64(0), np.uint64(1))) == 0x6E789E6AA1B965F4
    want = _uniforms(12345, 2, 50)
    assert [link_uniform(np.uint64(12345), e, 2) for e in range(50)] == list(want)
    assert 0.3 < want.mean() < 0.7


def _delays(indptr, dst, par, cross, node_q, key, loss, cut, tx, hb):
    """Every link's delay (inf: carries nothing) and, for lazy links, its slot."""
    n, m = len(indptr) - 1, len(dst)
    k, a, b = par[:, 0], par[:, 1], par[:, 2]
    r, u = _uniforms(key, 0, m), _uniforms(key, 1, m)
    src = np.repeat(np.arange(n), np.diff(indptr))
    slot = (u[:, None] >= node_q[src]).sum(axis=1).astype(np.float32)
    dl = a + b * r + tx + slot * hb
    dl[slot == node_q.shape[1]] = np.inf
    delay = np.where(k == 0, dl, k * tx + a + b * r).astype(np.float32)
    delay[k < 0] = np.inf
    if loss > 0:
        delay[_uniforms(key, 2, m) < loss] = np.inf
    if cut:
        delay[cross] = np.inf
    return delay, slot


def _departures(indptr, par, t, phase, hb):
    """When each link of these holders (arrival t) sends: a lazy one at the next heartbeat."""
    src = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    t, ph = t[src], phase[src]
    return np.where(par[:, 0] == 0, np.ceil((t - ph) / hb) * hb + ph, t)


def _label_correcting(indptr, dst, par, cross, node_q, key, loss, cut, tx, hb, phase, relays,
                      origin):
    """The same model as `earliest_arrivals`, computed another way: every link's delay as a
    numpy array first, then rounds that relax the out-links of the nodes whose arrival improved
    in the round before, until none does (the simulator's flood before it was compiled)."""
    n = len(indptr) - 1
    delay, _ = _delays(indptr, dst, par, cross, node_q, key, loss, cut, tx, hb)
    lazy = par[:, 0] == 0
    arr = np.full(n, np.inf, dtype=np.float32)
    arr[origin] = 0.0
    relay = relays.copy()
    relay[origin] = True
    frontier = np.array([origin])
    while len(frontier):
        lo = indptr[frontier]
        cnt = indptr[frontier + 1] - lo
        eid = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        t = np.repeat(arr[frontier], cnt)
        ph = np.repeat(phase[frontier], cnt)
        dep = np.where(lazy[eid], np.ceil((t - ph) / hb) * hb + ph, t)
        prev = arr.copy()
        np.minimum.at(arr, dst[eid], dep + delay[eid])
        better = np.flatnonzero(arr < prev)
        frontier = better[relay[better]]
    return arr


def _lazy_slots_used(links, draws, relays, origin, arr) -> set[int]:
    """The slots of the lazy links that brought some node its first copy."""
    indptr, dst, par, cross, node_q = links
    key, loss, cut, tx, hb, phase = draws
    delay, slot = _delays(indptr, dst, par, cross, node_q, key, loss, cut, tx, hb)
    sends = np.repeat(relays | (np.arange(len(arr)) == origin), np.diff(indptr))
    first = sends & (par[:, 0] == 0) & (_departures(indptr, par, arr, phase, hb) + delay == arr[dst])
    return {int(s) for s in slot[first]}


def test_flood__compiled_pass_equals_a_label_correcting_pass_bit_for_bit():
    cfg = resolve({"network": {"jitter_frac": 0.3, "connections": 8, "loss": 0.05,
                               "partition_start_s": 0, "partition_heal_s": 60,
                               "partition_regions": ["eu-frankfurt", "eu-london"]},
                   "gossip": {"D": 2, "D_low": 1, "D_high": 3, "D_lazy": 2, "mcache_gossip": 3}})
    n = 300
    seen_slots: set[int] = set()
    for seed in range(4):
        rng = random.Random(seed)
        regions = [rng.randrange(10) for _ in range(n)]
        engine = Engine(EPOCH_MS)
        net = Network(cfg, engine, random.Random(1), regions, [True] * n, EPOCH_MS)
        ov = Overlay(cfg, net, np.random.Generator(np.random.PCG64(seed)), random.Random(seed), n)
        for u in range(n):
            ov.join(u, list(range(u)))
        ov.heartbeat()
        for v in rng.sample(range(n), 20):  # graylisted links carry nothing
            w = next(iter(ov.conn[v]))
            ov.graylist[v].add(w)
            ov.edge_dirty.update((v, w))
            ov.version += 1
        relays = np.array([rng.random() > 0.1 for _ in range(n)])
        links = ov.links()
        for t0 in (EPOCH_MS + 17, EPOCH_MS + 90_000):  # inside the partition, then after it
            engine.now = t0
            draws = ov.draw(900, t0)
            assert draws[1] > 0 and draws[2] == (t0 < EPOCH_MS + 60_000)  # loss; the partition
            got = earliest_arrivals(*links, *draws, relays, seed)
            want = _label_correcting(*links, *draws, relays, seed)
            assert np.isfinite(got).sum() > n // 2
            seen_slots.update(_lazy_slots_used(links, draws, relays, seed, got))
            assert np.array_equal(got, want), (seed, t0)
    assert seen_slots >= {0, 1, 2}  # the first arrival came over a lazy link at each slot


def test_links__rewritten_blocks_equal_a_fresh_layout(monkeypatch):
    # joins, leaves, mesh repairs and graylisting rewrite single nodes' blocks in place; the
    # arrays must then hold what laying the whole overlay out afresh gives (little room, so
    # that some joins also overflow a block and force a new layout)
    monkeypatch.setattr(network, "LINK_SLACK", 1)
    cfg, net, ov = _overlay(120, 3, d_lazy=2)
    rng = random.Random(9)
    online = list(range(120))
    ov.links()
    rewrites = layouts = 0
    for step in range(200):
        op = rng.random()
        if op < 0.3 and len(online) > 20:
            u = online.pop(rng.randrange(len(online)))
            ov.leave(u)
        elif op < 0.6:
            off = sorted(set(range(120)) - set(online))
            if off:
                u = rng.choice(off)
                ov.join(u, online)
                online = sorted(online + [u])
        elif op < 0.7:
            v = rng.choice(online)
            if ov.conn[v]:
                ov.graylist[v].add(rng.choice(sorted(ov.conn[v])))
                ov.edge_dirty.update(ov.conn[v] | {v})
                ov.version += 1
        ov.heartbeat()
        before = ov.indptr
        ov.links()
        if ov.indptr is before:
            rewrites += 1
        else:
            layouts += 1
        if step % 20 == 19:
            got = (ov.indptr, ov.e_dst.copy(), ov.e_par.copy(), ov.e_cross.copy(), ov.node_q.copy())
            ov._layout()
            for u in range(120):
                n = len(ov.conn[u])
                a, b = got[0][u], ov.indptr[u]
                assert np.array_equal(got[1][a:a + n], ov.e_dst[b:b + n]), u
                assert np.array_equal(got[2][a:a + n], ov.e_par[b:b + n]), u
                assert np.array_equal(got[3][a:a + n], ov.e_cross[b:b + n]), u
                assert (got[2][a + n:got[0][u + 1], 0] == network.PAD).all()
            assert np.array_equal(got[4], ov.node_q)
    assert rewrites > 100 and layouts >= 1
