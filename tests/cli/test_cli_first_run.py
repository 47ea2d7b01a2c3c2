"""A provider's first run works or says why (issue 17): dialable addresses from a 0.0.0.0 listen,
a refusal naming node.announce when there is none, no GPU in one sentence, one node per data
directory, a port in use named, offers withdrawn before exit, a replaced offer id named.

Nodes here run on the embedded chain (no anvil) unless a test needs two nodes on one chain."""

import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from node.addresses import dialable_addrs

from .harness import gm, init, search, start_node, stop, wait_for

PEER = "12D3KooWSdKcv6HWWvWwHmWvidHQLqbajCk76DqtJgP5JiXb1gjt"


# -- the address rule (node/addresses.py) ------------------------------------------------------

def test_dialable__unspecified_listen_becomes_the_interface_addresses():
    ifaces = lambda: ["127.0.0.1", "::1", "192.168.1.5", "93.184.216.34", "fe80::1", "2001:db8::5"]
    got = dialable_addrs([f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}"], (), PEER, interfaces=ifaces)
    # public first, never 0.0.0.0, loopback or link-local, each with /p2p/<peer id>
    assert got == (f"/ip4/93.184.216.34/tcp/4001/p2p/{PEER}", f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER}")
    got6 = dialable_addrs(["/ip6/::/tcp/9"], (), PEER, interfaces=ifaces)
    assert got6 == (f"/ip6/2001:db8::5/tcp/9/p2p/{PEER}",)


def test_dialable__announce_wins_and_explicit_addresses_stay():
    ifaces = lambda: ["192.168.1.5"]
    assert dialable_addrs(["/ip4/0.0.0.0/tcp/1"], ["/ip4/198.51.100.1/tcp/4001"], PEER,
                          interfaces=ifaces) == (f"/ip4/198.51.100.1/tcp/4001/p2p/{PEER}",)
    assert dialable_addrs(["/ip4/127.0.0.1/tcp/5"], (), PEER, interfaces=ifaces) == (
        f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}",)


def test_dialable__nothing_dialable_is_empty():
    assert dialable_addrs(["/ip4/0.0.0.0/tcp/1"], (), PEER, interfaces=lambda: ["127.0.0.1"]) == ()


# -- the node, through the CLI -----------------------------------------------------------------

def test_first_run__a_0000_provider_publishes_interface_addresses(tmp_path):
    from node.addresses import interface_addresses

    usable = dialable_addrs(["/ip4/0.0.0.0/tcp/1"], (), PEER)
    if not usable:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    d = tmp_path / "p"
    init(d, provider=True, listen="/ip4/0.0.0.0/tcp/0")
    proc, ready = start_node(d)
    try:
        status = json.loads(gm(d, "status", "--json").stdout)
        assert status["dialable"], status
        assert not any("/0.0.0.0/" in a for a in status["dialable"])
        ips = {a.split("/")[2] for a in status["dialable"]}
        assert ips <= set(interface_addresses())
        rows = json.loads(gm(d, "offers", "search", "--json").stdout)
        assert rows and rows[0]["addrs"] == status["dialable"]
    finally:
        stop(proc)


def _unshare() -> tuple[str, ...]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return ()
    ok = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ("unshare", "-n") if ok.returncode == 0 else ()


def test_first_run__no_dialable_address_refuses_naming_node_announce(tmp_path):
    prefix = _unshare()
    if not prefix:
        pytest.skip("needs root and unshare -n (a network namespace with only loopback)")
    d = tmp_path / "p"
    init(d, provider=True, listen="/ip4/0.0.0.0/tcp/0")
    out = gm(d, "node", "run", prefix=prefix, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "no dialable address" in last and "node.announce" in last, out.stderr[-2000:]
    assert "ExceptionGroup" not in out.stderr and "Traceback" not in out.stderr


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_first_run__no_gpu_is_one_sentence(tmp_path):
    if _has_nvml():
        pytest.skip("this machine has an NVIDIA driver")
    d = tmp_path / "p"
    init(d, provider=True, fake_gpus=0)
    out = gm(d, "node", "run")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("gpumarket:")]
    assert len(lines) == 1 and "no GPU to offer" in lines[0] and "enabled = false" in lines[0], out.stderr
    assert "ExceptionGroup" not in out.stderr and "unexpected" not in out.stderr


def test_first_run__one_node_per_data_directory(tmp_path):
    d = tmp_path / "n"
    init(d, provider=False)
    proc, _ = start_node(d)
    try:
        out = gm(d, "node", "run")
        assert out.returncode == 2
        assert "another node is already running" in out.stderr and f"pid {proc.pid}" in out.stderr
        assert gm(d, "status").returncode == 0  # the running node was not disturbed
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_first_run__a_port_in_use_is_refused_with_its_name(tmp_path):
    d = tmp_path / "n"
    init(d, provider=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = gm(d, "node", "run", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"port {port} is already in use" in out.stderr and f"/ip4/127.0.0.1/tcp/{port}" in out.stderr
    assert "ExceptionGroup" not in out.stderr


def test_first_run__offers_are_withdrawn_before_the_node_exits(market):
    prov, rent, p_proc = market
    wait_for(lambda: search(rent), 30, "the provider's offer at the renter")
    p_proc.send_signal(signal.SIGTERM)
    p_proc.wait(timeout=30)
    assert p_proc.returncode == 0
    # The withdrawal left before the provider's connections closed: the renter has it now
    # (a lingering offer stayed searchable for its whole lifetime, or until a failed dial).
    assert search(rent) == []


def test_first_run__a_replaced_offer_id_names_its_replacement(market):
    prov, rent, _ = market
    old = wait_for(lambda: search(rent), 30, "the provider's offer at the renter")[0]["offer_id"]
    out = gm(prov, "offers", "publish")  # a re-announcement: seq + 1, a new digest, a new id
    assert out.returncode == 0, out.stderr
    new = wait_for(lambda: [r for r in search(rent) if r["offer_id"] != old], 30,
                   "the re-announced offer at the renter")[0]["offer_id"]
    out = gm(rent, "rent", old, "--hours", "1", "--yes")
    assert out.returncode == 3, out.stdout + out.stderr  # not found, and what replaced it
    assert f"offer {old} was replaced by offer {new}" in out.stderr and f"rent {new}" in out.stderr
    assert "unknown_offer" not in out.stderr
    gm(prov, "offers", "withdraw")
    wait_for(lambda: not search(rent), 30, "the withdrawal at the renter")
    out = gm(rent, "rent", new, "--hours", "1", "--yes")
    assert out.returncode == 3 and f"offer {new} was withdrawn by its provider" in out.stderr, out.stderr
