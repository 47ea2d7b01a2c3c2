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
    heartbeat. The arrival time at every node is computed at publish time by a vectorised
    shortest-path relaxation over these edges (exact for eager push with independent link
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
        self._edges_version = -1
        self.version = 0
        self.grafts = 0
        self.prunes = 0

    # -- membership ------------------------------------------------------------------------

    def join(self, u: int, online_nodes: list[int]) -> None:
        k = self.ncfg["connections"]
        candidates = [v for v in online_nodes if v != u]
        for v in (self.rng.sample(candidates, k) if len(candidates) > k else candidates):
            self.conn[u].add(v)
            self.conn[v].add(u)
            self.dirty.add(v)
        self.dirty.add(u)
        self.version += 1

    def leave(self, u: int) -> None:
        for v in self.conn[u]:
            self.conn[v].discard(u)
            if u in self.mesh[v]:
                self.mesh[v].discard(u)
            self.dirty.add(v)
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
                    self.prunes += 1
                    if len(self.mesh[v]) < g["D_low"]:
                        self.dirty.add(v)
                self.version += 1

    # -- edges ------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        src, dst, k, lazy = [], [], [], []
        for u in range(self.n):
            if not self.conn[u]:
                continue
            for i, v in enumerate(sorted(self.mesh[u])):
                src.append(u); dst.append(v); k.append(i + 1); lazy.append(False)
            for v in sorted(self.conn[u] - self.mesh[u]):
                src.append(u); dst.append(v); k.append(1); lazy.append(True)
        src_a, dst_a = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
        order = np.lexsort((src_a, dst_a))
        self.e_src = src_a[order]
        self.e_dst = dst_a[order]
        self.e_k = np.array(k, dtype=np.float64)[order]
        self.e_lazy = np.array(lazy, dtype=bool)[order]
        regions = np.array(self.net.regions)
        self.e_base = self.net.rtt[regions[self.e_src], regions[self.e_dst]] / 2.0
        self.e_side = np.array([self.net.side(i) for i in range(self.n)])
        self.e_gray = np.array([int(s) in self.graylist[int(d)] for s, d in zip(self.e_src, self.e_dst)],
                               dtype=bool) if any(self.graylist) else np.zeros(len(self.e_dst), dtype=bool)
        if len(self.e_dst):
            starts = np.flatnonzero(np.r_[True, self.e_dst[1:] != self.e_dst[:-1]])
        else:
            starts = np.zeros(0, dtype=np.int64)
        self.starts = starts
        self.targets = self.e_dst[starts] if len(starts) else starts
        n_lazy = np.bincount(self.e_src[self.e_lazy], minlength=self.n)
        self.p_lazy = np.minimum(1.0, self.g["D_lazy"] / np.maximum(n_lazy, 1))
        self._edges_version = self.version

    def flood(self, origin: int, size: int, t0: int, forwards: np.ndarray) -> np.ndarray:
        """Arrival times (absolute ms, INF where never) of one message published by `origin` at
        t0. `forwards[v]`: v relays it (online and judging it valid). The origin always sends."""
        if self._edges_version != self.version:
            self._rebuild()
        n = self.n
        arr = np.full(n, INF, dtype=np.int64)
        arr[origin] = t0
        if not len(self.e_dst):
            return arr
        g, c = self.g, self.ncfg
        m = len(self.e_dst)
        jit = c["jitter_frac"] * (2.0 * self.np.random(m) - 1.0)
        one_way = self.e_base * (1.0 + jit)
        tx = size * 8 / self.net.bits_per_ms + c["per_message_cpu_ms"]
        hb = g["heartbeat_ms"]
        # eager: validate, then the k-th copy leaves after k transmissions
        delay = c["validate_ms"] + self.e_k * tx + one_way
        # lazy: IHAVE, IWANT, then the message: three one-way trips after a heartbeat
        delay = np.where(self.e_lazy, c["validate_ms"] + 3 * one_way + tx, delay)
        lazy_slot = np.full(m, np.inf)
        if g["mcache_gossip"] > 0 and g["D_lazy"] > 0:
            p = self.p_lazy[self.e_src]
            for j in range(g["mcache_gossip"] - 1, -1, -1):  # the first selected heartbeat wins
                chosen = self.np.random(m) < p
                lazy_slot = np.where(chosen, float(j), lazy_slot)
        delay = np.where(self.e_lazy & np.isinf(lazy_slot), np.inf, delay)
        if c["loss"] > 0:
            delay = np.where(self.np.random(m) < c["loss"], np.inf, delay)
        if self.net.partitioned_now():
            delay = np.where(self.e_side[self.e_src] != self.e_side[self.e_dst], np.inf, delay)
        ok_src = forwards[self.e_src] | (self.e_src == origin)
        delay = np.where(ok_src, delay, np.inf)
        if self.e_gray.any():
            delay = np.where(self.e_gray, np.inf, delay)
        phase = self.phase[self.e_src]
        lazy_mask = self.e_lazy
        arr_f = arr.astype(np.float64)
        arr_f[arr == INF] = np.inf
        for _ in range(n):
            a = arr_f[self.e_src]
            # the holder's next heartbeat after it has the message (and validated it)
            nxt = np.ceil((a - phase) / hb) * hb + phase + lazy_slot * hb
            cand = np.where(lazy_mask, nxt, a) + delay
            best = np.minimum.reduceat(cand, self.starts)
            cur = arr_f[self.targets]
            better = best < cur
            if not better.any():
                break
            arr_f[self.targets[better]] = best[better]
        out = np.full(n, INF, dtype=np.int64)
        fin = np.isfinite(arr_f)
        out[fin] = np.ceil(arr_f[fin]).astype(np.int64)
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
                            self.version += 1
            frontier = nxt
        return hops_at_drop
