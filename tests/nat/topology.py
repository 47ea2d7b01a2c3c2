"""A real NAT topology in Linux network namespaces, built and torn down by a test (issue 15).

    root ns (the test) --veth-- [inet: bridge, 198.18.N.1 = relay/bootstrap/anvil]
                                   |-- wan 198.18.N.(9+i) [router i: MASQUERADE] lan 10.i.0.1
                                                                   |-- 10.i.0.2 [home i]

* ``inet`` is the public internet: the relay, the bootstrap node and anvil run there, and the test
  process reaches it through its own veth (198.18.N.254), so it can deploy and fund. N is picked
  per lab (a /24 the root namespace has no route to yet), so that labs can coexist.
* Each home sits behind its own router namespace doing NAT with iptables MASQUERADE, of one of
  two kinds:
  - ``"eim"``: plain MASQUERADE; Linux keeps the source port when it is free, and one internal
    (address, port) maps to the same external port for every destination (endpoint-independent
    mapping), so a port observed by one peer is the port another peer must use.
  - ``"symmetric"``: ``MASQUERADE --random-fully``: every new connection gets a random external
    port, so what one peer observes is useless to any other (endpoint-dependent mapping).
  Both filter like a home router: inbound packets pass only for connections the home started
  (conntrack ESTABLISHED/RELATED); anything unsolicited is dropped.
* The addresses are from 198.18.0.0/15 (RFC 2544, benchmarking) and 10.0.0.0/8, inside namespaces
  the test made; nothing is routed off the machine (the root namespace gets one /24 route to its
  veth, removed on close).

Needs root, ``ip`` (iproute2) and ``iptables``; :func:`unavailable_reason` says why not, for a
skip. Every command runs under a timeout; :meth:`NatLab.close` kills every process still in the
namespaces and deletes them (the veths go with them), and runs even when setup fails halfway.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

CMD_TIMEOUT_S = 10.0
NAT_KINDS = ("eim", "symmetric")


def unavailable_reason() -> str | None:
    """Why a NAT topology cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (CI installs iproute2 and iptables)"
    probe = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, timeout=CMD_TIMEOUT_S)
    if probe.returncode != 0:
        return f"iptables does not work here: {probe.stderr.decode(errors='replace').strip()}"
    name = f"gmprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=CMD_TIMEOUT_S)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=CMD_TIMEOUT_S)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.decode(errors='replace').strip()}"
    return None


def sh(*args: str, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


@dataclass(frozen=True)
class Home:
    name: str
    kind: str  # "eim" or "symmetric"
    netns: str  # the home's namespace (where its node runs)
    router: str  # the router's namespace
    addr: str  # the home's private address, 10.i.0.2
    public_addr: str  # the router's WAN address: what the internet sees


class NatLab:
    """``with NatLab({"a": "eim", "b": "symmetric"}) as lab:`` builds the topology above."""

    def __init__(self, homes: dict[str, str]) -> None:
        for kind in homes.values():
            if kind not in NAT_KINDS:
                raise ValueError(f"NAT kind {kind!r}: one of {NAT_KINDS}")
        if len(homes) > 20:
            raise ValueError("at most 20 homes")
        self.tag = "gm" + secrets.token_hex(3)  # unique per lab: names of namespaces and links
        self.inet = f"{self.tag}-inet"
        self.public_net = ""  # "198.18.N", chosen when built
        self.homes: dict[str, Home] = {}
        self._spec = dict(homes)
        self._namespaces: list[str] = []
        self._root_link = f"{self.tag}r"
        self._root_route = False

    # -- building -------------------------------------------------------------------------------

    def __enter__(self) -> NatLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    @property
    def inet_addr(self) -> str:
        """The internet namespace's own address (relay, bootstrap node, anvil)."""
        return f"{self.public_net}.1"

    def _free_public_net(self) -> str:
        routes = sh("ip", "route", "show").stdout
        for n in range(int(self.tag[2:], 16) % 200, 256):
            net = f"198.18.{n}"
            if f"{net}.0/24" not in routes:
                return net
        raise RuntimeError("no free 198.18.N.0/24 for a NAT lab")

    def _build(self) -> None:
        inet = self._netns(self.inet)
        self.public_net = self._free_public_net()
        sh("ip", "-n", inet, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", inet, "addr", "add", f"{self.inet_addr}/24", "dev", "br0")
        sh("ip", "-n", inet, "link", "set", "br0", "up")
        # the test process's own port onto the internet
        sh("ip", "link", "add", self._root_link, "type", "veth", "peer", "name", "p0",
           "netns", inet)
        sh("ip", "-n", inet, "link", "set", "p0", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.public_net}.254/32", "dev", self._root_link)
        sh("ip", "link", "set", self._root_link, "up")
        sh("ip", "route", "add", f"{self.public_net}.0/24", "dev", self._root_link,
           "src", f"{self.public_net}.254")
        self._root_route = True
        for i, (name, kind) in enumerate(self._spec.items(), start=1):
            self.homes[name] = self._add_home(i, name, kind)

    def _add_home(self, i: int, name: str, kind: str) -> Home:
        router = self._netns(f"{self.tag}-r{i}")
        home = self._netns(f"{self.tag}-h{i}")
        wan = f"{self.public_net}.{9 + i}"
        lan_router, lan_home = f"10.{i}.0.1", f"10.{i}.0.2"
        # WAN: router <-> the internet's bridge
        sh("ip", "-n", router, "link", "add", "wan", "type", "veth", "peer", "name", f"p{i}",
           "netns", self.inet)
        sh("ip", "-n", self.inet, "link", "set", f"p{i}", "master", "br0", "up")
        sh("ip", "-n", router, "addr", "add", f"{wan}/24", "dev", "wan")
        sh("ip", "-n", router, "link", "set", "wan", "up")
        # LAN: router <-> home
        sh("ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
           "netns", home)
        sh("ip", "-n", router, "addr", "add", f"{lan_router}/24", "dev", "lan")
        sh("ip", "-n", router, "link", "set", "lan", "up")
        sh("ip", "-n", home, "addr", "add", f"{lan_home}/24", "dev", "eth0")
        sh("ip", "-n", home, "link", "set", "eth0", "up")
        sh("ip", "-n", home, "route", "add", "default", "via", lan_router)
        sh("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masquerade.append("--random-fully")
        sh("ip", "netns", "exec", router, *masquerade)
        # a home router's filter: only replies to what the home started come in
        sh("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack",
           "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", "wan", "-j", "DROP")
        # ... and the router itself answers nothing unsolicited: a SYN to a port with no mapping is
        # dropped, not refused (a RST would travel back through the peer's NAT and tear down the
        # mapping its own simultaneous SYN just made; home routers drop silently)
        sh("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack",
           "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP")
        return Home(name=name, kind=kind, netns=home, router=router, addr=lan_home, public_addr=wan)

    # -- using ------------------------------------------------------------------------------------

    def exec_prefix(self, where: str) -> list[str]:
        """Command prefix that runs a program in ``where`` ("inet" or a home's name)."""
        ns = self.inet if where == "inet" else self.homes[where].netns
        return ["ip", "netns", "exec", ns]

    def run(self, where: str, *args: str, check: bool = True,
            timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
        return sh(*self.exec_prefix(where), *args, check=check, timeout=timeout)

    # -- tearing down -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what still runs in our namespaces, delete them (their links go with them) and the
        root side's route and veth. Safe to call twice and after a partial build."""
        for ns in reversed(self._namespaces):
            self._kill_all(ns)
        for ns in reversed(self._namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()
        if self._root_route:
            sh("ip", "route", "del", f"{self.public_net}.0/24", "dev", self._root_link, check=False)
            self._root_route = False
        sh("ip", "link", "del", self._root_link, check=False)  # gone already if inet went first

    @staticmethod
    def _kill_all(ns: str) -> None:
        deadline = time.monotonic() + 5.0
        sig = signal.SIGTERM
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "pids", ns, check=False)
            pids = [int(p) for p in out.stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
            if time.monotonic() > deadline - 2.5:
                sig = signal.SIGKILL
