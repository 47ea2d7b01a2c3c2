"""Drive the simulator's network model on a fixed topology, to compare it with real nodes.

The simulator normally builds its own random overlay (`Overlay.join`) and publishes from its
agents. For calibration (tests/benchmarks/bench_calibration.py) we need the *same* small
topology, region assignment and publish schedule as a run of real py-libp2p nodes, so this
module sets the overlay's connections directly and calls `Overlay.flood` per message. What is
used unchanged from simulations/network.py: the latency model (region RTT table, jitter,
bandwidth, `per_message_cpu_ms`, `validate_ms`), the mesh maintenance (`Overlay.heartbeat`) and
the arrival-time computation. Nothing here touches the network or the wall clock.

Also here: the few statistics the comparison needs (percentiles, the two-sample
Kolmogorov-Smirnov distance) and a lower bound on any path's delay, used to check that real
latencies could not have skipped the configured delay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protocol.samples import REGIONS

from .config import resolve
from .engine import Engine, derive_seed, stream_rng
from .network import INF, Network, Overlay, load_rtt


def topology(n: int, dials: int, rng) -> list[tuple[int, int]]:
    """Each node dials `dials` random others (a pair dialled both ways counts once); redrawn
    (at most 100 times) until the graph is connected. Returns sorted (dialler, target) pairs."""
    for _ in range(100):
        pairs: set[tuple[int, int]] = set()
        for i in range(n):
            for j in rng.sample([k for k in range(n) if k != i], dials):
                if (j, i) not in pairs:
                    pairs.add((i, j))
        if _connected(n, pairs):
            return sorted(pairs)
    raise ValueError(f"no connected topology of {n} nodes with {dials} dials each in 100 draws")


def _connected(n: int, pairs) -> bool:
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in pairs:
        adj[i].add(j)
        adj[j].add(i)
    seen, stack = {0}, [0]
    while stack:
        for v in adj[stack.pop()] - seen:
            seen.add(v)
            stack.append(v)
    return len(seen) == n


def region_names(regions: Sequence[int]) -> list[str]:
    return [REGIONS[r] for r in regions]


def one_way_ms(regions: Sequence[int], intra_region_rtt_ms: float = 2.0, scale: float = 1.0) -> np.ndarray:
    """Mean one-way delay (ms) between every two nodes: RTT/2 from the simulator's table,
    times `scale`."""
    rtt = load_rtt(intra_region_rtt_ms)
    idx = np.asarray(regions)
    return rtt[np.ix_(idx, idx)] / 2.0 * scale


def path_delay_bound(pairs: Sequence[tuple[int, int]], regions: Sequence[int], jitter_frac: float,
                     intra_region_rtt_ms: float = 2.0, scale: float = 1.0) -> np.ndarray:
    """[a, b] = the smallest delay any path from a to b over the connections can have: the sum
    of (1 - jitter_frac) x one-way delays along the shortest path (Floyd-Warshall, n small)."""
    n = len(regions)
    w = one_way_ms(regions, intra_region_rtt_ms, scale) * (1.0 - jitter_frac)
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0.0)
    for i, j in pairs:
        d[i, j] = d[j, i] = w[i, j]
    for k in range(n):
        d = np.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    return d


def hop_counts(pairs: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    """[a, b] = fewest connections from a to b."""
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0.0)
    for i, j in pairs:
        d[i, j] = d[j, i] = 1.0
    for k in range(n):
        d = np.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    return d


class FixedTopologyModel:
    """The simulator's Network + Overlay over given connections and regions.

    `mesh`: None to let the model's own heartbeat form the mesh from the connections (what the
    simulator does), or per node the set of peers it pushes to eagerly (e.g. the mesh that real
    nodes reported), which isolates the latency model from mesh formation. `rtt_scale`
    multiplies the RTT table (for runs whose real links were scaled the same way)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], regions: Sequence[int], *, seed: int = 1,
                 network: dict | None = None, gossip: dict | None = None,
                 mesh: Sequence[set[int]] | None = None, rtt_scale: float = 1.0) -> None:
        self.cfg = resolve({"network": dict(network or {}), "gossip": dict(gossip or {})})
        n = len(regions)
        self.n = n
        self.engine = Engine(start_ms=0)
        self.net = Network(self.cfg, self.engine, stream_rng(seed, "network"), list(regions),
                           [True] * n, 0)
        self.net.rtt = self.net.rtt * rtt_scale  # read by the overlay when it builds its edges
        nprng = np.random.Generator(np.random.PCG64(derive_seed(seed, "network/np")))
        self.overlay = Overlay(self.cfg, self.net, nprng, stream_rng(seed, "overlay"), n)
        for i, j in pairs:
            self.overlay.conn[i].add(j)
            self.overlay.conn[j].add(i)
        if mesh is None:
            self.overlay.dirty = set(range(n))
            for _ in range(10):  # mesh maintenance until no node is outside [D_low, D_high]
                if not self.overlay.dirty:
                    break
                self.overlay.heartbeat()
        else:
            self.overlay.mesh = [set(m) for m in mesh]
        self.overlay.version += 1

    def latencies(self, schedule: Sequence[tuple[int, float]], size: int | Sequence[int]) -> np.ndarray:
        """schedule: (publisher, publish time in s from the start) per message; size: bytes per
        message. Returns [message, node] latency in ms (nan for the publisher itself and where
        the message never arrived)."""
        sizes = [size] * len(schedule) if isinstance(size, int) else list(size)
        out = np.full((len(schedule), self.n), np.nan)
        forwards = np.ones(self.n, dtype=bool)
        for m, ((origin, at_s), nbytes) in enumerate(zip(schedule, sizes)):
            t0 = int(round(at_s * 1000))
            self.engine.now = t0
            arr = self.overlay.flood(origin, nbytes, t0, forwards)
            got = arr < INF
            out[m, got] = arr[got] - t0
            out[m, origin] = np.nan
        return out


# -- statistics ----------------------------------------------------------------------------------


def percentiles(values, ps=(50, 90, 99)) -> dict[str, float | None]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {f"p{p}": (round(float(np.percentile(v, p)), 2) if len(v) else None) for p in ps}


def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: sup over x of |F_a(x) - F_b(x)|."""
    a = np.sort(np.asarray(a, dtype=float))
    b = np.sort(np.asarray(b, dtype=float))
    if not len(a) or not len(b):
        raise ValueError("both samples must be non-empty")
    xs = np.concatenate([a, b])
    fa = np.searchsorted(a, xs, side="right") / len(a)
    fb = np.searchsorted(b, xs, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_critical(n: int, m: int, alpha: float = 0.05) -> float:
    """Asymptotic critical value of the two-sample KS statistic (c(0.05) = 1.358). Samples
    that share messages are not independent, so read it as a scale, not as a test."""
    c = {0.1: 1.224, 0.05: 1.358, 0.01: 1.628}[alpha]
    return c * float(np.sqrt((n + m) / (n * m)))
