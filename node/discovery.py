"""Finding peers beyond the bootstrap list (issue 15): Kademlia FIND_NODE, bounded.

A node that knows one peer asks the peers it is directly connected to for the peers closest to a
key (its own peer id, then random keys), keeps the answers as *candidates* in memory, and dials a
few of them per round until it has ``target_peers`` direct connections. Peers it connected to are
stored by :class:`node.peer_table.PeerTable` (bounded, most recently seen), from which a node
restarted without its bootstrap list rejoins (specs/node.md, "Reachability", item 9).

Wire: the libp2p Kademlia DHT messages (``libp2p/kad_dht/pb/kademlia.proto``: ``Message`` of
type FIND_NODE, ``key``, answer ``closerPeers`` with ``id`` and ``addrs``), one varint-length-
prefixed request and answer per stream, on our own protocol id :data:`PROTOCOL_ID` (a market
DHT must not mix with the IPFS one).

Why not py-libp2p 0.8.1's ``KadDHT`` lookup, and why not gossipsub peer exchange. Measured by
tests/benchmarks/bench_discovery.py (N nodes on 127.0.0.1 in one process, each bootstrapped to one
seed; load average 9.8-9.9 on 2 cores shared with other work; seconds until every node knows /
is connected to >= k peers, bytes written on all TCP connections):

  =====================  =================================  ==================================
  N = 10, k = 4          known / connected (s), bytes        N = 16, k = 6
  =====================  =================================  ==================================
  this module            2.5 / 3.4, 27 kB (gossip incl.)     4.1 / 10.1, 55 kB (gossip incl.)
  KadDHT, self-lookup/2s 4.3 / 5.2, 195 kB                   21.0 / 7.5, 919 kB
  gossipsub PX           never (0 of 9 in 40 s)              never (0 of 15 in 30 s)
  =====================  =================================  ==================================

The DHT finds peers about as fast but for 4-17x the bytes (every lookup dials every peer it
hears of), and it is not safe to expose as it is:

* ``KadDHT`` ignores ``protocol_prefix`` and always speaks ``/ipfs/kad/1.0.0``.
* ``PeerRouting._query_peer_for_closest`` takes every ``closerPeers`` entry of an answer (up to
  the 4 MiB message limit: about 10,000 peers), puts each one's addresses into the peerstore
  unvalidated (private and loopback included, any count and length) and awaits
  ``routing_table.add_peer`` for each, which pings the oldest peer of a full bucket: one answer
  makes thousands of dials. The lookup then dials up to 10 of the returned peers at a time,
  and with fewer than 5 table entries it queries *every* peer in the peerstore.
* The server also stores PUT_VALUE and ADD_PROVIDER records of anyone; we need only FIND_NODE.
* Gossipsub PX (``do_px``): py-libp2p 0.8.1 puts PX peers only in a PRUNE sent on unsubscribe,
  on a GRAFT for a topic it does not have, or on a score-based swap; the heartbeat's PRUNE of an
  oversubscribed mesh (where the gossipsub v1.1 spec gives PX) carries none. With 10 nodes on one
  seed (degree 6, or a degree-0 "PX seed") no node learned a single peer in 30 s. ``_do_px``
  also dials the PX peers one after another inside the RPC read loop, without a timeout.

What a hostile peer can do, and the bounds here:

* Address spam / memory: an answer over :data:`MAX_ANSWER_BYTES` is dropped whole; at most
  ``max_peers_per_answer`` peers are read from one answer and ``max_addrs_per_peer`` addresses
  (each at most :data:`MAX_ADDR_BYTES` bytes, ``/ip4|ip6/<ip>/tcp/<port>[/p2p/<same id>]`` only)
  per peer; candidates are kept in memory only (``max_candidates``, at most
  ``max_peers_per_answer`` per answering peer), never written to the store.
* Dial amplification against a third party: at most ``dials_per_round`` new dials per round
  (``interval_s``, or ``short_interval_s`` while below ``target_peers``), each a single TCP
  attempt (the swarm's own dial retries 3 times), at most ``dials_per_ip_per_round`` (1) per IP
  address per round, a failed peer is not dialled again
  for ``retry_s``, and unspecified, multicast, link-local and reserved addresses are dropped.
  Private and loopback addresses are kept only when the peer that named them is itself at a
  private or loopback address (a LAN, or tests on 127.0.0.1), unless ``allow_private``.
* Eclipse: only peers we actually connected to reach the peer table; candidates are dialled
  round-robin across the peers that named them, so one answering peer cannot take every dial.
* The server answers at most ``serve_per_peer_per_second`` requests per peer (burst 5), and
  gives private addresses only to requesters at private addresses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
import varint
from libp2p.abc import INetStream
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from .libp2p_nat_patches import direct_peers, remote_ip
from .ratelimit import KeyedBuckets, RateLimitedLog
from .reachability import is_public_ip

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log, burst=5, interval=60.0)

PROTOCOL_ID = "/gpumarket/kad/1.0.0"
MAX_REQUEST_BYTES = 512
MAX_ANSWER_BYTES = 32 << 10  # 20 peers x 4 addresses fit in about 4 KiB
MAX_ADDR_BYTES = 64  # binary multiaddr: /ip6/.../tcp/port/p2p/<id> is about 60
ANSWER_PEERS = 20  # Kademlia's k
QUERY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = True
    interval_s: float = 30.0  # one round: a few FIND_NODE queries, then a few dials
    short_interval_s: float = 5.0  # the same while below target_peers direct connections
    first_round_s: float = 2.0
    target_peers: int = 8  # dial candidates while fewer direct connections than this
    queries_per_round: int = 2
    dials_per_round: int = 4
    dials_per_ip_per_round: int = 1  # (on loopback every candidate shares one IP)
    max_peers_per_answer: int = 20
    max_addrs_per_peer: int = 4
    max_candidates: int = 256
    retry_s: float = 600.0  # a candidate that failed is not dialled again before this
    serve_per_peer_per_second: float = 1.0
    allow_private: bool = False  # keep private/loopback addresses whoever named them

    def __post_init__(self) -> None:
        for key in ("interval_s", "short_interval_s", "first_round_s",
                    "serve_per_peer_per_second"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")
        for key in ("target_peers", "queries_per_round", "dials_per_round", "dials_per_ip_per_round",
                    "max_peers_per_answer", "max_addrs_per_peer", "max_candidates"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0")
        if self.retry_s < 0:
            raise ValueError("retry_s: must be >= 0")


def ip_scope(ip: str) -> str | None:
    """``public``, ``private`` (LAN, CGNAT, ULA), ``loopback``, or None: never dialled
    (unspecified, multicast, link-local, reserved, not an IP)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified or addr.is_multicast or addr.is_link_local:
        return None
    if is_public_ip(ip):
        return "public"
    if addr.is_private or (addr.version == 4 and addr in ipaddress.ip_network("100.64.0.0/10")):
        return "private"
    return None  # reserved, documentation, 240/4 ...


def may_use(scope: str, source_scope: str | None, allow_private: bool) -> bool:
    """Whether an address in ``scope`` learned from a peer at ``source_scope`` may be dialled
    (or given to a requester at ``source_scope``)."""
    if scope == "public" or allow_private:
        return True
    if scope == "private":
        return source_scope in ("private", "loopback")
    return scope == "loopback" and source_scope == "loopback"


def check_addr(raw: bytes, peer: ID, source_scope: str | None, allow_private: bool) -> str | None:
    """The canonical ``/ip4|ip6/<ip>/tcp/<port>/p2p/<peer>`` for one advertised address, or
    None when it is malformed, too long, of another shape, or not to be dialled from here."""
    if not raw or len(raw) > MAX_ADDR_BYTES:
        return None
    try:
        ma = multiaddr.Multiaddr(raw)
        protos = [p.name for p in ma.protocols()]
        if protos not in (["ip4", "tcp"], ["ip6", "tcp"], ["ip4", "tcp", "p2p"],
                          ["ip6", "tcp", "p2p"]):
            return None
        if "p2p" in protos and ma.value_for_protocol("p2p") != peer.to_base58():
            return None
        ip, port = ma.value_for_protocol(protos[0]), int(ma.value_for_protocol("tcp"))
    except Exception:
        return None
    scope = ip_scope(ip)
    if scope is None or not 0 < port < 65536 or not may_use(scope, source_scope, allow_private):
        return None
    return f"/{protos[0]}/{ip}/tcp/{port}/p2p/{peer.to_base58()}"


def _distance(a: bytes, b: bytes) -> int:
    """Kademlia XOR distance between sha256(a) and sha256(b)."""
    return int.from_bytes(hashlib.sha256(a).digest(), "big") ^ int.from_bytes(
        hashlib.sha256(b).digest(), "big")


@dataclass
class _Candidate:
    addr: str  # the first acceptable address
    source: ID


class Discovery:
    """FIND_NODE server and bounded client for one :class:`node.host.GossipHost`.

    ``known`` returns the peers we can vouch for (directly connected, with addresses to dial
    them at): :meth:`node.peer_table.PeerTable.dialable`."""

    def __init__(self, host, known: Callable[[], dict[str, list[str]]],
                 config: DiscoveryConfig = DiscoveryConfig(),
                 counters: Counter[str] | None = None) -> None:
        self.host = host  # GossipHost
        self.known = known
        self.config = config
        self.counters = counters if counters is not None else host.counters
        self.candidates: OrderedDict[ID, _Candidate] = OrderedDict()
        self._failed: OrderedDict[ID, float] = OrderedDict()  # peer -> trio time of failure
        self._queried: dict[ID, float] = {}
        self._serve_limit = KeyedBuckets(config.serve_per_peer_per_second, 5.0,
                                         clock=trio.current_time)
        self.rounds = 0

    def install(self) -> None:
        self.host.host.set_stream_handler(PROTOCOL_ID, self._serve)

    # -- server -------------------------------------------------------------------------------

    async def _serve(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            if not self._serve_limit.allow(peer):
                self.counters["discovery.serve_refused"] += 1
                await stream.reset()
                return
            with trio.fail_after(QUERY_TIMEOUT_S):
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST_BYTES)
                request = Message()
                request.ParseFromString(raw)
                if request.type != Message.MessageType.FIND_NODE or not 2 <= len(request.key) <= 64:
                    self.counters["discovery.bad_request"] += 1
                    await stream.reset()
                    return
                answer = self.answer(request.key, peer, ip_scope(remote_ip(stream) or ""))
                data = answer.SerializeToString()
                await stream.write(varint.encode(len(data)) + data)
                self.counters["discovery.served"] += 1
                await stream.close()
        except Exception as exc:
            self.counters["discovery.bad_request"] += 1
            rlog.info(("serve", str(peer)), "discovery request from %s failed: %r", peer, exc)
            try:
                await stream.reset()
            except Exception:
                pass

    def answer(self, key: bytes, requester: ID, requester_scope: str | None) -> Message:
        """FIND_NODE answer: the :data:`ANSWER_PEERS` known peers closest to ``key``."""
        out = Message(type=Message.MessageType.FIND_NODE, key=key)
        me = self.host.peer_id
        rows = []
        for peer_b58, addrs in self.known().items():
            try:
                peer = ID.from_base58(peer_b58)
            except Exception:
                continue
            if peer in (requester, me):
                continue
            good = [a for a in addrs if (ip := a.split("/")[2]) and (s := ip_scope(ip))
                    and may_use(s, requester_scope, self.config.allow_private)]
            if good:
                rows.append((_distance(peer.to_bytes(), key), peer, good))
        for _, peer, addrs in sorted(rows, key=lambda r: r[0])[:ANSWER_PEERS]:
            entry = out.closerPeers.add()
            entry.id = peer.to_bytes()
            for a in addrs[: self.config.max_addrs_per_peer]:
                entry.addrs.append(multiaddr.Multiaddr(a.split("/p2p/")[0]).to_bytes())
        return out

    # -- client -------------------------------------------------------------------------------

    async def query(self, peer: ID, key: bytes) -> int:
        """One FIND_NODE to ``peer``; new acceptable peers become candidates. Returns how many."""
        self.counters["discovery.queries"] += 1
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                stream = await self.host.host.new_stream(peer, [PROTOCOL_ID])
                try:
                    source_scope = ip_scope(remote_ip(stream) or "")
                    request = Message(type=Message.MessageType.FIND_NODE, key=key)
                    data = request.SerializeToString()
                    await stream.write(varint.encode(len(data)) + data)
                    raw = await read_varint_prefixed_bytes_limited(stream, MAX_ANSWER_BYTES)
                finally:
                    await stream.close()
            answer = Message()
            answer.ParseFromString(raw)
        except Exception as exc:
            self.counters["discovery.answer_refused"] += 1
            rlog.info(("query", str(peer)), "FIND_NODE to %s failed: %r", peer, exc)
            return 0
        return self.take_answer(answer, peer, source_scope)

    def take_answer(self, answer: Message, source: ID, source_scope: str | None) -> int:
        """Validate ``answer``'s peers and keep the acceptable new ones as candidates."""
        c = self.config
        me = self.host.peer_id
        connected = self.host.host.get_network().connections
        if len(answer.closerPeers) > c.max_peers_per_answer:
            self.counters["discovery.peers_over_cap"] += len(answer.closerPeers) - c.max_peers_per_answer
        from_source = sum(1 for cand in self.candidates.values() if cand.source == source)
        added = 0
        for entry in answer.closerPeers[: c.max_peers_per_answer]:
            try:
                peer = ID(entry.id)
                peer.to_base58()
            except Exception:
                self.counters["discovery.bad_peer"] += 1
                continue
            if peer == me or peer in connected or peer in self.candidates:
                continue
            if self._failed_recently(peer):
                continue
            addr = None
            for raw in entry.addrs[: c.max_addrs_per_peer]:
                addr = check_addr(raw, peer, source_scope, c.allow_private)
                if addr is not None:
                    break
                self.counters["discovery.addr_dropped"] += 1
            if addr is None or from_source >= c.max_peers_per_answer:
                continue
            self.candidates[peer] = _Candidate(addr, source)
            from_source += 1
            added += 1
            while len(self.candidates) > c.max_candidates:
                self.candidates.popitem(last=False)
        self.counters["discovery.candidates"] += added
        return added

    def _failed_recently(self, peer: ID, now: float | None = None) -> bool:
        """A dial to ``peer`` failed less than ``retry_s`` ago (``now``: trio time)."""
        failed = self._failed.get(peer)
        if failed is None:
            return False
        return (trio.current_time() if now is None else now) - failed < self.config.retry_s

    def pick_dials(self, now: float, direct: int) -> list[tuple[ID, _Candidate]]:
        """Up to ``dials_per_round`` candidates (never more than we lack), round-robin across
        the peers that named them, at most ``dials_per_ip_per_round`` per IP address, none that
        failed recently."""
        c = self.config
        want = min(c.dials_per_round, max(0, c.target_peers - direct))
        connected = self.host.host.get_network().connections
        by_source: OrderedDict[ID, list[ID]] = OrderedDict()
        for peer, cand in list(self.candidates.items()):
            if peer in connected:
                del self.candidates[peer]
                continue
            if self._failed_recently(peer, now):
                continue
            by_source.setdefault(cand.source, []).append(peer)
        picked: list[tuple[ID, _Candidate]] = []
        ips: Counter[str] = Counter()
        while len(picked) < want and any(by_source.values()):
            for source in list(by_source):
                if not by_source[source] or len(picked) >= want:
                    continue
                peer = by_source[source].pop(0)
                cand = self.candidates[peer]
                ip = cand.addr.split("/")[2]
                if ips[ip] >= c.dials_per_ip_per_round:
                    continue
                ips[ip] += 1
                picked.append((peer, cand))
        return picked

    def _direct(self) -> list[ID]:
        return direct_peers(self.host.host.get_network())

    async def round(self) -> None:
        """Query a few connected peers, then dial a few candidates."""
        self.rounds += 1
        network = self.host.host.get_network()
        direct = self._direct()
        now = trio.current_time()
        ask = sorted(direct, key=lambda p: self._queried.get(p, -1e18))[: self.config.queries_per_round]
        key = self.host.peer_id.to_bytes() if self.rounds % 2 == 1 else b"\x12\x20" + os.urandom(32)
        async with trio.open_nursery() as nursery:
            for peer in ask:
                self._queried[peer] = now
                nursery.start_soon(self.query, peer, key)
        for peer in list(self._queried):
            if peer not in network.connections:
                del self._queried[peer]
        picked = self.pick_dials(trio.current_time(), len(direct))
        if not picked:
            return
        self.counters["discovery.dials"] += len(picked)
        ok = [False] * len(picked)

        async def dial(i: int) -> None:
            ok[i] = await self.dial_once(picked[i][1].addr)

        async with trio.open_nursery() as nursery:
            for i in range(len(picked)):
                nursery.start_soon(dial, i)
        now = trio.current_time()
        for (peer, _), good in zip(picked, ok):
            self.candidates.pop(peer, None)
            if good:
                self.counters["discovery.connected"] += 1
            else:
                self.counters["discovery.dial_failed"] += 1
                self._failed[peer] = now
                self._failed.move_to_end(peer)
                while len(self._failed) > 4 * self.config.max_candidates:
                    self._failed.popitem(last=False)

    async def dial_once(self, addr: str) -> bool:
        """One TCP connection attempt (py-libp2p's swarm makes up to 4 per dial, with retries:
        4 connections to a third party for each address an attacker names)."""
        maddr = multiaddr.Multiaddr(addr)
        try:
            peer = ID.from_base58(maddr.get_peer_id())
            with trio.fail_after(self.host.config.dial_timeout):
                await self.host.host.get_network()._dial_addr_single_attempt(maddr, peer)
            return True
        except Exception as exc:
            rlog.info(("dial", addr), "discovery: dialling %s failed: %r", addr, exc)
            return False

    async def run(self) -> None:
        self.install()
        await trio.sleep(self.config.first_round_s)
        while True:
            try:
                await self.round()
            except Exception:
                log.exception("discovery round failed")
            short = len(self._direct()) < self.config.target_peers
            await trio.sleep(self.config.short_interval_s if short else self.config.interval_s)


__all__ = ["Discovery", "DiscoveryConfig", "PROTOCOL_ID", "check_addr", "ip_scope", "may_use"]
