"""A node restarted without its bootstrap list reconnects from its stored peers (issue 15):
node processes on one anvil chain on 127.0.0.1 (node/peer_table.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from node.anvil import find_anvil
from tests.node.test_processes import FAST, _free_port, market  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(find_anvil() is None, reason="anvil not installed")


def stored_peers(path) -> list[str]:
    try:
        with sqlite3.connect(path, timeout=5) as c:
            return [r[0] for r in c.execute("SELECT peer_id FROM peers")]
    except sqlite3.OperationalError:
        return []


def test_restart_without_bootstrap_rejoins_from_the_peer_table(market) -> None:  # noqa: F811
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    a = market.start("relay", "renter", "--listen", listen, params=FAST)
    a_peer = a.wait("ready", 60)["peer_id"]
    b = market.start("renter", "renter", "--bootstrap", f"{listen}/p2p/{a_peer}", params=FAST)
    b.wait("ready", 60)
    deadline = time.monotonic() + 30
    while a_peer not in stored_peers(market.tmp / "renter" / "node.db"):
        assert time.monotonic() < deadline, "the bootstrap peer was never stored"
        time.sleep(0.2)
    b.terminate(10)
    b = market.start("renter", "renter", params=FAST)  # no --bootstrap this time
    b.wait("ready", 60)
    deadline = time.monotonic() + 30
    while True:  # its reachability lines count the peers it is directly connected to
        got = b.wait("reachability", max(0.1, deadline - time.monotonic()))
        if got["direct_peers"] >= 1:
            break


def test_a_peer_found_by_discovery_is_stored_and_rejoined_without_bootstrap(market) -> None:  # noqa: F811
    """C knows only A; it finds B through A (node/discovery.py), stores it, and after A is gone
    and C restarts without a bootstrap list, C reaches the network through B."""
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    a = market.start("relay", "renter", "--listen", listen, params=FAST)
    a_peer = a.wait("ready", 60)["peer_id"]
    boot = ("--bootstrap", f"{listen}/p2p/{a_peer}")
    b = market.start("provider", "renter", *boot, params=FAST)
    b_peer = b.wait("ready", 60)["peer_id"]
    c = market.start("renter", "renter", *boot, params=FAST)
    c.wait("ready", 60)
    deadline = time.monotonic() + 40
    while b_peer not in stored_peers(market.tmp / "renter" / "node.db"):
        assert time.monotonic() < deadline, "C never found and stored B"
        time.sleep(0.3)
    c.terminate(10)
    a.terminate(10)
    c = market.start("renter", "renter", params=FAST)  # no --bootstrap, and A is gone
    c.wait("ready", 60)
    deadline = time.monotonic() + 30
    while True:
        got = c.wait("reachability", max(0.1, deadline - time.monotonic()))
        if got["direct_peers"] >= 1:  # only B is left to connect to
            break
