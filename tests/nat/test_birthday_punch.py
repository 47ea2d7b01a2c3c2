"""The birthday punch through a port-rewriting NAT (node/birthday_punch.py).

Without root: the plan's wire rules (what a hostile peer may send), the role rule, the limits.
With root, on the NAT topology of tests/nat/topology.py (one endpoint-independent home whose
router keeps ports and filters by address and port, one behind ``MASQUERADE --random-fully``):
renters hole-punch to a provider with the same code and processes as tests/benchmarks/
bench_nat.py, both ways round, and no socket is left open afterwards."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import trio
from libp2p.io.exceptions import MessageTooLarge
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_uvarint

from node import birthday_punch as bp
from node.reachability import ReachabilityConfig, is_public_ip, is_relayed
from tests.nat.topology import unavailable_reason

EASY = "/ip4/198.18.7.10/tcp/4001"
HARD = "/ip4/198.18.7.11/tcp/4001"


# -- the plan ---------------------------------------------------------------------------------

def test_plan_parsing_rejects_what_a_hostile_peer_might_send() -> None:
    assert bp.parse_plan({"type": "plan", "mapping": "preserving", "addrs": [EASY]}) == (
        "preserving", [("198.18.7.10", 4001)])
    for bad in ({"mapping": "cone", "addrs": []}, {"mapping": "rewriting", "addrs": EASY},
                {"mapping": "rewriting", "addrs": [EASY] * 5},
                {"mapping": "rewriting", "addrs": [7]},
                {"mapping": "rewriting", "addrs": ["/ip4/1.2.3.4/tcp/1" + "0" * 100]}):
        with pytest.raises(bp.PunchRefused):
            bp.parse_plan(bad)
    # an address that is not /ip4/../tcp/.. is ignored, not an error
    assert bp.parse_plan({"mapping": "rewriting", "addrs": ["/dns4/x/tcp/1", "junk"]})[1] == []


def test_roles_only_for_one_port_keeping_and_one_port_rewriting_nat() -> None:
    easy, hard = [("198.18.7.10", 4001)], [("198.18.7.11", 4001)]
    me_hard = bp.decide("rewriting", hard, "preserving", easy, is_public_ip)
    assert me_hard == bp.Roles(hard=True, target=("198.18.7.10", 4001))
    me_easy = bp.decide("preserving", easy, "rewriting", hard, is_public_ip)
    assert me_easy.hard is False and me_easy.target[0] == "198.18.7.11"
    for mine, theirs in (("rewriting", "rewriting"), ("preserving", "preserving"),
                         ("unknown", "rewriting"), ("preserving", "unknown")):
        with pytest.raises(bp.PunchRefused, match="no hard/easy pair"):
            bp.decide(mine, easy, theirs, hard, is_public_ip)


@pytest.mark.parametrize("their_addrs,why", [
    ([("10.0.0.5", 4001)], "no public address"),  # a LAN address: never sprayed at
    ([("127.0.0.1", 4001)], "no public address"),
    ([], "no public address"),
    ([("198.18.7.10", 0)], "no public address"),
    ([("198.18.7.10", 4001)], "our own address"),
])
def test_targets_must_be_someone_elses_public_address(their_addrs, why) -> None:
    with pytest.raises(bp.PunchRefused, match=why):
        bp.decide("preserving", [("198.18.7.10", 4001)], "rewriting", their_addrs, is_public_ip)


class Bytes:
    """A stream that returns ``data`` and then EOF."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        out, self.data = self.data[:n if n > 0 else len(self.data)], self.data[n if n > 0 else len(self.data):]
        return out


@pytest.mark.trio
@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"type": "hello"}', b"\xff\xfe"])
async def test_malformed_messages_end_the_exchange(payload) -> None:
    with pytest.raises(bp.PunchRefused):
        await bp._recv(Bytes(encode_uvarint(len(payload)) + payload))


@pytest.mark.trio
async def test_an_oversized_message_is_not_read() -> None:
    payload = b'{"type": "plan"' + b" " * 2000 + b"}"
    stream = Bytes(encode_uvarint(len(payload)) + payload)
    with pytest.raises(MessageTooLarge):
        await bp._recv(stream)
    assert len(stream.data) == len(payload)  # refused on its length prefix, the body unread


# -- limits -----------------------------------------------------------------------------------

def test_config_bounds_and_the_estimate() -> None:
    one_round = bp.BirthdayConfig(rounds=1).success_estimate()
    assert math.isclose(one_round, 1 - math.exp(-256 * 1024 / 64512)) and one_round > 0.98
    assert math.isclose(1 - bp.BirthdayConfig().success_estimate(), (1 - one_round) ** 2)
    for kwargs in ({"hard_nat_sockets": 0}, {"hard_nat_probes": 100_000},
                   {"hard_nat_window_s": 0.1}, {"hard_nat_runs_per_minute": 0}):
        with pytest.raises(ValueError, match="hard NAT punch"):
            ReachabilityConfig(**kwargs)


def test_config_file_keys(tmp_path) -> None:
    from node.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text("[relay]\nhard_nat_probes = 2048\nhard_nat_window_s = 6\n"
                    "hard_nat_punch = false\n")
    got = ReachabilityConfig(**load_config(path).relay)
    assert (got.hard_nat_probes, got.hard_nat_window_s, got.hard_nat_punch) == (2048, 6, False)
    assert got.birthday_config().probes == 2048
    for text, why in (('[relay]\nhard_nat_sockets = "many"\n', "hard_nat_sockets"),
                      ("[relay]\nhard_nat_probes = 100000\n", "hard NAT punch")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_config(path)


def peer(i: int) -> ID:
    return ID(bytes([0, 4, 1, 2, 3, i]))


def test_built_outside_trio_then_admits_the_first_run() -> None:
    """The node builds its host (and this) before trio runs: `gpumarket node run` died with
    "must be called from async context" when the rate limit read trio's clock here."""
    punch = bp.BirthdayPunch(None, bp.BirthdayConfig(runs_per_minute=1), Counter(), is_public_ip,
                             lambda: [], {peer(1)}.__contains__)

    async def first_run() -> None:
        punch._admit(peer(1))  # the bucket starts full

    trio.run(first_run)


@pytest.mark.trio
async def test_runs_are_limited_per_peer_at_once_and_in_all() -> None:
    relayed = {peer(i) for i in range(20)}
    punch = bp.BirthdayPunch(None, bp.BirthdayConfig(runs_per_minute=3, min_interval_s=300),
                             Counter(), is_public_ip, lambda: [], relayed.__contains__)
    punch._admit(peer(1))
    with pytest.raises(bp.PunchRefused, match="too soon for this peer"):
        punch._admit(peer(1))
    punch._busy = True
    with pytest.raises(bp.PunchRefused, match="a punch is running"):
        punch._admit(peer(2))
    punch._busy = False
    with pytest.raises(bp.PunchRefused, match="not a relayed peer"):
        punch._admit(peer(99))  # directly connected (or not at all): nothing to punch
    punch._admit(peer(2))
    punch._admit(peer(3))
    with pytest.raises(bp.PunchRefused, match="rate limit"):  # 3 a minute, new ids or not
        punch._admit(peer(4))


# -- on the NAT topology (root) ---------------------------------------------------------------

REASON = unavailable_reason()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("kinds", [("eim", "symmetric"), ("symmetric", "eim")],
                         ids=["provider-eim", "provider-symmetric"])
def test_hole_punch_between_a_port_keeping_and_a_port_rewriting_nat(kinds, tmp_path) -> None:
    from tests.benchmarks.bench_nat import bench_pair

    rows: list[dict] = []
    fds: dict = {}
    summary = bench_pair(kinds, 5, tmp_path, rows_out=rows, fds_out=fds)
    assert summary["tries"] == 5
    # P(direct) = 1 - exp(-2 * 256 * 1024 / 64512) = 0.9997 a try (two rounds)
    assert summary["direct_ok"] >= 4, rows
    for row in rows:
        b = row["birthday"]  # the renter ran it, as the hard side when it is behind --random-fully
        assert b["hard"] is (kinds[1] == "symmetric")
        assert b["attempts"] == (256 if b["hard"] else 1024) and b["sent"] <= b["attempts"]
        assert b["seconds"] < 4.0 + 10.0 + 1.5  # the window, and one upgrade under its timeout
        if row["direct"]:
            assert b["direct"] and b["connected"] >= 1 and row["rtt_direct_ms"] < row["rtt_relayed_ms"]
    # the provider took part 5 times (1024 or 256 sockets each) and holds no more than before
    assert fds["provider"] <= fds["provider_ready"] + 4, fds


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_two_port_rewriting_nats_do_not_spray(tmp_path) -> None:
    """Neither side can be predicted: the plan is refused at once and DCUtR runs (and fails)."""
    from tests.benchmarks.bench_nat import bench_pair

    rows: list[dict] = []
    bench_pair(("symmetric", "symmetric"), 1, tmp_path, rows_out=rows)
    assert "birthday" not in rows[0] and rows[0]["counters"].get("nat.birthday_not_run") == 1
    assert not rows[0]["direct"]


SERVER = r'''
import json, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], 5000))
listener.listen(1024)
listener.settimeout(10)
print("ready", flush=True)
ports = []
try:
    while len(ports) < int(sys.argv[2]):
        conn, addr = listener.accept()
        ports.append(addr[1])
        conn.close()
except socket.timeout:
    pass
print(json.dumps(ports), flush=True)
'''
CLIENT = r'''
import socket, sys
for _ in range(int(sys.argv[2])):
    socket.create_connection((sys.argv[1], 5000), timeout=3).close()
'''


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_the_port_rewriting_router_picks_ports_over_1024_to_65535() -> None:
    """R in the odds: MASQUERADE --random-fully draws from 1024-65535 for source ports above
    1023 (not the router's ip_local_port_range), so R = 64512."""
    import json
    import subprocess
    import sys

    from tests.nat.topology import NatLab

    n = 600
    with NatLab({"s": "symmetric"}) as lab:
        server = subprocess.Popen([*lab.exec_prefix("inet"), sys.executable, "-c", SERVER,
                                   lab.inet_addr, str(n)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            lab.run("s", sys.executable, "-c", CLIENT, lab.inet_addr, str(n), timeout=60)
            ports = json.loads(server.stdout.readline())
        finally:
            server.kill()
            server.wait(10)
    assert len(ports) == n and len(set(ports)) == n
    assert min(ports) >= 1024 and min(ports) < 4000 and max(ports) > 62000
    below = sum(p < 33280 for p in ports) / n  # the middle of 1024-65535
    assert 0.4 < below < 0.6, below


@pytest.mark.trio
@pytest.mark.parametrize("our_mapping,why", [(None, "no hard/easy pair"),
                                             ("preserving", "not a relayed peer")])
async def test_a_plan_over_a_direct_connection_is_refused_on_the_wire(
        our_mapping, why, monkeypatch) -> None:
    """A peer on loopback sends a plan naming a public victim: the node answers refuse and
    opens no socket, whether it knows its own NAT (then: the peer is not reached through a
    relay) or not (no observation on loopback: no hard/easy pair)."""
    import os

    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from node.host import build_libp2p_host
    from node.identity import NodeIdentity

    local = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    node = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [local])
    hostile = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [local])
    counters: Counter[str] = Counter()
    with trio.fail_after(30):
        async with node.run([local]), hostile.run([local]):
            if our_mapping is not None:
                monkeypatch.setattr(bp, "port_mapping", lambda host, is_public: our_mapping)
            def relayed_only(peer) -> bool:  # as Reachability.relayed_only decides
                conns = node.get_network().connections.get(peer, [])
                return bool(conns) and all(is_relayed(c) for c in conns)

            punch = bp.BirthdayPunch(node, bp.BirthdayConfig(), counters, is_public_ip,
                                     lambda: ["/ip4/198.18.7.10/tcp/4001"], relayed_only)
            punch.attach()
            await hostile.connect(info_from_p2p_addr(node.get_addrs()[0]))
            stream = await hostile.new_stream(node.get_id(), [bp.PROTOCOL_ID])
            await bp._send(stream, {"type": "plan", "mapping": "rewriting",
                                    "addrs": ["/ip4/8.8.8.8/tcp/443"]})
            reply = await bp._recv(stream)
            assert reply["type"] == "refuse" and why in reply["reason"], reply
            await stream.close()
            with trio.move_on_after(5):
                while not counters["nat.birthday_refused"]:
                    await trio.sleep(0.05)
    assert counters["nat.birthday_refused"] == 1 and punch.last == {}
    assert not any(k in counters for k in ("nat.birthday_ok", "nat.birthday_failed"))
