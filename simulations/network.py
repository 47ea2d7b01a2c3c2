"""The network model, kept outside the agents (SimPy's latency example; Shadow's idea).

Latency: the mean RTT between two regions comes from simulations/data/region_rtt_ms.csv
(IBM Cloud VPC inter-region table, Aug-Sep 2024); one-way = RTT/2 * (1 + jitter * U(-1, 1));
two nodes of one region use `intra_region_rtt_ms`. Bandwidth: every transmission adds
size * 8 / uplink. Loss: each transmission is lost with probability `loss`; direct streams are
reliable (TCP/QUIC-like), so a loss there costs a retransmission of max(RTO, 2 RTT), while
gossip copies are simply lost. Partitions: from `partition_start_s` until `partition_heal_s`,
nothing crosses between the partitioned regions and the rest.

The gossip overlay (a model of gossipsub v1.0/1.1, see simulations/README.md) is `Overlay`.
"""

from __future__ import annotations

import bisect
import csv
import pathlib
import random
from typing import Any, Callable

import numpy as np

from protocol.samples import REGIONS

DATA = pathlib.Path(__file__).resolve().parent / "data"
RTT_CSV = DATA / "region_rtt_ms.csv"
CITY = {
    "us-dallas": "Dallas", "ca-toronto": "Toronto", "us-washington": "Washington DC",
    "eu-frankfurt": "Frankfurt", "eu-london": "London", "eu-madrid": "Madrid",
    "jp-osaka": "Osaka", "au-sydney": "Sydney", "jp-tokyo": "Tokyo", "br-saopaulo": "Sao Paulo",
}
INF = np.iinfo(np.int64).max // 4


def load_rtt(intra_ms: float) -> np.ndarray:
    """RTT matrix (ms) indexed like protocol.samples.REGIONS."""
    rows = [r for r in csv.reader(line for line in RTT_CSV.read_text().splitlines()
                                  if not line.startswith("#"))]
    header = rows[0][1:]
    table = {r[0]: dict(zip(header, map(float, r[1:]))) for r in rows[1:]}
    m = np.zeros((len(REGIONS), len(REGIONS)))
    for i, a in enumerate(REGIONS):
        for j, b in enumerate(REGIONS):
            m[i, j] = intra_ms if i == j else table[CITY[a]][CITY[b]]
    return m


class Network:
    """Point-to-point delivery of bytes between nodes (negotiation and rental streams)."""

    def __init__(self, cfg: dict, engine: Any, rng: random.Random, regions: list[int],
                 online: list[bool], start_ms: int) -> None:
        n = cfg["network"]
        self.cfg = n
        self.engine = engine
        self.rng = rng
        self.rtt = load_rtt(n["intra_region_rtt_ms"])
        self.regions = regions  # node index -> region index
        self.online = online  # shared list, maintained by the world
        self.bits_per_ms = n["bandwidth_mbps"] * 1000.0
        self.start_ms = start_ms
        self.part_start = None if n["partition_start_s"] < 0 else start_ms + n["partition_start_s"] * 1000
        self.part_heal = None if n["partition_heal_s"] < 0 else start_ms + n["partition_heal_s"] * 1000
        self.part_regions = {REGIONS.index(r) for r in n["partition_regions"]}
        self._last: dict[tuple[int, int], int] = {}  # stream FIFO: last delivery time per pair
        self.sent = 0
        self.dropped = 0
        self.bytes = 0

    def partitioned_now(self) -> bool:
        now = self.engine.now
        return (self.part_start is not None and now >= self.part_start
                and (self.part_heal is None or now < self.part_heal) and bool(self.part_regions))

    def side(self, node: int) -> bool:
        return self.regions[node] in self.part_regions

    def cut(self, a: int, b: int) -> bool:
        return self.partitioned_now() and self.side(a) != self.side(b)

    def one_way_ms(self, a: int, b: int) -> float:
        base = self.rtt[self.regions[a], self.regions[b]] / 2.0
        return base * (1.0 + self.cfg["jitter_frac"] * (2.0 * self.rng.random() - 1.0))

    def send(self, src: int, dst: int, data: bytes, deliver: Callable[[int, bytes], None]) -> None:
        """Deliver `data` to `deliver(src, data)` after the modelled delay, unless either end is
        offline or the partition separates them (then the stream breaks and the bytes are lost)."""
        self.sent += 1
        self.bytes += len(data)
        if not self.online[src] or not self.online[dst] or self.cut(src, dst):
            self.dropped += 1
            return
        delay = self.one_way_ms(src, dst) + len(data) * 8 / self.bits_per_ms + self.cfg["per_message_cpu_ms"]
        loss = self.cfg["loss"]
        if loss > 0:
            rto = max(self.cfg["retransmit_timeout_ms"], self.rtt[self.regions[src], self.regions[dst]] * 2)
            while self.rng.random() < loss:
                delay += rto
        t = self.engine.now + max(1, round(delay))
        key = (src, dst)
        t = max(t, self._last.get(key, 0))  # a stream delivers in order
        self._last[key] = t
        self.engine.at(t, self._arrive, src, dst, data, deliver)

    def _arrive(self, src: int, dst: int, data: bytes, deliver: Callable[[int, bytes], None]) -> None:
        if not self.online[dst] or self.cut(src, dst):
            self.dropped += 1
            return
        deliver(src, data)


class Overlay:
    """A gossipsub-like overlay on one topic. Connections are random; each node keeps a mesh of
    D_low..D_high peers among its connections, repaired at heartbeats (GRAFT/PRUNE are modelled
    as immediate and mutual). A message is pushed eagerly along mesh links (each relay validates
    first, then sends its copies one after another on its uplink), and advertised lazily
    (IHAVE) to D_lazy non-mesh peers at each of the next `mcache_gossip` heartbeats of each
    holder; a peer that lacks it answers IWANT and gets it: 3 one-way trips after the
    heartbeat. The arrival time at every node is computed at publish time by a label-correcting
    shortest-path pass over these edges in numpy (exact for eager push with independent link
    delays; see README "Gossip model" for what that assumes)."""

    def __init__(self, cfg: dict, net: Network, nprng: np.random.Generator, rng: random.Random,
                 n_nodes: int) -> None:
        self.g = cfg["gossip"]
        self.ncfg = cfg["network"]
        self.net = net
        self.np = nprng
        self.rng = rng
        self.n = n_nodes
        self.conn: list[set[int]] = [set() for _ in range(n_nodes)]
        self.mesh: list[set[int]] = [set() for _ in range(n_nodes)]
        self.graylist: list[set[int]] = [set() for _ in range(n_nodes)]  # peers v ignores
        self.invalid_from: dict[tuple[int, int], int] = {}
        self.phase = nprng.integers(0, self.g["heartbeat_ms"], size=n_nodes)  # heartbeat phases
        self.dirty: set[int] = set()
        # out-edges of each node (mesh then lazy), rebuilt only for nodes marked in edge_dirty
        self.edge_dirty: set[int] = set(range(n_nodes))
        self._out: list[tuple] = [(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)] * n_nodes
        self.rtt_half = net.rtt / 2.0
        self.node_region = np.array(net.regions, dtype=np.int64)
        self.node_side = np.array([net.side(i) for i in range(n_nodes)], dtype=bool)
        self._edges_version = -1
        self.version = 0
        self.grafts = 0
        self.prunes = 0

    # -- membership ------------------------------------------------------------------------

    def join(self, u: int, online_nodes: list[int]) -> None:
        k = self.ncfg["connections"]
        i = bisect.bisect_left(online_nodes, u)  # online_nodes is sorted
        candidates = (online_nodes[:i] + online_nodes[i + 1:]
                      if i < len(online_nodes) and online_nodes[i] == u else list(online_nodes))
        for v in (self.rng.sample(candidates, k) if len(candidates) > k else candidates):
            self.conn[u].add(v)
            self.conn[v].add(u)
            self.dirty.add(v)
            self.edge_dirty.add(v)
        self.dirty.add(u)
        self.edge_dirty.add(u)
        self.version += 1

    def leave(self, u: int) -> None:
        for v in self.conn[u]:
            self.conn[v].discard(u)
            if u in self.mesh[v]:
                self.mesh[v].discard(u)
            self.dirty.add(v)
            self.edge_dirty.add(v)
        self.edge_dirty.add(u)
        self.conn[u].clear()
        self.mesh[u].clear()
        self.dirty.discard(u)
        self.version += 1

    def heartbeat(self) -> None:
        """Mesh maintenance for every node whose mesh may be outside [D_low, D_high]; any other
        node's heartbeat would change nothing (no opportunistic grafting, no score decay)."""
        g = self.g
        work = sorted(self.dirty)
        self.dirty.clear()
        for u in work:
            mesh = self.mesh[u]
            if len(mesh) < g["D_low"]:
                cands = sorted(v for v in self.conn[u] - mesh if v not in self.graylist[u]
                               and u not in self.graylist[v])
                self.rng.shuffle(cands)
                for v in cands[: g["D"] - len(mesh)]:
                    mesh.add(v)
                    self.mesh[v].add(u)
                    self.edge_dirty.update((u, v))
                    self.grafts += 1
                    if len(self.mesh[v]) > g["D_high"]:
                        self.dirty.add(v)
                self.version += 1
            elif len(mesh) > g["D_high"]:
                drop = sorted(mesh)
                self.rng.shuffle(drop)
                for v in drop[: len(mesh) - g["D"]]:
                    mesh.discard(v)
                    self.mesh[v].discard(u)
                    self.edge_dirty.update((u, v))
                    self.prunes += 1
                    if len(self.mesh[v]) < g["D_low"]:
                        self.dirty.add(v)
                self.version += 1

    # -- edges ------------------------------------------------------------------------------

    def _node_out(self, u: int) -> tuple:
        """u's out-edges: mesh peers (sorted; the k-th gets the k-th copy), then the other
        connections (lazy); per edge its destination and code k (0 = lazy), and the number of
        lazy edges; plus which of them ignore u (graylist)."""
        mesh = sorted(self.mesh[u])
        lazy = sorted(self.conn[u] - self.mesh[u])
        dst = np.array(mesh + lazy, dtype=np.int64)
        k = np.zeros(len(dst), np.int64)
        k[: len(mesh)] = np.arange(1, len(mesh) + 1)
        gray = [i for i, v in enumerate(mesh + lazy) if u in self.graylist[v]]
        if gray:
            k[gray] = -1  # v ignores u: the edge carries nothing
        return dst, k, len(lazy)

    def _rebuild(self) -> None:
        """The overlay as arrays by source (CSR), from the per-node out-edges."""
        for u in sorted(self.edge_dirty):
            self._out[u] = self._node_out(u) if self.conn[u] else (np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        self.edge_dirty.clear()
        out = self._out
        counts = np.fromiter((len(o[0]) for o in out), dtype=np.int64, count=self.n)
        self.indptr = np.zeros(self.n + 1, np.int64)
        np.cumsum(counts, out=self.indptr[1:])
        m = int(self.indptr[-1])
        if m:
            self.e_dst = np.concatenate([o[0] for o in out])
            k = np.concatenate([o[1] for o in out])
        else:
            self.e_dst = np.zeros(0, np.int64)
            k = np.zeros(0, np.int64)
        self.e_src = np.repeat(np.arange(self.n), counts)
        self.e_lazy = k == 0
        self.e_dead = k < 0  # graylisted by the destination
        self.dead_idx = np.flatnonzero(self.e_dead)
        self.lazy_idx = np.flatnonzero(self.e_lazy)
        base = self.rtt_half[self.node_region[self.e_src], self.node_region[self.e_dst]]
        self.e_base = base
        self.e_cross = self.node_side[self.e_src] != self.node_side[self.e_dst]
        # per-link constants of this message-independent part of the delay model
        c, g = self.ncfg, self.g
        jf = c["jitter_frac"]
        self.e_k = np.maximum(k, 0).astype(np.float32)
        self.e_a = (c["validate_ms"] + base * (1.0 - jf)).astype(np.float32)  # one_way = base(1-jf) + b*U
        self.e_b = (2.0 * jf * base).astype(np.float32)
        n_lazy = np.fromiter((o[2] for o in out), dtype=np.int64, count=self.n)
        p = np.minimum(1.0, g["D_lazy"] / np.maximum(n_lazy, 1))[self.e_src[self.lazy_idx]]
        G = g["mcache_gossip"] if g["D_lazy"] > 0 else 0
        with np.errstate(divide="ignore"):
            # slot = floor(log(1-U) / log(1-p)) is the first of the heartbeats 0, 1, ... at
            # which the link is chosen (each with probability p); used if slot < G, i.e. U < q
            self.l_inv = np.where(p >= 1.0, 0.0, 1.0 / np.log1p(-p)).astype(np.float32) \
                if len(p) else np.zeros(0, np.float32)
        self.l_q = 1.0 - (1.0 - p) ** G
        self.l_a = (c["validate_ms"] + 3.0 * base[self.lazy_idx] * (1.0 - jf)).astype(np.float32)
        self.l_b = (3.0 * self.e_b[self.lazy_idx]).astype(np.float32)
        self._edges_version = self.version

    def flood(self, origin: int, size: int, t0: int, forwards: np.ndarray) -> np.ndarray:
        """Arrival times (absolute ms, INF where never) of one message published by `origin` at
        t0. `forwards[v]`: v relays it (online and judging it valid). The origin always sends.

        Every link's delay for this message is drawn first (eager: validate, then the k-th copy
        after k transmissions, plus the one-way delay; lazy: the holder's next heartbeat after it
        has the message, plus `slot` heartbeats, then IHAVE/IWANT/message, three one-way trips;
        a lazy link is used at the first of the next `mcache_gossip` heartbeats at which it is
        chosen, each with probability p). Then a label-correcting shortest-path pass: each round
        relaxes only the out-links of the nodes whose arrival improved in the round before.
        Times inside are float32 ms relative to t0 (sub-microsecond precision at these delays)."""
        if self._edges_version != self.version:
            self._rebuild()
        n = self.n
        arr = np.full(n, np.inf, dtype=np.float32)
        arr[origin] = 0.0
        m = len(self.e_dst)
        if m:
            g, c = self.g, self.ncfg
            rnd = self.np.random
            tx = np.float32(size * 8 / self.net.bits_per_ms + c["per_message_cpu_ms"])
            hb = np.float32(g["heartbeat_ms"])
            r = rnd(m, dtype=np.float32)
            delay = self.e_k * tx
            delay += self.e_a
            delay += self.e_b * r
            li = self.lazy_idx
            if len(li):
                u = rnd(len(li), dtype=np.float32)
                slot = np.floor(np.log1p(-u) * self.l_inv)
                dl = self.l_a + self.l_b * r[li] + tx + slot * hb
                dl[u >= self.l_q] = np.inf
                delay[li] = dl
            if len(self.dead_idx):
                delay[self.dead_idx] = np.inf
            if c["loss"] > 0:
                delay[rnd(m) < c["loss"]] = np.inf
            if self.net.partitioned_now():
                delay[self.e_cross] = np.inf
            indptr, dst, lazy = self.indptr, self.e_dst, self.e_lazy
            # each node's heartbeat phase relative to t0, in [0, hb)
            phase = ((self.phase - t0) % g["heartbeat_ms"]).astype(np.float32)
            relay = forwards.copy()
            relay[origin] = True
            frontier = np.array([origin], dtype=np.int64)
            while len(frontier):
                lo = indptr[frontier]
                cnt = indptr[frontier + 1] - lo
                tot = int(cnt.sum())
                if not tot:
                    break
                eid = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(tot)
                a = np.repeat(arr[frontier], cnt)
                lz = lazy[eid]
                if lz.any():
                    ph = np.repeat(phase[frontier], cnt)
                    # the holder's next heartbeat at or after it has the message
                    a = np.where(lz, np.ceil((a - ph) / hb) * hb + ph, a)
                cand = a + delay[eid]
                prev = arr.copy()
                np.minimum.at(arr, dst[eid], cand)
                better = np.flatnonzero(arr < prev)
                frontier = better[relay[better]]
        out = np.full(n, INF, dtype=np.int64)
        fin = np.isfinite(arr)
        out[fin] = t0 + np.ceil(arr[fin]).astype(np.int64)
        return out

    def invalid_flood(self, origin: int, colluders: set[int], honest_online) -> list[int]:
        """An invalid message: colluders relay it to their mesh peers, honest nodes validate,
        REJECT and drop it (and count it against the sender: after `graylist_after_invalid`
        they prune and ignore that peer). Returns the hop count at each honest drop."""
        hops_at_drop: list[int] = []
        seen = {origin}
        frontier = [origin]
        hop = 0
        thr = self.g["graylist_after_invalid"]
        while frontier:
            hop += 1
            nxt = []
            for u in frontier:
                for v in sorted(self.mesh[u]):
                    if v in seen or u in self.graylist[v]:
                        continue
                    if self.net.cut(u, v):
                        continue
                    seen.add(v)
                    if v in colluders:
                        nxt.append(v)
                    elif honest_online(v):
                        hops_at_drop.append(hop)
                        key = (v, u)
                        self.invalid_from[key] = self.invalid_from.get(key, 0) + 1
                        if self.invalid_from[key] >= thr:
                            self.graylist[v].add(u)
                            self.mesh[v].discard(u)
                            self.mesh[u].discard(v)
                            self.dirty.update((u, v))
                            self.edge_dirty.update((u, v))
                            self.version += 1
            frontier = nxt
        return hops_at_drop
