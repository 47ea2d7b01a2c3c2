"""A provider behind NAT A rented by a renter behind NAT B (issue 15), every node in its own OS
process inside the namespaces of tests/nat/topology.py, anvil and a relay/bootstrap node in the
"internet" namespace. Neither home can be dialled: the provider learns that (AutoNAT dial-back
fails), reserves a slot on the public node (whose AutoNAT answer is public, so it serves relay
v2), and offers only its /p2p-circuit address; the renter finds the offer by gossip, negotiates
through the relay, opens the escrow, and the rental runs heartbeats and receipts to settlement.
Between two endpoint-independent NATs the ends then punch a hole (DCUtR), between one and a symmetric
NAT with the birthday punch (node/birthday_punch.py), and the relay is killed mid-rental: the
rental goes on over the direct connection. Between two symmetric NATs no hole
punch can work and the rental stays on the relay."""

from __future__ import annotations

import queue
import time

import pytest

from node.anvil import AnvilProcess, find_anvil
from tests.nat.topology import NatLab, unavailable_reason
from tests.node.test_processes import FAST, PRICE, Market

REASON = unavailable_reason() or (None if find_anvil() else "anvil not installed")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

NAT_PARAMS = dict(FAST, renter_heartbeat_timeout_intervals=3, provider_stop_after_missed_receipts=5)


def wait_hole_punch(procs, timeout: float = 60.0) -> dict:
    """The first `reachability` line of any of `procs` that reports a successful hole punch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            try:
                got = proc.events.get(timeout=0.1)
            except queue.Empty:
                continue
            assert got["event"] not in ("exited", "rent_failed"), f"{proc.name}: {got}"
            if got["event"] == "reachability" and got["hole_punches"]["ok"]:
                return got
    raise AssertionError(f"no hole punch within {timeout} s")


def wait_event(proc, name: str, timeout: float) -> dict:
    """Like NodeProc.wait, but a rent_failed line is what we wait for, not a failure."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            got = proc.events.get(timeout=left)
        except queue.Empty:
            break
        if got["event"] == name:
            return got
        assert got["event"] != "exited", f"{proc.name} exited"
    raise AssertionError(f"{proc.name}: no {name!r} within {timeout} s")


def wait_reachability(proc, want: str, circuit: bool = False, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = proc.wait("reachability", left)
        if got["reachability"] == want and (not circuit or any(
                "/p2p-circuit/" in a for a in got["offer_addrs"])):
            return got
    raise AssertionError(f"{proc.name}: not {want} within {timeout} s")


@pytest.fixture
def nat_market(tmp_path, request):
    kinds = request.param
    with NatLab({"a": kinds[0], "b": kinds[1]}) as lab:
        with AnvilProcess(host=lab.inet_addr, prefix=tuple(lab.exec_prefix("inet"))) as anvil:
            market = Market(tmp_path, anvil)
            market.lab = lab
            try:
                yield market
            finally:
                market.close()


def start_relay(m: Market) -> tuple[object, str]:
    listen = f"/ip4/{m.lab.inet_addr}/tcp/4001"
    relay = m.start("relay", "renter", "--listen", listen, "--autonat-interval", "10",
                    params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("inet")))
    ready = relay.wait("ready", 60)
    return relay, f"{listen}/p2p/{ready['peer_id']}"


@pytest.mark.parametrize("nat_market", [("symmetric", "symmetric"), ("eim", "eim"),
                                        ("eim", "symmetric")], indirect=True,
                         ids=["symmetric-symmetric", "eim-eim", "eim-symmetric"])
def test_rental_across_two_nats_through_a_relay(nat_market: Market) -> None:
    m = nat_market
    relay, relay_addr = start_relay(m)
    provider = m.start("provider", "provider", "--listen", "/ip4/0.0.0.0/tcp/4001",
                       "--bootstrap", relay_addr, "--autonat-interval", "10",
                       params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("a")))
    provider.wait("ready", 60)
    wait_reachability(relay, "public")
    offered = wait_reachability(provider, "private", circuit=True)
    assert offered["relays"] and all("/p2p-circuit/" in a for a in offered["offer_addrs"])
    renter = m.start("renter", "renter", "--listen", "/ip4/0.0.0.0/tcp/4001",
                     "--bootstrap", relay_addr, "--rent", "", "--duration", "20",
                     "--max-price", str(PRICE), "--find-timeout", "60",
                     params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("b")))
    rented = renter.wait("rented", 120)
    aid = bytes.fromhex(rented["agreement_id"])
    m.wait_receipts("renter", aid, 3, timeout=30)
    if "eim" in (m.lab.homes["a"].kind, m.lab.homes["b"].kind):  # DCUtR or the birthday punch
        punched = wait_hole_punch([renter, provider])
        assert punched["direct_peers"] >= 1
        relay.kill()  # mid-rental: from here only the direct connection carries it
        seen = m.receipts("renter", aid)[-1][0]
        m.wait_receipts("renter", aid, 3, timeout=30, after_seq=seen)
    events = m.wait_final(aid, timeout=60)
    assert [e.name for e in events] == ["Opened", "Claimed"]
    last = m.latest_receipt("provider", aid)
    assert events[1].args["acked_seconds"] == last.acked_seconds
    assert last.acked_seconds >= 15  # of 20: heartbeats and receipts flowed across both NATs
    assert m.chain.token_balance(m.wallets["provider"].address) == PRICE * last.acked_seconds
    for p in (renter, provider) + ((relay,) if relay.proc.poll() is None else ()):
        assert p.terminate(10) < 10


@pytest.mark.parametrize("nat_market", [("symmetric", "eim")], indirect=True, ids=["no-relay"])
def test_renter_is_told_the_provider_is_unreachable_before_any_escrow(nat_market: Market) -> None:
    """No node serves a relay: the provider behind NAT offers only its home address, which no
    one outside can dial. The renter's rent fails, saying so, and nothing reaches the chain."""
    m = nat_market
    listen = f"/ip4/{m.lab.inet_addr}/tcp/4001"
    relay = m.start("relay", "renter", "--listen", listen, "--relay-service", "off",
                    params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("inet")))
    relay_addr = f"{listen}/p2p/{relay.wait('ready', 60)['peer_id']}"
    home = m.lab.homes["a"].addr
    provider = m.start("provider", "provider", "--listen", f"/ip4/{home}/tcp/4001",
                       "--bootstrap", relay_addr, "--autonat-interval", "10",
                       params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("a")))
    peer = provider.wait("ready", 60)["peer_id"]
    got = wait_reachability(provider, "private")
    assert got["relays"] == [] and got["offer_addrs"] == [f"/ip4/{home}/tcp/4001/p2p/{peer}"]
    renter = m.start("renter", "renter", "--bootstrap", relay_addr, "--rent", "",
                     "--duration", "20", "--max-price", str(PRICE), "--find-timeout", "60",
                     params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("b")))
    failed = wait_event(renter, "rent_failed", 120)
    assert "unreachable from here" in failed["error"], failed
    assert f"/ip4/{home}/tcp/4001" in failed["error"]
    assert m.chain.events() == []  # no escrow opened, nothing approved to anyone's loss


@pytest.mark.parametrize("nat_market", [("eim", "eim")], indirect=True, ids=["eim-eim"])
def test_a_renter_behind_nat_reserves_no_relay_slot(nat_market: Market) -> None:
    """Both homes are private and directly connected to the same public relay; the provider
    (it publishes an offer, so it must be dialled) reserves a slot, the renter (it only dials
    out) never does."""
    m = nat_market
    relay, relay_addr = start_relay(m)
    provider = m.start("provider", "provider", "--listen", "/ip4/0.0.0.0/tcp/4001",
                       "--bootstrap", relay_addr, "--autonat-interval", "10",
                       params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("a")))
    renter = m.start("renter", "renter", "--listen", "/ip4/0.0.0.0/tcp/4001",
                     "--bootstrap", relay_addr, "--autonat-interval", "10",
                     params=NAT_PARAMS, prefix=tuple(m.lab.exec_prefix("b")))
    provider.wait("ready", 60)
    renter.wait("ready", 60)
    wait_reachability(relay, "public")
    assert wait_reachability(provider, "private", circuit=True)["relays"]
    lines = [wait_reachability(renter, "private")]
    deadline = time.monotonic() + 12  # two reservation rounds (every 5 s while private)
    while (left := deadline - time.monotonic()) > 0:
        try:
            got = renter.events.get(timeout=left)
        except queue.Empty:
            break
        assert got["event"] != "exited"
        if got["event"] == "reachability":
            lines.append(got)
    assert lines[-1]["reachability"] == "private" and lines[-1]["direct_peers"] >= 1
    assert all(line["relays"] == [] and line["circuit_addrs"] == [] for line in lines), lines
    for p in (renter, provider, relay):
        assert p.terminate(10) < 10


@pytest.mark.parametrize("nat_market", [("eim", "eim")], indirect=True, ids=["eim-eim"])
def test_relay_limits_too_short_but_a_hole_punch_carries_the_rental(nat_market: Market) -> None:
    """The relay's bytes per circuit (100 kB) cannot carry the rental (20 s at 1 s heartbeats:
    65,536 + 22 x 4,864 = 172,544 bytes by the estimate), so before proposing the renter tries
    for a direct connection (specs/node.md, "Reachability", item 6: up to min(8 s, 0.6 x the
    negotiation step timeout; 14 s here, so 8 s, room for the provider's 5 s reachability loop
    and the punch). Between two endpoint-independent NATs the punch succeeds and the rental
    goes on, direct: the relay is killed mid-rental and it still settles."""
    m = nat_market
    params = dict(NAT_PARAMS, negotiation_step_timeout_ms=14_000)
    listen = f"/ip4/{m.lab.inet_addr}/tcp/4001"
    relay = m.start("relay", "renter", "--listen", listen, "--autonat-interval", "10",
                    "--relay-circuit-bytes", "100000",
                    params=params, prefix=tuple(m.lab.exec_prefix("inet")))
    relay_addr = f"{listen}/p2p/{relay.wait('ready', 60)['peer_id']}"
    provider = m.start("provider", "provider", "--listen", "/ip4/0.0.0.0/tcp/4001",
                       "--bootstrap", relay_addr, "--autonat-interval", "10",
                       params=params, prefix=tuple(m.lab.exec_prefix("a")))
    provider.wait("ready", 60)
    wait_reachability(relay, "public")
    wait_reachability(provider, "private", circuit=True)
    renter = m.start("renter", "renter", "--listen", "/ip4/0.0.0.0/tcp/4001",
                     "--bootstrap", relay_addr, "--rent", "", "--duration", "20",
                     "--max-price", str(PRICE), "--find-timeout", "60",
                     params=params, prefix=tuple(m.lab.exec_prefix("b")))
    # A proposal is sent only over a connection that can carry the rental: this relay's cannot,
    # so "rented" means the punch made a direct connection first (a rent_failed line, "unreachable
    # from here for this rental", fails here with its error).
    rented = renter.wait("rented", 120)
    aid = bytes.fromhex(rented["agreement_id"])
    m.wait_receipts("renter", aid, 2, timeout=30)
    relay.kill()  # from here only the direct connection can carry the rental
    seen = m.receipts("renter", aid)[-1][0]
    m.wait_receipts("renter", aid, 3, timeout=30, after_seq=seen)
    events = m.wait_final(aid, timeout=60)
    assert [e.name for e in events] == ["Opened", "Claimed"]
    assert m.latest_receipt("provider", aid).acked_seconds >= 15
    for p in (renter, provider):
        assert p.terminate(10) < 10
