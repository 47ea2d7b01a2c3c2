"""Calibration, end to end and small: the same 6-node topology as real py-libp2p nodes behind
delaying relays and in the simulator's network model (tests/benchmarks/bench_calibration.py at
a small size). Asserts only what must hold: every message reaches every node in both, and no
real delivery beat the configured delay of the fastest possible path."""

import numpy as np
import pytest

from simulations.calibration import FixedTopologyModel, ks_distance, path_delay_bound, topology
from tests.benchmarks.bench_calibration import compare, make_plan, run_real, simulate

JITTER = 0.1


def test_fixed_topology_model__pushes_over_the_given_connections_only():
    import random

    pairs = topology(8, 2, random.Random(3))
    regions = [0, 3, 6, 7, 9, 1, 4, 8]
    model = FixedTopologyModel(pairs, regions, seed=2, network={"jitter_frac": JITTER})
    conn = {frozenset(p) for p in pairs}
    assert all(frozenset((u, v)) in conn for u in range(8) for v in model.overlay.mesh[u])
    lat = model.latencies([(0, 0.0), (5, 1.0)], 700)
    bound = path_delay_bound(pairs, regions, JITTER)
    assert np.isnan(lat[0, 0]) and np.isnan(lat[1, 5])
    assert np.all(lat[0, 1:] >= bound[0, 1:]) and np.all(lat[1, :5] >= bound[5, :5])


def test_ks_distance__identical_zero_disjoint_one_shifted_half():
    assert ks_distance([1, 2, 3, 4], [4, 3, 2, 1]) == 0.0
    assert ks_distance([1, 2], [3, 4]) == 1.0
    assert ks_distance([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5


@pytest.mark.slow
def test_calibration__small_topology_delivers_everything_and_respects_the_link_delays():
    plan = make_plan(nodes=6, dials=2, messages=6, rate=2.0, seed=5)
    # regions far apart: the fastest link (Dallas-Toronto) is 17 ms one way, several times what
    # loopback alone takes, so a connection that bypassed its relay would break the bound below
    plan["regions"] = [0, 3, 6, 7, 9, 1]
    real = run_real(plan, processes=2, jitter=JITTER, seed=5, drain=5.0, settle=1.0, budget=60)
    lat = real["lat"]
    others = np.ones_like(lat, dtype=bool)
    for m, publisher, _ in plan["schedule"]:
        others[m, publisher] = False
    assert real["published"] == 6
    assert np.isfinite(lat[others]).all(), lat  # every message reached every other node
    assert np.isnan(lat[~others]).all()

    bound = path_delay_bound(plan["pairs"], plan["regions"], JITTER)
    bound_mr = np.array([bound[p] for _, p, _ in plan["schedule"]])
    assert bound_mr[others].min() >= 0.9 * 17
    assert (lat[others] >= bound_mr[others]).all(), (lat - bound_mr)[others].min()

    sim = simulate(plan, real["sizes"], reps=3, jitter=JITTER)
    assert np.isfinite(sim[:, others]).all()
    assert (sim[:, others] >= np.floor(bound_mr[others])).all()

    c = compare(plan, real, jitter=JITTER, reps=3, fit_reps=1)
    assert c["real_delivered"] == c["expected"] == 6 * 5
    assert 0.0 <= c["ks"] <= 1.0
