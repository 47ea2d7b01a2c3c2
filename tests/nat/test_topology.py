"""The NAT test topology itself (tests/nat/topology.py): homes reach the internet through their
routers, the internet sees only the routers' addresses, unsolicited inbound connections are
dropped, and the two NAT kinds map ports as they claim (same external port for every
destination, or a fresh random one per connection)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.nat.topology import NatLab, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# A TCP server that prints "ip:port" of each peer that connects (then closes it), N times.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); s.settimeout(10)
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    c, peer = s.accept(); print(f"{peer[0]}:{peer[1]}", flush=True); c.close()
"""
# Connect from a fixed local port to each "ip:port" given; print "ok" or the error per target.
CLIENT = """
import socket, sys
for target in sys.argv[2:]:
    ip, port = target.split(":")
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    c.bind(("0.0.0.0", int(sys.argv[1]))); c.settimeout(2)
    try:
        c.connect((ip, int(port))); print("ok", flush=True)
    except OSError as exc:
        print(type(exc).__name__, flush=True)
    c.close()
"""


def _server(lab: NatLab, where: str, ip: str, port: int, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([*lab.exec_prefix(where), sys.executable, "-c", SERVER, ip, str(port),
                             str(count)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def _observed(lab: NatLab, home: str, local_port: int, targets: list[str]) -> list[str]:
    out = lab.run(home, sys.executable, "-c", CLIENT, str(local_port), *targets, timeout=15)
    return out.stdout.split()


@pytest.fixture(scope="module")
def lab():
    with NatLab({"a": "eim", "b": "symmetric"}) as lab:
        yield lab


def test_homes_reach_the_internet_as_their_router(lab: NatLab) -> None:
    for home in lab.homes.values():
        server = _server(lab, "inet", lab.inet_addr, 7001, 1)
        try:
            assert _observed(lab, home.name, 40000, [f"{lab.inet_addr}:7001"]) == ["ok"]
            seen = server.stdout.readline().strip()
        finally:
            server.wait(timeout=10)
        assert seen.split(":")[0] == home.public_addr  # not 10.x: the router's WAN address


def test_unsolicited_inbound_is_dropped(lab: NatLab) -> None:
    a = lab.homes["a"]
    server = _server(lab, "a", "0.0.0.0", 7002, 1)
    try:
        # the internet dials the router's public address and the home's private one: both fail
        out = lab.run("inet", sys.executable, "-c", CLIENT, "0", f"{a.public_addr}:7002",
                      f"{a.addr}:7002", timeout=15)
        assert "ok" not in out.stdout.split()
    finally:
        server.kill()
        server.wait(timeout=5)


@pytest.mark.parametrize("home,same_port", [("a", True), ("b", False)])
def test_mapping_kind(lab: NatLab, home: str, same_port: bool) -> None:
    """One local port, two destinations (two listeners in the internet): an endpoint-independent
    NAT shows both the same external port, a symmetric one (random ports) does not."""
    first = _server(lab, "inet", lab.inet_addr, 7003, 1)
    second = _server(lab, "inet", lab.inet_addr, 7004, 1)
    try:
        assert _observed(lab, home, 41000, [f"{lab.inet_addr}:7003", f"{lab.inet_addr}:7004"]) == ["ok", "ok"]
        ports = [first.stdout.readline().strip().split(":")[1],
                 second.stdout.readline().strip().split(":")[1]]
    finally:
        first.wait(timeout=10)
        second.wait(timeout=10)
    assert (ports[0] == ports[1]) is same_port, ports
    if same_port:
        assert ports[0] == "41000"  # Linux MASQUERADE keeps a free source port


def test_close_removes_everything() -> None:
    lab = NatLab({"x": "eim"})
    with lab:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert lab.tag in names
        sleeper = subprocess.Popen([*lab.exec_prefix("x"), "sleep", "60"])
        time.sleep(0.2)
    sleeper.wait(timeout=10)  # killed by close()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.tag not in names
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert lab.tag not in links
