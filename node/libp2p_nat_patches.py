"""Fixes for py-libp2p 0.8.1's AutoNAT and circuit relay v2 (issue 15), in the style of
:mod:`node.libp2p_patches`: subclasses of py-libp2p's classes, used only by our hosts
(:mod:`node.reachability` builds them), each written so that it could go upstream.

What py-libp2p 0.8.1 ships for NAT traversal, as measured on the NAT test topology
(tests/nat/topology.py: homes behind Linux MASQUERADE routers, one public namespace):

* Circuit relay v2 (``libp2p/relay/circuit_v2``): RESERVE, CONNECT and STOP work across NAT: a
  renter behind one NAT opened a stream to a provider behind another through a public relay,
  first reply 0.2-0.7 s after the dial. Swarm ``dial_peer`` skips ``/p2p-circuit`` addresses,
  so a circuit address must be dialled through ``CircuitV2Transport.dial`` (node.reachability
  does). The transport with the CLIENT role takes a reservation on the relay at *every* dial
  (so a renter would use up relay slots); we give it the STOP role only and reserve ourselves.
  Bugs fixed here (:class:`GuardedRelay`): see its docstring.
* DCUtR (``relay/circuit_v2/dcutr.py``): works over TCP between two endpoint-independent NATs
  (simultaneous open from the listen port, addresses predicted as observed WAN IP + listen port);
  it fails, as NAT theory says it must, when either side maps each connection to a random port
  (Linux conntrack also filters by address and port). It needs the router to *drop* unsolicited
  SYNs: a router that answers them with a RST tears down the peer's fresh mapping. New streams
  take the direct connection; the relayed one is closed after a grace period. Upstream has
  nothing for a port-rewriting NAT; node/birthday_punch.py adds the birthday punch (one side
  keeps ports, the other rewrites them), written as a separate protocol that could go upstream.
* AutoNAT v1 (``host/autonat``): the client and the server exchange messages correctly, but
  (1) the server's dial-back calls ``host.connect``, which returns at once when the requester is
  already connected, and the requester always is (it asked over that connection): every node
  was told it is public. :class:`DialBackAutoNAT` dials a fresh connection. (2) The client
  advertises ``host.get_addrs()``, which for a node listening on 0.0.0.0 is only the wildcard:
  every server refuses it (not based on the observed IP); node.reachability advertises the
  candidates itself. (3) The server does not check that the peer id to dial back is the
  requester's (the observed-IP filter still bounds what it dials). (4) There is no reachability
  service: nothing runs the client, re-checks, or acts on the answer.
* Identify's observed addresses: recorded by ``ObservedAddrManager``, but only reported by
  ``host.get_addrs()`` after 4 distinct observer groups (/16s) agree; with fewer peers (one
  relay) nothing appears. DCUtR reads them with ``min_observers=1``, and so do we. The observed
  port belongs to an outbound socket; only with a port-preserving NAT and the listen port does
  it predict a dialable address.
* Limited (relayed) connections: py-libp2p opens any stream on any connection, a
  ``/p2p-circuit`` one included, and its pubsub opens its stream to every newly connected peer
  (``Pubsub.handle_peer_queue`` -> ``_handle_new_peer`` -> ``host.new_stream``, on each
  ``connected`` notification): offer gossip between two peers joined only through a relay used
  up the relay's byte limit per circuit, and the rental on that circuit died with it. go-libp2p
  marks relayed connections "limited" and opens a stream on one only for a protocol that opts in
  (``network.WithAllowLimitedConn``; gossipsub does not). :func:`limit_relayed_connections`
  does the same for our hosts, in both directions (tests/nat/test_limited_conns.py: a gossip
  flood left 5.4 kB on a rental's circuit; without the patch 170 kB, and the relay reset it).
* Kademlia DHT (``libp2p/kad_dht``) and gossipsub peer exchange: measured, not used; why, and
  what they lack, in :mod:`node.discovery`. ``CircuitV2Transport.dial`` drops the ``Limit`` of
  the relay's CONNECT answer: :meth:`node.reachability.Reachability.dial_circuit` keeps it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect import Multiselect
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.tools.constants import MAX_READ_LEN
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT_S = 5.0
MAX_DIAL_BACK_ADDRS = 4


def remote_ip(stream: INetStream) -> str | None:
    try:
        remote = stream.get_remote_address()
    except Exception:
        return None
    return str(remote[0]) if remote else None


class DialBackAutoNAT(AutoNATService):
    """AutoNAT v1 server that dials back on a new connection.

    Upstream bug (py-libp2p 0.8.1, ``host/autonat/autonat.py``): ``_try_dial`` calls
    ``host.connect(PeerInfo(peer, [addr]))``, which returns without dialling when a connection
    to ``peer`` exists, and the requester is always connected (it asked over that connection),
    so every requester was told OK (public), NAT or not. go-libp2p dials back from a separate
    host for this reason. Fix: ``swarm.dial_addr`` (a new TCP connection from an ephemeral port,
    never the existing one), closed again at once; each address under its own timeout and at
    most :data:`MAX_DIAL_BACK_ADDRS` of them; one dial-back at a time per requester.
    """

    def __init__(self, host: IHost, dial_timeout: float = DIAL_BACK_TIMEOUT_S) -> None:
        super().__init__(host, serve=True)  # type: ignore[arg-type]
        self.dial_timeout = dial_timeout
        self._dialling: set[ID] = set()

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        if peer_id in self._dialling:
            return None
        self._dialling.add(peer_id)
        try:
            network = self.host.get_network()
            for raw in addrs[:MAX_DIAL_BACK_ADDRS]:
                try:
                    with trio.fail_after(self.dial_timeout):
                        conn = await network.dial_addr(Multiaddr(raw), peer_id)
                except Exception as exc:
                    log.debug("AutoNAT dial-back to %s failed: %r", peer_id, exc)
                    continue
                with trio.move_on_after(2):
                    try:
                        await conn.close()
                    except Exception:
                        pass
                return bytes(raw)
            return None
        finally:
            self._dialling.discard(peer_id)


@dataclass(frozen=True)
class RelayGuardLimits:
    max_reservations_per_ip: int = 8
    max_circuits: int = 256
    max_circuits_per_peer: int = 8


class GuardedRelay(CircuitV2Protocol):
    """Circuit relay v2 whose limits hold against a peer trying to exceed them.

    Upstream bugs (py-libp2p 0.8.1, ``relay/circuit_v2/protocol.py`` and ``resources.py``):

    1. RESERVE takes the peer id from the message (``msg.peer``) when present, so one peer could
       reserve for any number of made-up peer ids and fill the reservation table (the limit is
       global: ``max_reservations``). Spec: the reservation is for the connection's peer. Fix:
       the field is cleared before the request is handled.
    2. Reservations of peers that have disconnected keep their slot until the TTL (an hour), so
       new peer ids (free) reserving and leaving fill the table. Spec: a reservation lives as
       long as the connection. Fix: those are dropped before a new one is counted; and at most
       ``max_reservations_per_ip`` live reservations come from one IP address.
    3. Only the destination's circuits were limited (per reservation); a source could open any
       number of circuits. Fix: at most ``max_circuits_per_peer`` open circuits per peer, as
       source or destination, and ``max_circuits`` in all; over that: RESOURCE_LIMIT_EXCEEDED.
    4. The duration limit was checked only when data arrived: an idle circuit outlived it.
       Fix: the whole circuit runs under a deadline, after which both streams are reset.
    5. Circuit bookkeeping (``_active_relays``) was keyed by peer id, and the end of one circuit
       closed the streams stored under that key, those of another circuit of the same peer.
       Fix: each circuit closes its own two streams. Reads failing on a yamux stream (not an
       mplex one) were also retried three times with sleeps and logged at ERROR.
    The hop handler is registered only while :attr:`serving` (``set_serving``).
    """

    def __init__(self, host: IHost, limits: RelayLimits, guard: RelayGuardLimits,
                 counters: Counter[str]) -> None:
        super().__init__(host, limits, allow_hop=False)  # hop handler: set_serving()
        self.guard = guard
        self.counters = counters
        self.serving = False
        self.circuits = 0
        self.circuits_by_peer: Counter[ID] = Counter()
        self._reservation_ip: dict[ID, str | None] = {}
        # each circuit's cancel scope, by id() of its source stream: either direction ending
        # ends the other (a read on a yamux stream we reset ourselves is not woken)
        self._circuit_scopes: dict[int, trio.CancelScope] = {}

    def set_serving(self, on: bool) -> None:
        if on == self.serving:
            return
        self.serving = on
        if on:
            self.host.set_stream_handler(HOP_PROTOCOL_ID, self._handle_hop_stream)
        else:
            self.host.remove_stream_handler(HOP_PROTOCOL_ID)
        log.info("circuit relay service %s", "on" if on else "off")

    # -- reservations -------------------------------------------------------------------------

    def _drop_disconnected(self) -> None:
        rm = self.resource_manager
        rm._clean_expired()
        for peer in list(rm._reservations):
            if not rm._is_peer_connected(peer):
                del rm._reservations[peer]
                self._reservation_ip.pop(peer, None)
        for peer in list(self._reservation_ip):
            if peer not in rm._reservations:
                del self._reservation_ip[peer]

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        msg.ClearField("peer")  # (1) for the connection's own peer, never a named one
        self._drop_disconnected()  # (2)
        ip = remote_ip(stream)
        if peer not in self.resource_manager._reservations and ip is not None:
            same_ip = sum(1 for p, a in self._reservation_ip.items() if a == ip and p != peer)
            if same_ip >= self.guard.max_reservations_per_ip:
                self.counters["relay.reservation_refused"] += 1
                await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                        "too many reservations from this address")
                return
        # Counted from now on: py-libp2p answers, then sleeps 0.1 s before returning, and the
        # next RESERVE from this address may arrive meanwhile.
        self._reservation_ip[peer] = ip
        await super()._handle_reserve(stream, msg)
        if peer in self.resource_manager._reservations:
            self.counters["relay.reservations"] += 1
        else:
            self._reservation_ip.pop(peer, None)
            self.counters["relay.reservation_refused"] += 1

    # -- circuits -----------------------------------------------------------------------------

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        src = stream.muxed_conn.peer_id
        try:
            dst = ID(msg.peer.id)
        except Exception:
            await self._send_status(stream, StatusCode.MALFORMED_MESSAGE, "bad peer id")
            await stream.reset()
            return
        per_peer = self.guard.max_circuits_per_peer
        if (self.circuits >= self.guard.max_circuits or self.circuits_by_peer[src] >= per_peer
                or self.circuits_by_peer[dst] >= per_peer):  # (3)
            self.counters["relay.circuit_refused"] += 1
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                    "too many circuits")
            with trio.move_on_after(1):
                await stream.close()  # not reset: a reset can overtake the STATUS frame
            return
        self.circuits += 1
        self.circuits_by_peer[src] += 1
        self.circuits_by_peer[dst] += 1
        self.counters["relay.circuits"] += 1
        try:
            with trio.move_on_after(self.limits.duration) as circuit:  # (4)
                self._circuit_scopes[id(stream)] = circuit
                await super()._handle_connect(stream, msg)
            if circuit.cancelled_caught and trio.current_time() >= circuit.deadline:
                self.counters["relay.circuit_expired"] += 1
                with trio.move_on_after(1):
                    await stream.reset()
        finally:
            self._circuit_scopes.pop(id(stream), None)
            self.circuits -= 1
            for peer in (src, dst):
                self.circuits_by_peer[peer] -= 1
                if self.circuits_by_peer[peer] <= 0:
                    del self.circuits_by_peer[peer]
                self._active_relays.pop(peer, None)

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        """Copy one direction until EOF, an error or the byte budget; then reset both streams
        of this circuit (5). The duration is enforced around the whole circuit (4)."""
        try:
            while True:
                try:
                    data = await src_stream.read(MAX_READ_LEN)
                except Exception:
                    break
                if not data:
                    break
                self.counters["relay.circuit_bytes"] += len(data)  # forwarded or not
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        self.counters["relay.circuit_bytes_exceeded"] += 1
                        break
                    circuit_data_limit[0] -= len(data)
                try:
                    with trio.fail_after(self.write_timeout):
                        await dst_stream.write(data)
                except Exception:
                    break
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for s in (src_stream, dst_stream):
                    try:
                        await s.reset()
                    except Exception:
                        pass
            circuit = (self._circuit_scopes.get(id(src_stream))
                       or self._circuit_scopes.get(id(dst_stream)))
            if circuit is not None:
                circuit.cancel()  # the other direction


# --------------------------------------------------------------------------------------------
# Limited connections: only the protocols that opt in run over a relay
# --------------------------------------------------------------------------------------------

_LIMITED_MARK = "_gpumarket_limited_conns"


class LimitedConnectionError(Exception):
    """A stream for a protocol that may not use a relayed connection, to a peer we are connected
    to only through relays. Deliberately not a ``SwarmException``: py-libp2p's pubsub retries
    those for as long as the peer stays connected (``_handle_new_peer_with_retry``); this one it
    does not retry, and a later direct connection (a hole punch) notifies it afresh."""


def is_limited_conn(conn: Any) -> bool:
    """A relayed (``/p2p-circuit``) connection: by its type, or by its transport addresses (the
    type stays UNKNOWN on some paths of py-libp2p 0.8.1)."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:
        pass
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def direct_peers(network: Any) -> list[ID]:
    """Peers with at least one connection that is not relayed (:func:`is_limited_conn`)."""
    return [peer for peer, conns in list(network.connections.items())
            if any(not is_limited_conn(c) for c in (conns if isinstance(conns, list) else [conns]))]


def swarm_conn_of(host: IHost, muxed: Any) -> Any:
    """The swarm connection (of ``network.connections``) that carries ``muxed``, or None."""
    for c in host.get_network().connections.get(getattr(muxed, "peer_id", None), []):
        if getattr(c, "muxed_conn", None) is muxed:
            return c
    return None


def _stream_conn(host: IHost, stream: Any) -> Any:
    conn = getattr(stream, "swarm_conn", None)
    if conn is not None:
        return conn
    return swarm_conn_of(host, getattr(stream, "muxed_conn", None))


class LimitedConnMultiselect(Multiselect):
    """The host's inbound protocol selection (``BasicHost.multiselect``, moved onto this class):
    a stream negotiated on a relayed connection for a protocol not in :attr:`allowed_on_limited`
    gets a handler that counts it and resets the stream, instead of the protocol's handler."""

    allowed_on_limited: frozenset[str]
    limited_host: IHost
    limited_counters: Counter[str]

    async def negotiate(self, communicator: Any, negotiate_timeout: int = 5) -> Any:
        protocol, handler = await super().negotiate(communicator, negotiate_timeout)
        if protocol is None or handler is None or str(protocol) in self.allowed_on_limited:
            return protocol, handler
        stream = getattr(communicator, "read_writer", None)
        conn = _stream_conn(self.limited_host, stream)
        if conn is None or not is_limited_conn(conn):
            return protocol, handler
        counters = self.limited_counters

        async def refuse(net_stream: INetStream) -> None:
            counters["nat.limited_conn.refused_inbound"] += 1
            log.debug("inbound %s stream from %s on a relayed connection: reset", protocol,
                      getattr(getattr(net_stream, "muxed_conn", None), "peer_id", "?"))
            with trio.move_on_after(1):
                try:
                    await net_stream.reset()
                except Exception:
                    pass

        return protocol, refuse


def limit_relayed_connections(host: IHost, allowed: Iterable[str], counters: Counter[str]) -> None:
    """Make relayed connections *limited*, as go-libp2p does: a stream runs on one only for a
    protocol in ``allowed``, in either direction.

    Upstream (py-libp2p 0.8.1): no notion of a limited connection; ``host.new_stream`` takes
    the swarm's "best" connection (direct preferred, but a relayed one when that is all there
    is, or when opening on the direct one fails), and every inbound stream is served.
    Why it matters: pubsub opens its stream to every peer on connect; over a relayed connection
    the offer gossip of a busy market (170 offers/s x 750 B) uses up a relay's 64 MiB per
    circuit in minutes, and the rental riding that circuit is cut off.
    Fix: outbound, ``host.new_stream`` for protocols not all in ``allowed`` raises
    :class:`LimitedConnectionError` when every live connection to the peer is relayed, and a
    stream that still lands on a relayed connection (the swarm's fallback) is reset and the same
    error raised; inbound, :class:`LimitedConnMultiselect`. Counted in ``counters``
    (``nat.limited_conn.refused_outbound``, ``nat.limited_conn.refused_inbound``).
    Upstream fix: a per-call opt-in (go's ``WithAllowLimitedConn``) checked in
    ``Swarm.new_stream`` and in ``BasicHost._swarm_stream_handler``. Idempotent; a later call
    replaces the allowed set, for both directions."""
    allowed_set = frozenset(str(p) for p in allowed)
    multiselect = host.multiselect  # type: ignore[attr-defined]
    if type(multiselect) is Multiselect:
        multiselect.__class__ = LimitedConnMultiselect
    elif not isinstance(multiselect, LimitedConnMultiselect):
        raise TypeError(f"cannot limit a {type(multiselect).__name__}: expected Multiselect")
    multiselect.allowed_on_limited = allowed_set
    multiselect.limited_host = host
    multiselect.limited_counters = counters
    if getattr(host.new_stream, _LIMITED_MARK, False):
        return
    inner = host.new_stream

    def refused(peer_id: ID, protocol_ids: Sequence[str]) -> LimitedConnectionError:
        counters["nat.limited_conn.refused_outbound"] += 1
        return LimitedConnectionError(
            f"{peer_id} is reached only through a relay; {', '.join(map(str, protocol_ids))} "
            "may not use a relayed connection")

    async def new_stream(peer_id: ID, protocol_ids: Sequence[Any]) -> INetStream:
        if all(str(p) in multiselect.allowed_on_limited for p in protocol_ids):
            return await inner(peer_id, protocol_ids)
        conns = [c for c in host.get_network().connections.get(peer_id, [])
                 if not getattr(c, "is_closed", False)]
        if conns and all(is_limited_conn(c) for c in conns):
            raise refused(peer_id, protocol_ids)
        stream = await inner(peer_id, protocol_ids)
        conn = _stream_conn(host, stream)
        if conn is not None and is_limited_conn(conn):
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
            raise refused(peer_id, protocol_ids)
        return stream

    setattr(new_stream, _LIMITED_MARK, True)
    host.new_stream = new_stream  # type: ignore[method-assign]


__all__ = ["DialBackAutoNAT", "GuardedRelay", "LimitedConnMultiselect", "LimitedConnectionError",
           "RelayGuardLimits", "is_limited_conn", "limit_relayed_connections", "remote_ip",
           "swarm_conn_of"]
