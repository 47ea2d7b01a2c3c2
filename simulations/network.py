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
from concurrent.futures import Executor
from typing import Any, Callable

import numba
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
LINK_SLACK = 8  # room for links beyond a node's connections in the link arrays (Overlay._rebuild)
PAD = -2  # the link code of the unused room at the end of a node's block


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
    heartbeat. The arrival time at every node is computed at publish time by a shortest-path
    pass over these links (`earliest_arrivals`; exact for eager push with independent link
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
        # nodes whose out-links changed since the link arrays were last brought up to date
        self.edge_dirty: set[int] = set(range(n_nodes))
        self._room: list[int] = []  # links each node's block has room for
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

    def _node_out(self, u: int) -> tuple[list[int], list[int], int]:
        """u's out-edges: mesh peers (sorted; the k-th gets the k-th copy), then the other
        connections (lazy); per edge its destination and code k (0 = lazy, -1 = the peer
        ignores u: graylisted), and the number of lazy edges."""
        mesh = sorted(self.mesh[u])
        lazy = sorted(self.conn[u] - self.mesh[u])
        dst = mesh + lazy
        k = [i + 1 for i in range(len(mesh))] + [0] * len(lazy)
        for i, v in enumerate(dst):
            if u in self.graylist[v]:
                k[i] = -1
        return dst, k, len(lazy)

    def _link_params(self, src: np.ndarray, dst: np.ndarray, k: np.ndarray) -> tuple:
        """Per link, the message-independent part of its delay, in one row so that a node's
        links are one contiguous block (the pass reads them by node, not in link order): code k
        (the k-th eager copy; 0 lazy; -1 graylisted and PAD carry nothing), then a and b of
        a + b*U: eager one way = validate + base(1-jf) + 2 jf base U; lazy: three such trips.
        And whether the link crosses the partition. Elementwise, so a block computed alone equals the same links
        computed with all the others."""
        c = self.ncfg
        jf = c["jitter_frac"]
        base = self.rtt_half[self.node_region[src], self.node_region[dst]]
        trips = np.where(k == 0, 3.0, 1.0)
        par = np.empty((len(dst), 3), np.float32)
        par[:, 0] = k
        par[:, 1] = c["validate_ms"] + trips * base * (1.0 - jf)
        par[:, 2] = trips * 2.0 * jf * base
        return par, self.node_side[src] != self.node_side[dst]

    def _lazy_thresholds(self, n_lazy: np.ndarray) -> np.ndarray:
        """A holder advertises to each lazy peer at a heartbeat with probability
        p = D_lazy/#lazy; the link is used at the first of the next G heartbeats at which it is
        chosen: at slot s (0-based) when q[s-1] <= U < q[s], q[s] = 1 - (1-p)^(s+1); never when
        U >= q[G-1]. One row of q per node."""
        g = self.g
        p = np.minimum(1.0, g["D_lazy"] / np.maximum(n_lazy, 1))
        G = g["mcache_gossip"] if g["D_lazy"] > 0 else 0
        return (1.0 - (1.0 - p[:, None]) ** np.arange(1, G + 1)[None, :]).astype(np.float32)

    def _rebuild(self) -> None:
        """Bring the link arrays (CSR by source) up to date. Each node's block has room for
        LINK_SLACK links beyond its connections (at least `connections`, what a join opens), the
        rest padded with code PAD: a changed node is rewritten in its block, and the whole layout
        is redone only when some node outgrows its room."""
        dirty = sorted(self.edge_dirty)
        self.edge_dirty.clear()
        if self._edges_version < 0 or any(len(self.conn[u]) > self._room[u] for u in dirty):
            self._layout()
        else:
            for u in dirty:
                dst, k, n_lazy = self._node_out(u)
                lo, hi = self.indptr[u], self.indptr[u + 1]
                pad = hi - lo - len(dst)
                dst = np.array(dst + [0] * pad, np.int32)
                k = np.array(k + [PAD] * pad, np.int64)
                self.e_dst[lo:hi] = dst
                self.e_par[lo:hi], self.e_cross[lo:hi] = self._link_params(np.full(hi - lo, u), dst, k)
                self.node_q[u] = self._lazy_thresholds(np.array([n_lazy]))[0]
        self._edges_version = self.version

    def _layout(self) -> None:
        """The whole link layout, every node's block sized anew."""
        room = np.array([max(len(c), self.ncfg["connections"]) + LINK_SLACK for c in self.conn], np.int64)
        self._room = room.tolist()
        self.indptr = np.zeros(self.n + 1, np.int64)
        np.cumsum(room, out=self.indptr[1:])
        dst_all: list[int] = []
        k_all: list[int] = []
        n_lazy = np.zeros(self.n, np.int64)
        for u in range(self.n):
            dst, k, n_lazy[u] = self._node_out(u)
            pad = self._room[u] - len(dst)
            dst_all += dst
            dst_all += [0] * pad
            k_all += k
            k_all += [PAD] * pad
        self.e_dst = np.array(dst_all, np.int32)
        src = np.repeat(np.arange(self.n), room)
        self.e_par, self.e_cross = self._link_params(src, self.e_dst, np.array(k_all, np.int64))
        self.node_q = self._lazy_thresholds(n_lazy)

    def draw(self, size: int, t0: int) -> tuple:
        """This message's part of the link model: (key, loss, cut, tx, hb, phase). key: the
        message's random key (each link's uniforms are a hash of it and the link's index, see
        `link_uniform`); loss: a gossip copy is lost with this probability; cut: the partition
        is on now (links in `e_cross` carry nothing); phase: each node's heartbeat phase
        relative to t0."""
        g, c = self.g, self.ncfg
        key = np.uint64(self.np.integers(0, 2**63))
        tx = np.float32(size * 8 / self.net.bits_per_ms + c["per_message_cpu_ms"])
        hb = np.float32(g["heartbeat_ms"])
        phase = ((self.phase - t0) % g["heartbeat_ms"]).astype(np.float32)
        return key, np.float32(c["loss"]), self.net.partitioned_now(), tx, hb, phase

    def links(self) -> tuple:
        """The overlay's links for `earliest_arrivals` (CSR by source), rebuilt if it changed."""
        if self._edges_version != self.version:
            self._rebuild()
        return self.indptr, self.e_dst, self.e_par, self.e_cross, self.node_q

    def flood(self, origin: int, size: int, t0: int, forwards: np.ndarray) -> np.ndarray:
        """Arrival times (absolute ms, INF where never) of one message published by `origin` at
        t0. `forwards[v]`: v relays it (online and judging it valid). The origin always sends.

        A link's delay for this message: eager, validate, then the k-th copy after k
        transmissions, plus the one-way delay; lazy, the holder's next heartbeat after it has
        the message, plus `slot` heartbeats, then IHAVE/IWANT/message, three one-way trips.
        Its random parts (jitter, slot, loss) are a hash of the message's key and the link, so
        they do not depend on the path the message takes. Then the earliest arrival at every
        node, Dijkstra with those delays (`earliest_arrivals`). Times inside are float32 ms
        relative to t0 (sub-microsecond precision at these delays)."""
        return self.flood_later(origin, size, t0, forwards, None)()

    def flood_later(self, origin: int, size: int, t0: int, forwards: np.ndarray,
                    pool: Executor | None) -> Callable[[], np.ndarray]:
        """`flood`, with the pass run on `pool` (None: now, here): returns a function that gives
        the arrival times, waiting for them. The links and this message's draws are taken now,
        so the result is the same; the caller must call it before the overlay's links are next
        read (`links`), since they may then be rewritten in place."""
        links = self.links()
        args = (*links, *self.draw(size, t0), forwards, origin)
        if pool is None:
            arr = earliest_arrivals(*args)
            result = lambda: arr  # noqa: E731
        else:
            result = pool.submit(earliest_arrivals, *args).result  # the pass releases the GIL

        def absolute() -> np.ndarray:
            arr = result()
            out = np.full(self.n, INF, dtype=np.int64)
            fin = np.isfinite(arr)
            out[fin] = t0 + np.ceil(arr[fin]).astype(np.int64)
            return out
        return absolute

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


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
JITTER, SLOT, LOSS = 0, 1, 2  # a link's three uniforms


@numba.njit(cache=True, inline="always")
def splitmix64(key: np.uint64, i: np.uint64) -> np.uint64:
    """The i-th output (from 0) of SplitMix64 seeded with key (Steele, Lea, Flood 2014)."""
    z = key + (i + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def link_uniform(key: np.uint64, link: int, which: int) -> np.float32:
    """U[0, 1) on a 2^-24 grid, exact in float32: uniform `which` of `link` for the message
    with this key. A hash, not a stream: the pass reads only the links it relaxes, in an order
    that depends on the draws, and still gets what a draw of every link up front would give."""
    z = splitmix64(key, np.uint64(3 * link + which))
    return np.float32(z >> np.uint64(40)) * np.float32(2.0 ** -24)


@numba.njit(cache=True, inline="always")
def _heap_push(ht: np.ndarray, hv: np.ndarray, size: int, t: np.float32, v: int) -> int:
    """Push (t, v) on the binary min-heap ht/hv of `size` entries; returns the new size."""
    i = size
    while i:
        p = (i - 1) >> 1
        if ht[p] > t:
            ht[i], hv[i] = ht[p], hv[p]
            i = p
        else:
            break
    ht[i], hv[i] = t, v
    return size + 1


@numba.njit(cache=True, nogil=True)
def earliest_arrivals(indptr, dst, par, cross, node_q, key, loss, cut, tx, hb, phase, relays,
                      origin):
    """Dijkstra from `origin` (time 0) over the overlay's links (Overlay.links: CSR by source)
    for one message (Overlay.draw). A link's delay is computed when its source is settled
    (k, a, b = par[e]; r, s = its JITTER and SLOT uniforms): eager k-th copy  k*tx + a + b*r;
    lazy  a + b*r + tx + slot*hb, departing at the holder's next heartbeat (phase[u] + j*hb)
    at or after it has the message, slot = the first j with s < node_q[u, j] (none: never).
    A link carries nothing if k = -1 (graylisted; PAD: unused room), its LOSS uniform is < loss, or `cut` and
    `cross[e]`. Later arrival means later departure, so Dijkstra stays exact. Only `relays`
    (and the origin) send on. float32 throughout, in the order written here;
    tests/simulations/test_gossip_model.py checks it against a vectorised label-correcting pass
    in numpy, bit for bit.

    The queue: times are bucketed by width w (about the smallest link delay); the current
    bucket's entries go through a small binary heap, later buckets are linked lists in a ring
    that spans the longest link delay. Exact for any w; with w near the smallest delay few
    entries share a bucket. Compiled by numba: per node a loop over ~24 links, which numpy can
    only do as rounds of whole-frontier arrays (33.8 ms a flood at 10,000 nodes; this pass:
    simulations/README.md "Performance")."""
    n = len(indptr) - 1
    m = len(dst)
    G = node_q.shape[1]
    # the ring must span the longest delay a link can add (a lazy link waits for the next
    # heartbeat, then up to G-1 more)
    span = np.float32(1.0)
    for e in range(m):
        k = par[e, 0]
        if k > 0:
            d = k * tx + par[e, 1] + par[e, 2]
        elif k == 0:
            d = par[e, 1] + par[e, 2] + tx + np.float32(G + 1) * hb
        else:
            continue
        span = max(span, d)
    w = max(np.float32(tx), span / np.float32(65536.0))
    nb = 1
    while nb < span / w + 3:
        nb *= 2
    head = np.full(nb, -1, np.int64)
    nxt = np.empty(m + 1, np.int64)
    et = np.empty(m + 1, np.float32)
    ev = np.empty(m + 1, np.int64)
    used = 0
    pending = 0
    ht = np.empty(m + 1, np.float32)  # the current bucket's heap
    hv = np.empty(m + 1, np.int64)
    arr = np.full(n, np.inf, dtype=np.float32)
    done = np.zeros(n, dtype=np.bool_)
    arr[origin] = np.float32(0.0)
    ht[0], hv[0] = np.float32(0.0), origin
    size = 1
    cur = 0  # the current bucket, absolute
    while True:
        if size == 0:  # the bucket is spent: load the next non-empty one into the heap
            if pending == 0:
                break
            cur += 1
            while head[cur & (nb - 1)] < 0:
                cur += 1
            j = head[cur & (nb - 1)]
            head[cur & (nb - 1)] = -1
            while j >= 0:
                pending -= 1
                t, v = et[j], ev[j]
                j = nxt[j]
                if t > arr[v]:
                    continue  # improved since
                size = _heap_push(ht, hv, size, t, v)
            continue
        t, x = ht[0], hv[0]
        size -= 1
        if size:  # move the last entry to the root and sift it down
            lt, lv = ht[size], hv[size]
            i = 0
            while True:
                c = 2 * i + 1
                if c >= size:
                    break
                if c + 1 < size and ht[c + 1] < ht[c]:
                    c += 1
                if ht[c] < lt:
                    ht[i], hv[i] = ht[c], hv[c]
                    i = c
                else:
                    break
            ht[i], hv[i] = lt, lv
        if done[x] or t > arr[x]:
            continue
        done[x] = True
        if x != origin and not relays[x]:
            continue
        ph = phase[x]
        dep_lazy = np.ceil((t - ph) / hb) * hb + ph
        for e in range(indptr[x], indptr[x + 1]):
            k = par[e, 0]
            if k == PAD:
                break  # the rest of x's block is unused room
            v = dst[e]
            if k < 0 or done[v] or (cut and cross[e]):
                continue  # a settled node cannot improve
            if loss > 0 and link_uniform(key, e, LOSS) < loss:
                continue
            if k == 0:
                if dep_lazy + (par[e, 1] + tx) >= arr[v]:
                    continue  # cannot win even with no jitter and the first slot: spare the hashes
                s = link_uniform(key, e, SLOT)
                slot = 0
                while slot < G and s >= node_q[x, slot]:
                    slot += 1
                if slot == G:
                    continue  # never advertised to this peer while x still gossips the id
                r = link_uniform(key, e, JITTER)
                cand = dep_lazy + (par[e, 1] + par[e, 2] * r + tx + np.float32(slot) * hb)
            else:
                r = link_uniform(key, e, JITTER)
                cand = t + (k * tx + par[e, 1] + par[e, 2] * r)
            if cand < arr[v]:
                arr[v] = cand
                b = np.int64(cand / w)
                if b <= cur:  # the current bucket (or, by rounding, an earlier one): the heap
                    size = _heap_push(ht, hv, size, cand, v)
                else:
                    sl = b & (nb - 1)
                    et[used], ev[used], nxt[used] = cand, v, head[sl]
                    head[sl] = used
                    used += 1
                    pending += 1
    return arr
