"""Being reachable from anywhere (issue 15): AutoNAT, circuit relay v2 and DCUtR on our host.

What a node does (specs/node.md, "Reachability"):

* It learns whether it is publicly dialable: it asks up to ``autonat_servers`` peers it is
  directly connected to for an AutoNAT v1 dial-back to its candidate addresses, which are its
  non-wildcard public listen addresses plus, for each external IP that identify reports peers
  saw it at, that IP with its TCP listen port (NATs that keep ports map the listen port there).
  The majority of the answers decides PUBLIC or PRIVATE; refusals and errors are not answers.
  It asks again every ``autonat_interval_s``, as soon as the first direct peer connects while
  the answer is UNKNOWN, and whenever its candidate addresses change.
* While PUBLIC (``relay_service = "auto"``, the default) or always (``"on"``) it serves circuit
  relay v2 with the limits of :class:`ReachabilityConfig`, announced in each reservation and
  CONNECT answer (the relay v2 ``Limit``: seconds and bytes per circuit) and enforced by
  :class:`node.libp2p_patches.GuardedRelay`.
* While PRIVATE, and only if it must be dialled (:attr:`Reachability.wants_inbound`: a node
  that publishes offers; a renter only dials out and takes no relay slot), it keeps
  reservations on up to ``relays_to_reserve`` directly connected peers that accept one and offers ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`` addresses
  (:attr:`Reachability.circuit_addrs`); a reservation is renewed before it expires and dropped
  with its relay's connection.
* It answers DCUtR on every connection and, when a relayed connection to a peer appears, tries
  to upgrade it to a direct one (py-libp2p's ``DCUtRProtocol``, TCP simultaneous open from the
  listen port). New streams then take the direct connection; the relayed one is closed after a
  grace period. When one side's NAT keeps ports and the other's rewrites them (symmetric),
  DCUtR cannot work and the birthday punch (node/birthday_punch.py) is run instead.

The AutoNAT server is :class:`node.libp2p_patches.DialBackAutoNAT` (a fresh connection for each
dial-back: py-libp2p reused the existing one and so told every node it was public).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig as Libp2pRelayConfig
from libp2p.relay.circuit_v2.config import RelayRole
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from node.birthday_punch import BirthdayConfig, BirthdayPunch
from node.libp2p_nat_patches import (
    DialBackAutoNAT, GuardedRelay, RelayGuardLimits, is_limited_conn, limit_relayed_connections,
)
from node.ratelimit import PerKeyInterval
from protocol.messages import Heartbeat, UsageReceipt

log = logging.getLogger(__name__)

AUTONAT_QUERY_TIMEOUT_S = 15.0
HOLE_PUNCH_RETRY_S = 300.0  # a peer still reached only through a relay is tried again after this

# The only protocols whose streams may run over a relayed (limited) connection, either way
# (specs/node.md, "Reachability", item 6): the rental's own (node/negotiate.py, node/rentals.py,
# node/access.py; tests/nat/test_limited_conns.py checks the names against those modules) and
# what a hole punch needs. Pubsub, offer sync, discovery and everything else use direct
# connections only, so gossip never spends a relay's bytes per circuit.
RELAYED_CONN_PROTOCOLS = frozenset({
    "/gpumarket/negotiate/1", "/gpumarket/rental/1",
    "/gpumarket/exec/1", "/gpumarket/forward/1", "/gpumarket/cp/1",
    "/libp2p/dcutr", "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0",
    "/gpumarket/punch/birthday/1.0.0",  # the birthday punch's plan runs over the relay
})


class QuietDCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR without its auto-drive loop (every 2 s it started a hole punch to
    every relayed peer, from both ends at once); :class:`Reachability` decides who starts."""

    async def _auto_drive_loop(self) -> None:
        return


class Reachable(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True)
class ReachabilityConfig:
    """The ``[node.relay]`` keys (node/config.py) with their defaults."""

    relay_service: str = "auto"  # "auto": serve relay v2 while PUBLIC; "on"; "off"
    max_reservations: int = 128  # reservations held for others at once
    max_reservations_per_ip: int = 8  # from one remote IP address
    max_circuits: int = 256  # relayed connections through us at once
    max_circuits_per_peer: int = 8  # at once, per peer, as source or as destination
    circuit_max_seconds: int = 3600  # each relayed connection is reset after this long
    circuit_max_bytes: int = 64 << 20  # and after this many bytes (both directions together)
    reservation_ttl_s: int = 3600
    relays_to_reserve: int = 2  # while PRIVATE: reservations we keep on other nodes
    autonat_servers: int = 3  # peers asked for a dial-back per check
    autonat_interval_s: float = 60.0
    hole_punch: bool = True  # try DCUtR on relayed connections
    # the birthday punch through a port-rewriting NAT (node/birthday_punch.py)
    hard_nat_punch: bool = True
    hard_nat_sockets: int = 256  # connections the port-rewriting side opens
    hard_nat_probes: int = 1024  # ports the port-preserving side tries
    hard_nat_window_s: float = 4.0
    hard_nat_runs_per_minute: float = 4.0  # all peers together; one per peer per 300 s

    def __post_init__(self) -> None:
        if self.relay_service not in ("auto", "on", "off"):
            raise ValueError(f"relay_service {self.relay_service!r}: one of auto, on, off")
        for key in ("max_reservations", "max_reservations_per_ip", "max_circuits",
                    "max_circuits_per_peer", "circuit_max_seconds", "circuit_max_bytes",
                    "reservation_ttl_s", "autonat_servers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")
        if self.relays_to_reserve < 0 or self.autonat_interval_s <= 0:
            raise ValueError("relays_to_reserve must be >= 0 and autonat_interval_s > 0")
        self.birthday_config()  # its own checks

    def birthday_config(self) -> BirthdayConfig:
        return BirthdayConfig(sockets=self.hard_nat_sockets, probes=self.hard_nat_probes,
                              window_s=self.hard_nat_window_s, min_interval_s=HOLE_PUNCH_RETRY_S,
                              runs_per_minute=self.hard_nat_runs_per_minute)

    def guard_limits(self) -> RelayGuardLimits:
        return RelayGuardLimits(max_reservations_per_ip=self.max_reservations_per_ip,
                                max_circuits=self.max_circuits,
                                max_circuits_per_peer=self.max_circuits_per_peer)

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_max_seconds, data=self.circuit_max_bytes,
                           max_circuit_conns=self.max_circuits_per_peer,
                           max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl_s)


def is_public_ip(ip: str) -> bool:
    """Globally routable, or in 198.18.0.0/15 (RFC 2544: the address block of our NAT test
    lab stands for the internet there; nothing real uses it)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 4 and addr in ipaddress.ip_network("198.18.0.0/15"):
        return True
    return addr.is_global


def _ip_port(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    try:
        return str(addr.value_for_protocol("ip4")), int(addr.value_for_protocol("tcp"))
    except Exception:
        return None


def is_relayed(conn: object) -> bool:
    """A ``/p2p-circuit`` connection: the one test the node uses, the limited-connection
    patch's (by type or by address), so that what it limits is what we count as relayed."""
    return is_limited_conn(conn)


@dataclass(frozen=True)
class CircuitLimit:
    """What a relay published in its CONNECT answer (relay v2 ``Limit``) for one circuit we
    dialled; 0: no limit published."""

    relay: ID
    duration_s: int
    data_bytes: int
    opened_at: float  # trio.current_time() when the circuit opened


# A rental over a relayed connection: per heartbeat interval one Heartbeat frame and one
# UsageReceipt frame at their maximum wire sizes, plus framing (length prefix, yamux header,
# Noise tag, window updates); plus the negotiation, AccessGrant, identify and pubsub hellos once.
HEARTBEAT_ROUND_BYTES = Heartbeat.MAX_SIZE + UsageReceipt.MAX_SIZE + 256
RENTAL_SETUP_BYTES = 64 << 10
RENTAL_SLACK_S = 60  # negotiation, escrow confirmation, the final heartbeat and receipt


def rental_needs(duration_s: int, heartbeat_interval_s: int) -> tuple[int, int]:
    """(seconds, bytes) one circuit must carry for a rental of ``duration_s``."""
    interval = max(1, heartbeat_interval_s)
    seconds = duration_s + 2 * interval + RENTAL_SLACK_S
    return seconds, RENTAL_SETUP_BYTES + (duration_s // interval + 2) * HEARTBEAT_ROUND_BYTES


@dataclass
class _Reservation:
    relay: ID
    circuit_addr: str
    expires_at: float  # trio.current_time()


class Reachability:
    """AutoNAT client and server, relay v2 (hop, stop, client) and DCUtR for one host."""

    def __init__(self, host: IHost, config: ReachabilityConfig, counters: Counter[str],
                 on_change: Callable[[], None] | None = None) -> None:
        self.host = host
        self.config = config
        self.counters = counters
        self.status = Reachable.UNKNOWN
        self.on_change = on_change or (lambda: None)
        limit_relayed_connections(host, RELAYED_CONN_PROTOCOLS, counters)
        self.autonat = DialBackAutoNAT(host)
        self.relay = GuardedRelay(host, config.relay_limits(), config.guard_limits(), counters)
        # STOP only: dialling through a relay must not take a reservation there (py-libp2p's
        # transport reserves on every dial when the CLIENT role is set); we reserve ourselves.
        self.transport = CircuitV2Transport(host, self.relay, Libp2pRelayConfig(roles=RelayRole.STOP))
        self.dcutr = QuietDCUtR(host) if config.hole_punch else None
        self.birthday = (BirthdayPunch(host, config.birthday_config(), counters, is_public_ip,
                                       self.candidate_addrs, self.relayed_only)
                         if config.hole_punch and config.hard_nat_punch else None)
        self._punched = PerKeyInterval(HOLE_PUNCH_RETRY_S)  # when we last tried a hole punch
        self.reservations: dict[ID, _Reservation] = {}
        self.circuit_limits: dict[ID, CircuitLimit] = {}  # peer -> its circuit we dialled
        self.last_answers: dict[str, int] = {}  # peer -> AutoNAT status of its last answer
        self._wake = trio.Event()
        self._candidates: tuple[str, ...] = ()
        # Whether others must be able to dial us (node.node sets it: a provider publishing
        # offers); without it no reservation is taken, as dialling out needs none.
        self.wants_inbound: Callable[[], bool] = lambda: True

    # -- what others read ---------------------------------------------------------------------

    @property
    def serving_relay(self) -> bool:
        return self.relay.serving

    @property
    def circuit_addrs(self) -> list[str]:
        now = trio.current_time()
        return [r.circuit_addr for r in self.reservations.values() if r.expires_at > now]

    def summary(self) -> dict:
        """For `gpumarket status`."""
        direct, relayed = self._peers_by_path()
        return {"reachability": self.status.value, "relay_service": self.serving_relay,
                "relays": [str(p) for p in self.reservations], "circuit_addrs": self.circuit_addrs,
                "direct_peers": len(direct), "relayed_only_peers": len(relayed),
                "hole_punches": {"ok": self.counters["nat.hole_punch_ok"],
                                 "failed": self.counters["nat.hole_punch_failed"]}}

    def poke(self) -> None:
        """Check again soon (a new peer, a new address)."""
        self._wake.set()

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.birthday is not None:
            self.birthday.attach()
        async with background_trio_service(self.relay), trio.open_nursery() as nursery:
            self._apply_relay_service()
            if self.dcutr is not None:
                async with background_trio_service(self.dcutr):
                    task_status.started()
                    await self._loop(nursery)
            else:
                task_status.started()
                await self._loop(nursery)

    async def _loop(self, nursery: trio.Nursery) -> None:
        next_check = trio.current_time()
        while True:
            self._start_hole_punches(nursery)
            now = trio.current_time()
            candidates = tuple(sorted(self.candidate_addrs()))
            direct = self._direct_peers()
            due = now >= next_check or candidates != self._candidates or (
                self.status is Reachable.UNKNOWN and direct)
            if due and direct:
                self._candidates = candidates
                await self.check(direct)
                next_check = trio.current_time() + self.config.autonat_interval_s
            if self.status is not Reachable.PUBLIC:
                await self._keep_reservations(direct)
            with trio.move_on_after(2.0 if self.status is Reachable.UNKNOWN else 5.0):
                await self._wake.wait()
            self._wake = trio.Event()

    def _peers_by_path(self) -> tuple[list[ID], list[ID]]:
        """(peers with a direct connection, peers reached only through a relay)."""
        direct, relayed = [], []
        for peer, conns in list(self.host.get_network().connections.items()):
            conns = [c for c in (conns if isinstance(conns, list) else [conns])
                     if not getattr(c, "is_closed", False)]
            if any(not is_relayed(c) for c in conns):
                direct.append(peer)
            elif conns:
                relayed.append(peer)
        return direct, relayed

    def _direct_peers(self) -> list[ID]:
        return self._peers_by_path()[0]

    # -- hole punching ------------------------------------------------------------------------

    def _start_hole_punches(self, nursery: trio.Nursery) -> None:
        """For each peer reached only through a relay, try DCUtR once per
        ``HOLE_PUNCH_RETRY_S``. Of the two ends only the one with the smaller peer id starts it
        (py-libp2p's own loop drove it from both ends at once, and the two sessions collided)."""
        if self.dcutr is None:
            return
        now = trio.current_time()
        me = self.host.get_id().to_bytes()
        for peer in self._peers_by_path()[1]:
            if peer.to_bytes() > me or not self._punched.due(peer, now):
                continue
            self._punched.ran(peer, now)
            nursery.start_soon(self._hole_punch, peer)

    async def punch(self, peer: ID) -> bool:
        """Upgrade a relayed connection to ``peer`` to a direct one: the birthday punch when one
        side's NAT keeps ports and the other's rewrites them (the peer says which in its plan),
        else DCUtR. True: a direct connection exists afterwards."""
        assert self.dcutr is not None
        if self.birthday is not None:
            ran = await self.birthday.initiate(peer)
            if ran is not None:
                if ran:
                    self.dcutr._schedule_relay_close(peer)
                return ran
        return await self.dcutr.initiate_hole_punch(peer)

    async def _hole_punch(self, peer: ID) -> None:
        assert self.dcutr is not None
        t0 = trio.current_time()
        try:
            with trio.fail_after(60):
                ok = await self.punch(peer)
        except Exception as exc:
            log.info("hole punch to %s raised %r", peer, exc)
            ok = False
        self.counters["nat.hole_punch_ok" if ok else "nat.hole_punch_failed"] += 1
        log.info("hole punch to %s: %s after %.2f s", peer, "direct" if ok else "failed",
                 trio.current_time() - t0)

    # -- AutoNAT client -----------------------------------------------------------------------

    def candidate_addrs(self) -> list[str]:
        """Where we might be dialable: public listen addresses, and each external IP identify
        saw us at with our TCP listen port (the observed port belongs to an outbound socket)."""
        listen = [a for a in self.host.get_transport_addrs() if _ip_port(a)]
        ports = sorted({_ip_port(a)[1] for a in listen})  # type: ignore[index]
        out = {str(a) for a in listen
               if _ip_port(a)[0] != "0.0.0.0" and is_public_ip(_ip_port(a)[0])}  # type: ignore[index]
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            for observed in manager.addrs(min_observers=1):
                ip_port = _ip_port(observed)
                if ip_port and is_public_ip(ip_port[0]):
                    out.update(f"/ip4/{ip_port[0]}/tcp/{port}" for port in ports)
        return sorted(out)

    async def check(self, peers: list[ID]) -> Reachable:
        """Ask up to ``autonat_servers`` of ``peers`` (in parallel) to dial us back."""
        candidates = [multiaddr.Multiaddr(a).to_bytes() for a in self.candidate_addrs()]
        answers: dict[str, int] = {}

        async def ask(peer: ID) -> None:
            try:
                status, _ = await self.autonat.query_server(peer, candidates,
                                                            timeout=AUTONAT_QUERY_TIMEOUT_S)
                answers[str(peer)] = status
            except Exception as exc:
                log.debug("AutoNAT query to %s failed: %r", peer, exc)

        if candidates:
            async with trio.open_nursery() as nursery:
                for peer in peers[: self.config.autonat_servers]:
                    nursery.start_soon(ask, peer)
        self.last_answers = answers
        ok = sum(1 for s in answers.values() if s == AutoNATMessage.OK)
        failed = sum(1 for s in answers.values() if s == AutoNATMessage.E_DIAL_ERROR)
        if not candidates:
            new = Reachable.PRIVATE  # nothing anyone could dial: no public address at all
        elif ok > failed:
            new = Reachable.PUBLIC
        elif failed > ok:
            new = Reachable.PRIVATE
        else:
            new = self.status  # no answers (or a tie): keep what we knew
        self.counters["nat.autonat_checks"] += 1
        if new is not self.status:
            log.info("reachability: %s -> %s (answers %s, candidates %s)", self.status.value,
                     new.value, answers, self.candidate_addrs())
            self.status = new
            self._apply_relay_service()
            if new is Reachable.PUBLIC:
                self.reservations.clear()
            self.on_change()
        return new

    def _apply_relay_service(self) -> None:
        mode = self.config.relay_service
        self.relay.set_serving(mode == "on" or (mode == "auto" and self.status is Reachable.PUBLIC))

    # -- relay client -------------------------------------------------------------------------

    async def _keep_reservations(self, direct: list[ID]) -> None:
        if self.status is not Reachable.PRIVATE:
            return
        if not self.wants_inbound():
            if self.reservations:  # (a provider that stopped offering) let them lapse
                self.reservations.clear()
                self.on_change()
            return
        now = trio.current_time()
        before = set(self.circuit_addrs)
        for relay in list(self.reservations):
            if relay not in direct:
                del self.reservations[relay]  # a reservation lives as long as the connection
        renew = [r for r, res in self.reservations.items()
                 if res.expires_at - now < self.config.reservation_ttl_s * 0.2]
        wanted = self.config.relays_to_reserve - len(self.reservations)
        # only a peer at a public address can relay for us (on a LAN or loopback: nobody)
        fresh = [p for p in direct if p not in self.reservations
                 and (a := self._remote_addr(p)) is not None
                 and is_public_ip(a.split("/")[2])][: max(0, wanted) + 2]
        for relay in renew + fresh:
            if relay in fresh and len(self.reservations) >= self.config.relays_to_reserve:
                break
            await self.reserve(relay)
        if set(self.circuit_addrs) != before:
            self.on_change()

    async def reserve(self, relay: ID) -> bool:
        """One RESERVE on ``relay`` (a fresh stream); records the circuit address on success."""
        base = self._remote_addr(relay)
        if base is None:
            return False
        try:
            with trio.fail_after(10):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
                try:
                    ok = await self.transport._make_reservation(stream, relay)
                finally:
                    await stream.close()
        except Exception as exc:
            log.debug("reservation on %s failed: %r", relay, exc)
            ok = False
        if not ok:
            self.counters["nat.reservation_refused"] += 1
            return False
        expire = self.transport._reservations.get(relay, 0)  # unix seconds, from the relay
        ttl = max(60.0, expire - time.time())
        addr = f"{base}/p2p/{relay}/p2p-circuit/p2p/{self.host.get_id()}"
        self.reservations[relay] = _Reservation(relay, addr, trio.current_time() + ttl)
        self.counters["nat.reservations"] += 1
        return True

    def _remote_addr(self, peer: ID) -> str | None:
        for conn in self.host.get_network().connections.get(peer, []):
            if is_relayed(conn):
                continue
            for addr in conn.get_transport_addresses():
                ip_port = _ip_port(addr)
                if ip_port:
                    return f"/ip4/{ip_port[0]}/tcp/{ip_port[1]}"
        return None

    # -- dialling -----------------------------------------------------------------------------

    async def dial_circuit(self, addr: multiaddr.Multiaddr) -> None:
        """Connect to a peer through the relay its circuit address names, and keep the limits
        the relay published for the circuit (:attr:`circuit_limits`).

        py-libp2p 0.8.1's ``CircuitV2Transport.dial`` reads the CONNECT answer's ``Limit`` and
        drops it, so nobody can tell whether a circuit will outlast what it is used for; this
        is its CONNECT path (HOP CONNECT on a fresh stream to the relay, STATUS, then the
        relayed stream upgraded as an outbound connection) keeping the limit."""
        relay_ma, dest = self.transport.parse_circuit_ma(addr)
        relay = ID.from_base58(relay_ma.get_peer_id())
        if relay not in self.host.get_network().connections:
            await self.host.connect(PeerInfo(relay, [relay_ma]))
        stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT,
                                                         peer=CircuitPeerId(id=dest.to_bytes())))
            with trio.fail_after(15):
                resp = await read_delimited_msg(stream, HopMessage)
            status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
            if status != StatusCode.OK:
                raise ConnectionError(f"relay {relay} refused the circuit: {status.name}")
            opened = trio.current_time()
            raw = RawConnection(stream=stream, initiator=True,
                                connection_type=ConnectionType.RELAYED,
                                addresses=[multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{dest}")])
            await self.host.upgrade_outbound_connection(raw, dest)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
            raise
        limit = resp.limit if resp.HasField("limit") else None
        connections = self.host.get_network().connections
        for peer in [p for p in self.circuit_limits if p not in connections]:
            del self.circuit_limits[peer]
        self.circuit_limits[dest] = CircuitLimit(relay, int(limit.duration) if limit else 0,
                                                 int(limit.data) if limit else 0, opened)
        self.counters["nat.circuit_dials"] += 1

    def relayed_only(self, peer: ID) -> bool:
        """Connected to ``peer``, and only through relays."""
        conns = [c for c in self.host.get_network().connections.get(peer, [])
                 if not getattr(c, "is_closed", False)]
        return bool(conns) and all(is_relayed(c) for c in conns)

    def relay_shortfall(self, peer: ID, duration_s: int, heartbeat_interval_s: int) -> str | None:
        """Why the relayed connection to ``peer`` cannot carry a rental of ``duration_s``
        (the relay's published seconds or bytes per circuit are too few), or None: a direct
        connection, no connection, a circuit we did not dial (limits unknown), or enough."""
        if not self.relayed_only(peer):
            return None
        limit = self.circuit_limits.get(peer)
        if limit is None:
            return None
        need_s, need_bytes = rental_needs(duration_s, heartbeat_interval_s)
        left_s = limit.duration_s - (trio.current_time() - limit.opened_at)
        short = []
        if limit.duration_s and left_s < need_s:
            short.append(f"{limit.duration_s} s per circuit ({left_s:.0f} s left on this one), "
                         f"the rental needs {need_s} s")
        if limit.data_bytes and limit.data_bytes < need_bytes:
            short.append(f"{limit.data_bytes} bytes per circuit, the rental needs about "
                         f"{need_bytes} bytes of heartbeats and receipts")
        if not short:
            return None
        return (f"reachable only through relay {limit.relay}, whose limits do not cover a "
                f"{duration_s} s rental: " + "; ".join(short))

    async def wait_direct(self, peer: ID, timeout: float) -> bool:
        """Try a hole punch to ``peer`` now (when hole punching is on) and wait up to
        ``timeout`` for a direct connection; returns whether there is one."""
        if self.dcutr is None:
            return not self.relayed_only(peer)
        self._punched.forget(peer)  # whichever end starts it, let it start now
        self.poke()
        with trio.move_on_after(timeout):
            while self.relayed_only(peer):
                await trio.sleep(0.2)
        return not self.relayed_only(peer)


__all__ = ["RELAYED_CONN_PROTOCOLS", "CircuitLimit", "Reachability", "ReachabilityConfig", "Reachable", "is_public_ip",
           "is_relayed", "rental_needs"]
