"""TCP hole punching through a port-rewriting ("hard", symmetric) NAT: the birthday punch.

DCUtR's TCP simultaneous open needs each side to predict the other's public (IP, port): a
port-preserving, endpoint-independent NAT maps the listen port to itself, so WAN IP + listen
port is right. A NAT that gives every new connection a random public port (Linux
``MASQUERADE --random-fully``, many CGNATs) makes the hard side's port unknowable, and the easy
side's router (Linux conntrack filters by remote address AND port) drops whatever arrives from a
port it has not sent to. DCUtR then fails (bench_nat: 0/20 for EIM-symmetric).

The birthday punch (Tailscale's answer for hard NATs, here over TCP), run after DCUtR failed,
over the relayed connection, with the roles taken from what each side knows of its own NAT:

* the hard side (its NAT rewrites ports) opens ``sockets`` connections from fresh ephemeral
  ports, all to the easy side's known public address (WAN IP + listen port): its router makes
  ``sockets`` random public ports, each a hole admitting that one address;
* the easy side (its NAT keeps ports) sends ``probes`` SYNs from its listen port (SO_REUSEPORT,
  as DCUtR's dials) to distinct random ports of the hard side's public IP: each makes a hole in
  its own router for that (IP, port).

A probe port equal to one of the hard side's public ports completes a TCP connection through
both routers, whichever SYN arrives first (a simultaneous open, or a plain open through the
hole). With R ports in the hard NAT's range (Linux: 1024-65535, R = 64512, measured: random over
the whole range), P(at least one match) = 1 - exp(-sockets * probes / R): 256 x 1024 gives 98%.
Every socket is held for ``window_s`` (the easy side's probes must still exist when the hard
side's SYN or SYN-ACK comes: a closed probe turns the reply into a RST from the listen port) and
retransmits its SYN once (TCP_SYNCNT=1). A round that connects nothing is run once more
(``rounds`` = 2: P(miss) 0.017 -> 0.0003; bench_nat measured 3 misses in 70 single rounds).

libp2p roles on the resulting connection: the hard side upgrades it as the dialler (Noise
initiator), the easy side as the listener, every socket that connected at once (several may).
The hard side keeps the first that upgrades, closes the others and names it to the easy side by
opening a :data:`CHOICE_PROTOCOL_ID` stream on it; the easy side then closes its others (new
streams would otherwise land on connections the hard side is closing). The connection is then
an ordinary direct connection of the swarm.

Bounds, so that a hostile peer cannot aim the node at a third party: only over a relayed
connection to that peer, only when the two kinds differ (preserving vs rewriting); the targets
are the public IPv4 address the peer names for itself (a relayed connection cannot show its
real address; the bound is what limits abuse), never a private one; at most one run per peer per
``min_interval_s``, one run at a time, and ``runs_per_minute`` in all (a token bucket). So one
run costs at most ``rounds`` x 2 x ``probes`` SYNs to distinct ports of one IP, or ``rounds`` x
2 x ``sockets`` SYNs to one (IP, port), every socket closed by the end of its round.

Wire (protocol ``/gpumarket/punch/birthday/1.0.0``, opened by the peer that ran DCUtR): each
message is an unsigned-varint length and a UTF-8 JSON object of at most 1024 bytes.
  initiator -> {"type": "plan", "mapping": M, "addrs": [A, ...]}
  responder -> {"type": "plan", "mapping": M, "addrs": [...]}  or  {"type": "refuse", "reason": R}
  initiator -> {"type": "go"}   (it starts half the measured round trip later; the responder
                                  starts on receipt; after a round without a connection the
                                  initiator may send one more "go", up to ``rounds`` in all)
M is "preserving", "rewriting" or "unknown"; A are /ip4/IP/tcp/PORT multiaddrs (at most 4; the
easy side's public IP + listen port, the hard side's public IP). Anything else ends the stream.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import socket as stdlib_socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

from node.libp2p_nat_patches import swarm_conn_of
from node.ratelimit import PerKeyInterval, TokenBucket
from node.reqresp import close_quietly

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/gpumarket/punch/birthday/1.0.0")
# opened by the dialler on the one connection of a run it keeps (the listener closes the others)
CHOICE_PROTOCOL_ID = TProtocol("/gpumarket/punch/birthday/chosen/1.0.0")
MAX_MESSAGE = 1024
MAX_ADDRS = 4
PORT_MIN, PORT_MAX = 1024, 65535  # Linux's NAT range for source ports >= 1024
MESSAGE_TIMEOUT_S = 10.0
UPGRADE_TIMEOUT_S = 10.0
# Every connected socket is upgraded at once, up to this many (then they wait for a slot): taking
# a few at a time, each side could wait on a different few until the upgrade timeout. Measured
# on the lab: up to 30 sockets of the hard side connect when earlier runs' holes are still open
# in the easy side's router, most of them to nothing that answers.
MAX_UPGRADES = 128
FD_RESERVE = 256  # file descriptors always left to the rest of the node
PRESERVING, REWRITING, UNKNOWN = "preserving", "rewriting", "unknown"


@dataclass(frozen=True)
class BirthdayConfig:
    sockets: int = 256  # connections the port-rewriting side opens
    probes: int = 1024  # ports the port-preserving side tries
    window_s: float = 4.0  # how long every socket is held
    rounds: int = 2  # a round that connects nothing (P = exp(-sockets*probes/R)) is run again
    min_interval_s: float = 300.0  # per peer
    runs_per_minute: float = 4.0  # all peers together (token bucket, burst = this many)

    def __post_init__(self) -> None:
        if not (1 <= self.sockets <= 4096 and 1 <= self.probes <= 8192):
            raise ValueError("hard NAT punch: sockets in 1..4096, probes in 1..8192")
        if not (0.5 <= self.window_s <= 30):
            raise ValueError("hard NAT punch: window_s in 0.5..30")
        if not (1 <= self.rounds <= 3):
            raise ValueError("hard NAT punch: rounds in 1..3")
        if self.min_interval_s < 0 or self.runs_per_minute <= 0:
            raise ValueError("hard NAT punch: min_interval_s >= 0, runs_per_minute > 0")

    def success_estimate(self, port_range: int = PORT_MAX - PORT_MIN + 1) -> float:
        """P(a direct connection) with ``rounds`` independent rounds."""
        import math
        return 1.0 - math.exp(-self.sockets * self.probes / port_range * self.rounds)


class PunchRefused(Exception):
    """A plan that must not be run (a reason, for the log and the peer)."""


# -- what a node knows about its own NAT ------------------------------------------------------

def _local_port(conn: Any) -> int | None:
    """The local TCP port of a swarm connection (the socket under its muxer and security)."""
    seen = 0
    todo = [conn]
    while todo and seen < 32:
        obj = todo.pop()
        seen += 1
        sock = getattr(obj, "socket", None)
        if sock is not None and hasattr(sock, "getsockname"):
            try:
                return int(sock.getsockname()[1])
            except (OSError, IndexError, TypeError, ValueError):
                return None
        for name in ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer",
                     "stream", "raw_conn"):
            child = getattr(obj, name, None)
            if child is not None and child is not obj:
                todo.append(child)
    return None


def _ip_port(addr: multiaddr.Multiaddr | str) -> tuple[str, int] | None:
    try:
        addr = multiaddr.Multiaddr(str(addr))
        return str(addr.value_for_protocol("ip4")), int(addr.value_for_protocol("tcp"))
    except Exception:
        return None


def port_mapping(host: IHost, is_public_ip: Any) -> str:
    """How our NAT maps ports, from identify's observations on direct connections: the port a
    public peer saw equals our socket's local port ("preserving"), or differs ("rewriting",
    any one observation suffices: a preserving NAT never moves a free port); "unknown" without
    an observation from a public address."""
    manager = getattr(host, "_observed_addr_manager", None)
    observations = getattr(manager, "_conn_observations", None)
    if not observations:
        return UNKNOWN
    kinds = set()
    for _local, external, _group, ref in list(observations.values()):
        conn = ref()
        seen = _ip_port(external)
        if conn is None or seen is None or not is_public_ip(seen[0]):
            continue
        local = _local_port(conn)
        if local is not None:
            kinds.add(PRESERVING if local == seen[1] else REWRITING)
    if REWRITING in kinds:
        return REWRITING
    return PRESERVING if kinds else UNKNOWN


# -- messages ---------------------------------------------------------------------------------

async def _send(stream: INetStream, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    with trio.fail_after(MESSAGE_TIMEOUT_S):
        await stream.write(encode_uvarint(len(data)) + data)


async def _recv(stream: INetStream, timeout: float = MESSAGE_TIMEOUT_S) -> dict:
    with trio.fail_after(timeout):
        data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
    try:
        msg = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise PunchRefused("not a JSON message") from None
    if not isinstance(msg, dict) or msg.get("type") not in ("plan", "refuse", "go"):
        raise PunchRefused("unknown message")
    return msg


def parse_plan(msg: dict) -> tuple[str, list[tuple[str, int]]]:
    """(mapping, [(ip, port)]) of a peer's plan; PunchRefused when malformed."""
    mapping, addrs = msg.get("mapping"), msg.get("addrs")
    if mapping not in (PRESERVING, REWRITING, UNKNOWN):
        raise PunchRefused(f"bad mapping {mapping!r}")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS or not all(
            isinstance(a, str) and len(a) <= 100 for a in addrs):
        raise PunchRefused("bad addrs")
    parsed = [p for a in addrs if (p := _ip_port(a)) is not None]
    return mapping, parsed


@dataclass(frozen=True)
class Roles:
    hard: bool  # we open ``sockets`` connections to ``target``; else we probe ``target``'s IP
    target: tuple[str, int]


def decide(mine: str, my_addrs: list[tuple[str, int]], theirs: str,
           their_addrs: list[tuple[str, int]], is_public_ip: Any) -> Roles:
    """Our part of a plan, the same rule on both sides; PunchRefused when there is none."""
    if {mine, theirs} != {PRESERVING, REWRITING}:
        raise PunchRefused(f"no hard/easy pair (we are {mine}, the peer {theirs})")
    public = [(ip, port) for ip, port in their_addrs if is_public_ip(ip) and 0 < port < 65536]
    if not public:
        raise PunchRefused("the peer named no public address")
    mine_public = {ip for ip, _ in my_addrs}
    target = public[0]
    if target[0] in mine_public:
        raise PunchRefused("the peer named our own address")
    return Roles(hard=(mine == REWRITING), target=target)


# -- sockets ----------------------------------------------------------------------------------

def _ensure_fds(wanted: int) -> int:
    """How many sockets we may open now (raising the soft RLIMIT_NOFILE towards the hard one,
    as Go does at start), leaving :data:`FD_RESERVE` to the node."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
        need = in_use + wanted + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(hard, need)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        return max(0, min(wanted, soft - in_use - FD_RESERVE))
    except (OSError, ValueError):
        return 0


class _Spray:
    """Open one TCP connection attempt per target, all at once (in small paced batches), each
    held until the window ends; hand every socket that connects to ``connected``."""

    def __init__(self, targets: list[tuple[str, int]], bind: tuple[str, int] | None) -> None:
        self.targets = targets
        self.bind = bind
        self.sent = 0
        self.failed_bind = 0
        send, recv = trio.open_memory_channel[trio.socket.SocketType](len(targets) + 1)
        self._send, self.connected = send, recv

    async def _one(self, target: tuple[str, int]) -> None:
        sock = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
        try:
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_SYNCNT, 1)
            if self.bind is not None:
                sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
                sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
                try:
                    await sock.bind(self.bind)
                except OSError:
                    self.failed_bind += 1
                    sock.close()
                    return
            self.sent += 1
            await sock.connect(target)
        except OSError:
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        try:
            self._send.send_nowait(sock)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            sock.close()

    async def run(self) -> None:
        """Until cancelled (the caller's window): every unconnected socket is closed then."""
        async with trio.open_nursery() as nursery:
            for i, target in enumerate(self.targets):
                nursery.start_soon(self._one, target)
                if i % 64 == 63:
                    await trio.sleep(0.002)  # let the SYNs out in batches

    def close_unclaimed(self) -> None:
        self._send.close()
        while True:
            try:
                self.connected.receive_nowait().close()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break


def _raw(sock: trio.socket.SocketType, initiator: bool) -> RawConnection:
    return RawConnection(TrioTCPStream(trio.SocketStream(sock)), initiator)


# -- the protocol -----------------------------------------------------------------------------

class BirthdayPunch:
    """Serves and starts birthday punches for one host (node.reachability owns it)."""

    def __init__(self, host: IHost, config: BirthdayConfig, counters: Counter[str],
                 is_public_ip: Any, our_addrs: Any, is_relayed_only: Any) -> None:
        """``our_addrs()``: our predicted public /ip4/.../tcp/LISTEN addresses (DCUtR's);
        ``is_relayed_only(peer)``: we reach the peer through a relay only."""
        self.host = host
        self.config = config
        self.counters = counters
        self.is_public_ip = is_public_ip
        self.our_addrs = our_addrs
        self.is_relayed_only = is_relayed_only
        self._last_run = PerKeyInterval(config.min_interval_s)
        self._busy = False
        self._choice_waiters: dict[ID, tuple[trio.Event, list[Any]]] = {}
        # Starts full; stamped at the first take (the node builds its host before trio runs,
        # where trio.current_time() raises).
        self._bucket = TokenBucket(config.runs_per_minute / 60.0,
                                   max(1.0, config.runs_per_minute), float("-inf"))
        self.last: dict[str, Any] = {}  # figures of the last run, for logs and tests

    def attach(self) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, self._handle)
        self.host.set_stream_handler(CHOICE_PROTOCOL_ID, self._handle_choice)

    def detach(self) -> None:
        self.host.remove_stream_handler(PROTOCOL_ID)
        self.host.remove_stream_handler(CHOICE_PROTOCOL_ID)

    def _my_plan(self) -> tuple[str, list[str]]:
        return port_mapping(self.host, self.is_public_ip), [str(a) for a in self.our_addrs()][:MAX_ADDRS]

    def _admit(self, peer: ID) -> None:
        """Take this run's place in the limits, or raise PunchRefused."""
        now = trio.current_time()
        if self._busy:
            raise PunchRefused("a punch is running")
        if not self._last_run.due(peer, now):
            raise PunchRefused("too soon for this peer")
        if not self.is_relayed_only(peer):
            raise PunchRefused("not a relayed peer")
        if not self._bucket.take(now):
            raise PunchRefused("rate limit")
        self._last_run.ran(peer, now)

    # -- initiator ----------------------------------------------------------------------------

    async def initiate(self, peer: ID) -> bool | None:
        """Offer ``peer`` (reached through a relay) a birthday punch and run it when one side's
        NAT keeps ports and the other's rewrites them. None: not run (no such pair, a limit,
        or the peer does not speak the protocol: DCUtR is the one to try); True: a direct
        connection exists afterwards; False: it ran and failed."""
        mine, my_addrs = self._my_plan()
        if mine == UNKNOWN:
            self.counters["nat.birthday_skipped"] += 1
            return None
        stream = None
        started = False
        try:
            with trio.fail_after(MESSAGE_TIMEOUT_S * 2):
                stream = await self.host.new_stream(peer, [PROTOCOL_ID])
                t0 = trio.current_time()
                await _send(stream, {"type": "plan", "mapping": mine, "addrs": my_addrs})
                reply = await _recv(stream)
                rtt = trio.current_time() - t0
            if reply["type"] == "refuse":
                raise PunchRefused(f"peer refused: {str(reply.get('reason'))[:80]}")
            theirs, their_addrs = parse_plan(reply)
            roles = decide(mine, [a for s in my_addrs if (a := _ip_port(s))], theirs,
                           their_addrs, self.is_public_ip)
            self._admit(peer)
            self._busy = started = True
            for round_ in range(self.config.rounds):
                await _send(stream, {"type": "go"})
                await trio.sleep(min(rtt / 2, 2.0))
                if await self._run(peer, roles, round_):
                    return True
            return False
        except Exception as exc:
            log.info("birthday punch to %s: %r", peer, exc)
            self.counters["nat.birthday_error" if started else "nat.birthday_not_run"] += 1
            return False if started else None
        finally:
            if started:
                self._busy = False
            if stream is not None:
                await close_quietly(stream)

    # -- responder ----------------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        started = False
        try:
            msg = await _recv(stream)
            if msg["type"] != "plan":
                raise PunchRefused("expected a plan")
            theirs, their_addrs = parse_plan(msg)
            mine, my_addrs = self._my_plan()
            try:
                roles = decide(mine, [a for s in my_addrs if (a := _ip_port(s))], theirs,
                               their_addrs, self.is_public_ip)
                self._admit(peer)
            except PunchRefused as exc:
                await _send(stream, {"type": "refuse", "reason": str(exc)[:80]})
                raise
            self._busy = started = True
            await _send(stream, {"type": "plan", "mapping": mine, "addrs": my_addrs})
            for round_ in range(self.config.rounds):
                if round_ == 0:
                    go = await _recv(stream)
                else:  # the initiator's round may have lasted longer than ours
                    try:
                        go = await _recv(stream, self.config.window_s + UPGRADE_TIMEOUT_S
                                         + MESSAGE_TIMEOUT_S)
                    except Exception:  # EOF, reset or silence: it got through, or gave up
                        break
                if go["type"] != "go":
                    raise PunchRefused("expected go")
                if await self._run(peer, roles, round_):
                    break
        except Exception as exc:
            log.info("birthday punch from %s: %r", peer, exc)
            self.counters["nat.birthday_error" if started else "nat.birthday_refused"] += 1
        finally:
            if started:
                self._busy = False
            await close_quietly(stream)

    # -- both ---------------------------------------------------------------------------------

    def _listen_addr(self) -> tuple[str, int] | None:
        """Our TCP listen (ip, port): the probes leave from it, as DCUtR's dials do."""
        for addr in self.host.get_transport_addrs():
            ip_port = _ip_port(addr)
            if ip_port:
                return ip_port
        return None

    async def _run(self, peer: ID, roles: Roles, round_: int = 0) -> bool:
        t0 = trio.current_time()
        if roles.hard:
            count = _ensure_fds(self.config.sockets)
            targets = [roles.target] * count
            bind = None
        else:
            bind = self._listen_addr()
            if bind is None:
                self.counters["nat.birthday_failed"] += 1
                return False
            count = _ensure_fds(self.config.probes)
            ports = random.sample(range(PORT_MIN, PORT_MAX + 1), count)
            targets = [(roles.target[0], p) for p in ports]
        if count == 0:
            log.warning("birthday punch with %s: no file descriptors to spare", peer)
            self.counters["nat.birthday_failed"] += 1
            return False
        spray = _Spray(targets, bind)
        upgraded: list[Any] = []  # our connections of this round that upgraded
        chosen: list[Any] = []  # the one both sides keep
        tally: Counter[str] = Counter()  # connected, upgraded, upgrade_failed
        slots = trio.Semaphore(MAX_UPGRADES)
        pending = [0]
        told = trio.Event()  # listener: the dialler named the connection it keeps
        if not roles.hard:
            self._choice_waiters[peer] = (told, chosen)

        async def upgrade(sock: trio.socket.SocketType, nursery: trio.Nursery,
                          spray_scope: trio.CancelScope) -> None:
            owned = False
            pending[0] += 1
            try:
                async with slots:
                    if chosen:
                        return
                    owned = True
                    conn = await self._upgrade(peer, sock, roles.hard)
            finally:
                pending[0] -= 1
                if not owned:
                    sock.close()
            tally["upgraded" if conn is not None else "upgrade_failed"] += 1
            if conn is None:
                return
            upgraded.append(conn)
            spray_scope.cancel()  # no more attempts needed
            if roles.hard and not chosen:
                chosen.append(conn)  # the first: named to the listener below
                nursery.cancel_scope.cancel()  # the other upgrades close their sockets
            # listener: several may upgrade; cancelling any before the dialler names the one
            # it keeps could close that one

        try:
            with trio.move_on_after(self.config.window_s + 2 * UPGRADE_TIMEOUT_S + 1):
                async with trio.open_nursery() as nursery:
                    spray_scope = trio.CancelScope()

                    async def spraying() -> None:
                        with spray_scope:
                            with trio.move_on_after(self.config.window_s):
                                await spray.run()
                        spray.close_unclaimed()  # ends the loop below
                        if not roles.hard:  # upgrades under way end within their timeout
                            wait = UPGRADE_TIMEOUT_S if pending[0] or upgraded else 1.0
                            with trio.move_on_after(wait):
                                await told.wait()
                            nursery.cancel_scope.cancel()

                    async def watch() -> None:
                        await told.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(spraying)
                    if not roles.hard:
                        nursery.start_soon(watch)
                    async for sock in spray.connected:
                        tally["connected"] += 1
                        nursery.start_soon(upgrade, sock, nursery, spray_scope)
            if roles.hard and chosen and not await self._name_choice(chosen[0]):
                chosen.clear()
        finally:
            spray.close_unclaimed()
            if not roles.hard:
                self._choice_waiters.pop(peer, None)
            keep = chosen[0] if chosen else None
            for conn in upgraded:  # every other connection of this round goes
                if keep is not None and (conn is keep or getattr(conn, "muxed_conn", None) is keep):
                    continue
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await conn.close()
                    except Exception:
                        pass
            self.last = {"round": round_, "hard": roles.hard, "attempts": count, "sent": spray.sent,
                         **tally, "direct": keep is not None,
                         "seconds": round(trio.current_time() - t0, 3)}
            log.info("birthday punch with %s: %s", peer, self.last)
        self.counters["nat.birthday_ok" if keep is not None else "nat.birthday_failed"] += 1
        return keep is not None

    async def _name_choice(self, conn: Any) -> bool:
        """Dialler: open a stream of :data:`CHOICE_PROTOCOL_ID` on ``conn`` (the one we keep)."""
        try:
            with trio.fail_after(UPGRADE_TIMEOUT_S):
                stream = await conn.new_stream()
                try:
                    await MultiselectClient().select_one_of(
                        [CHOICE_PROTOCOL_ID], MultiselectCommunicator(stream))
                    await stream.write(b"\x01")
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
            return True
        except Exception as exc:
            log.debug("birthday punch: naming the connection failed: %r", exc)
            return False

    async def _handle_choice(self, stream: INetStream) -> None:
        """Listener: the dialler keeps the connection this stream came on."""
        try:
            peer = stream.muxed_conn.peer_id
            waiter = self._choice_waiters.get(peer)
            if waiter is not None and not waiter[0].is_set():
                waiter[1].append(stream.muxed_conn)
                waiter[0].set()
        finally:
            await close_quietly(stream)

    async def _upgrade(self, peer: ID, sock: trio.socket.SocketType, dialler: bool) -> Any:
        """Noise + yamux on a connected socket: as the dialler (hard side) or the listener."""
        network = self.host.get_network()
        raw = _raw(sock, dialler)
        try:
            with trio.fail_after(UPGRADE_TIMEOUT_S):
                if dialler:
                    return await network.upgrade_outbound_raw_conn(raw, peer)
                ip, port = sock.getpeername()[:2]
                muxed = await network.upgrade_inbound_raw_conn(
                    raw, multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}"))
                if getattr(muxed, "peer_id", None) != peer:
                    with trio.move_on_after(2):
                        await muxed.close()
                    return None
                return swarm_conn_of(self.host, muxed)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                sock.close()
                raise
            log.debug("birthday punch upgrade with %s failed: %r", peer, exc)
            with trio.move_on_after(1):
                try:
                    await raw.close()
                except Exception:
                    pass
            return None


__all__ = ["BirthdayConfig", "BirthdayPunch", "PROTOCOL_ID", "PRESERVING", "REWRITING",
           "UNKNOWN", "PunchRefused", "decide", "parse_plan", "port_mapping"]
