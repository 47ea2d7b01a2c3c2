"""The libp2p host and the gossipsub router, configured explicitly (py-libp2p 0.8.1).

Why every setting is spelled out: py-libp2p's defaults are unsafe or slow for us (measured in
shared/TOOLCHAIN.md). ``new_host()`` also accepts plaintext, secio and TLS, so we pass Noise as the
only security transport; gossipsub's heartbeat is 120 s by default, we use 1 s with D=6/4/12.

Transport: TCP + Noise + yamux (the combination that interoperates with js-libp2p). Identify and
ping come with ``BasicHost``'s default protocols. Bootstrap peers are dialled in parallel, each
under its own deadline (``host.connect`` costs about 250 ms even on loopback).
``HostConfig.fast_gossip`` (on) applies node/libp2p_perf.py's CPU fixes to py-libp2p's yamux,
pubsub and gossipsub (window credit at half the window, buffered RPC frame reads, the signed peer
record once per stream, IDONTWANT only for messages >= 1 KiB); the frames and protobufs on the
wire stay ones py-libp2p, go and js accept (tests/interop).

Gossipsub, as set by :class:`GossipConfig`:

* message id = sha256(payload): the same signed offer relayed by two peers is one message;
  a node re-publishing identical bytes within ``seen_ttl`` is deduplicated too, so a refreshed
  offer must differ (a new seq/timestamp inside the signed payload).
* strict signing (py-libp2p always sets ``from``/``seqno``; it is also the only mode js accepts).
* ``adaptive_gossip_enabled=False``: in 0.8.1 "adaptive gossip" rewrites the degree bounds and,
  when its health estimate is low (e.g. a small mesh), raises the heartbeat to 30-60 s.
* ``eclipse_protection_enabled=False``: 0.8.1's IP-diversity step grafts extra peers without
  checking back-off or score, which would undo the score-based pruning below. IP diversity is
  left to a later P7 (colocation) setting; on loopback every peer shares one IP anyway.
* gossipsub's own spam protection is off: it counted only messages that had already passed
  validation (so invalid floods cost us full price), counted our own publishes too, and logged a
  WARNING per message over the limit. :class:`node.libp2p_patches.GuardedPubsub` replaces it with
  limits applied in the read loop, before any signature check or validator (see "Limits").

Validation and the IGNORE verdict. A topic validator in py-libp2p returns only a bool, and every
``False`` is passed to the scorer's ``on_invalid_message`` (P4) for the forwarding peer. The
protocol layer distinguishes REJECT (provably bad: bad signature, malformed; penalise the sender)
from IGNORE (drop quietly: e.g. expired by our clock, a duplicate seq; an honest relay with a
slightly different clock may forward it). Neither may be relayed, so both must return ``False``;
returning ``True`` for IGNORE would relay a message we consider unusable. To keep IGNORE from
penalising honest relays, our scorer (:class:`RejectOnlyScorer`) makes ``on_invalid_message`` a
no-op, and the validator wrapper counts P4 itself, only for :attr:`Verdict.REJECT`.
Trade-offs: (1) py-libp2p caches a failed validation by message id, so the same bytes arriving
from a second peer are dropped without calling our validator and without a penalty; an honest peer
never forwards what it rejected, so only a second malicious relay escapes the count.
(2) A validator that raises is treated as IGNORE (our bug is not the peer's fault).
(3) Validators also run on our own publishes; a publish our own validator refuses is not sent.

Peer scoring (py-libp2p 0.8.1 ships every weight 0 and every threshold -inf). We set only P4:
weight 1 per REJECT, decaying by 0.99 each 1 s heartbeat and reset to 0 below 0.01 (py-libp2p has
no decay-to-zero, so without the reset one old REJECT would keep a peer negative forever). One
REJECT therefore costs the forwarder about 7.5 minutes of negative score. No positive credit
(P1-P3 weights 0): a peer cannot bank good behaviour to offset invalid messages. Effects:

* score < 0 (one recent REJECT): pruned from our mesh at the next heartbeat, with back-off, and
  its GRAFTs are refused. 0.8.1's heartbeat does not do this itself (it only replaces the worst
  peer when a better one is idle), so :class:`ScoredGossipSub` adds it, following the gossipsub
  v1.1 spec.
* score < -10 (gossip_threshold): we send it no IHAVE gossip.
* score < -50 (publish_threshold): its messages are dropped before validation (saves CPU under a
  flood) and we stop forwarding to it.
* score < -80 (graylist_threshold): GRAFT refused (already true below 0).
Misbehaviour (our addition, topic-independent, in :class:`RejectOnlyScorer`): points for an
unparsable or oversized RPC (``malformed_rpc_penalty`` = 1000: graylisted at once), for each
message or RPC frame over the per-peer rate limits (1 each), and for each IGNORE verdict beyond
an allowance of ``ignore_allowance_per_second`` (5/s, burst 50; 1 each: IGNOREs are free for
honest relays, not for a flood). Points decay like P4 (0.99 per heartbeat, reset below 0.01);
above ``misbehaviour_threshold`` (20) each point costs 1 score, so short honest bursts cost
nothing and a flood reaches the graylist within a second. Unlike py-libp2p's counters, points
above the threshold survive a disconnect (for the last 4,096 such peers, decaying meanwhile), so
reconnecting does not wash them out; a graylisted peer that keeps sending (100 frames) is
disconnected, which makes each further round cost it a handshake.

Scores live as long as the connection: py-libp2p drops a peer's counters when it disconnects, so a
reconnecting peer starts at 0 (except for misbehaviour points above the threshold, kept as said
above). The app-level reputation (store) is where long memory belongs.
P5-P7 stay 0 for now (py-libp2p's P5 also sums equivocation and IHAVE/IWANT penalties whose
triggers we have not checked against honest behaviour), and P7 with one IP per test network
would penalise everyone.

Limits (hostile peers; issue 11). All counted in :attr:`GossipHost.counters` (``p2p.*``):

* Pubsub, per forwarding peer, before anything costly: RPC frames ``max_rpcs_per_peer_per_second``
  (200/s, burst 400) checked before parsing; new (unseen) messages
  ``max_messages_per_peer_per_second`` (50/s, burst 100) checked before the envelope signature
  and validators, and the same again for all peers at one IP address together
  (``max_messages_per_ip_per_second``: peer ids are free, so a flooder that returns under a new
  id must not bring a new budget). Over a limit: dropped, one misbehaviour point each (for the
  IP budget, only if the peer has used most of its own). A graylisted peer's frames are dropped
  unparsed. Like the old limit, the message rates must exceed the network-wide offer rate: an
  honest peer forwards each offer once, and a message is new only once, so honest peers sharing
  an IP (a devnet on one machine) share that rate too; while a flooder at their IP drains the IP
  budget their new messages are dropped as well, until it is graylisted.
* Known senders: an offer or withdrawal whose payload names a provider the book holds a valid
  offer of is counted against a lane of its own instead (per peer 20/s burst 40, per IP 40/s
  burst 80, per peer and provider 1/s burst 5; beyond those it falls back to the budgets
  above), so the re-announcements of known providers are not dropped with a relayed flood of
  new identities. The payload is only peeked at: a forged one fails its signature in the
  validator and costs the forwarder a REJECT.
* Gossip control: IHAVE and IWANT ids per peer are bounded (duplicates in an RPC dropped; IHAVE
  10 entries per RPC and 5,000 ids/s; IWANT 500 ids/s, burst 1,000): py-libp2p answered one
  IWANT naming a cached message 3,000 times with 3,000 copies.
* A bad envelope signature counts as a REJECT (P4) for the forwarder (an honest relay verifies
  before forwarding); py-libp2p dropped it at no cost to the sender.
* A malformed or truncated pubsub frame resets that stream and graylists the sender; a message
  whose envelope key cannot be decoded is a bad signature; an exception in any stream handler
  resets that stream only (py-libp2p let each of these stop the node).
* Connections: an inbound connection holds one of py-libp2p's 250 inbound slots until it closes
  (py-libp2p held it until the swarm stopped: lockout after 250 lifetime inbound connections).
  At most ``max_inbound_per_ip`` (32) concurrent inbound connections per remote IP and
  ``max_inbound_rate_per_ip`` (10/s, burst 40) new ones, refused at accept before any handshake
  work, and ``max_inbound_per_peer`` (3) per peer id, refused before
  the connection is registered. A devnet of many nodes on one machine shares one IP: raise
  ``max_inbound_per_ip`` there.
* Log lines a peer can trigger are rate-limited (:mod:`node.ratelimit`): ours through
  ``RateLimitedLog``, py-libp2p's through a filter on its loggers (5 per call site per minute,
  then a count).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import math
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, ISubscriptionAPI
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.score import PeerScorer, ScoreParams, TopicScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from node.identity import NodeIdentity
from node.libp2p_patches import ConnLimitsConfig, GuardedPubsub, PubsubLimits, apply_host_patches
from node.libp2p_perf import (
    BatchedYamux, FastGossipSub, FastPubsub, deliver_guarded, quiet_libp2p_debug,
    use_configured_muxer,
)
from node.ratelimit import KeyedBuckets, RateLimitedLog
from node.reachability import Reachability, ReachabilityConfig

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log, burst=5, interval=60.0)

GOSSIPSUB_PROTOCOLS = (PROTOCOL_ID_V12, PROTOCOL_ID_V11)
"""1.2 and 1.1 only: both interoperate with js-libp2p; offering 1.1/1.0 alone to a 1.2-only
peer gives no pubsub at all, silently. The py-only 1.3/1.4/2.0 variants are not offered."""

SCORE_DECAY_TO_ZERO = 0.01
REMEMBERED_PEERS = 4096  # misbehaving peers whose points survive a reconnect (oldest forgotten)


class Verdict(enum.Enum):
    """A topic validator's answer. Only ACCEPT is delivered and relayed."""

    ACCEPT = "accept"
    REJECT = "reject"  # provably invalid: penalise the forwarding peer
    IGNORE = "ignore"  # not usable by us, not provably malicious: drop quietly


TopicValidator = Callable[[bytes, ID], "Verdict | bool"]
"""``validate(payload, from_peer) -> Verdict`` (``True``/``False`` mean ACCEPT/REJECT).
``from_peer`` is the peer that forwarded the message to us (the one penalised), not the origin."""


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Gossip message id: sha256 of the payload alone, so relays of the same bytes dedupe."""
    return hashlib.sha256(msg.data).digest()


@dataclass(frozen=True)
class GossipConfig:
    heartbeat_interval: int = 1  # seconds; py-libp2p types it int
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    max_messages_per_peer_per_second: float = 50.0  # new messages, counted before validation
    message_burst: float = 100.0
    max_messages_per_ip_per_second: float = 50.0  # the same, all peers at one IP together
    message_ip_burst: float = 100.0
    max_rpcs_per_peer_per_second: float = 200.0  # RPC frames of any kind, before parsing
    rpc_burst: float = 400.0
    # The known-sender lane (node/libp2p_patches.py): offers and withdrawals of providers the
    # book holds, counted apart from the two budgets above
    max_known_messages_per_peer_per_second: float = 20.0
    known_message_burst: float = 40.0
    max_known_messages_per_ip_per_second: float = 40.0
    known_message_ip_burst: float = 80.0
    max_known_messages_per_sender_per_second: float = 1.0  # per (peer, provider)
    known_sender_burst: float = 5.0
    ignore_allowance_per_second: float = 5.0  # IGNORE verdicts a forwarder may cause for free
    ignore_burst: float = 50.0
    misbehaviour_threshold: float = 20.0  # points tolerated before the score goes down
    misbehaviour_weight: float = 1.0  # score per point above the threshold
    malformed_rpc_penalty: float = 1000.0  # points for an unparsable RPC: graylisted at once
    seen_ttl: int = 120  # seconds a message id is remembered for dedup
    prune_back_off: int = 60  # seconds a pruned peer may not re-GRAFT
    reject_weight: float = 1.0
    reject_decay: float = 0.99  # per heartbeat
    gossip_threshold: float = -10.0
    publish_threshold: float = -50.0
    graylist_threshold: float = -80.0
    max_message_bytes: int = 1 << 20  # inbound RPC frame limit

    def score_params(self) -> ScoreParams:
        return ScoreParams(
            p4_invalid_messages=TopicScoreParams(
                weight=self.reject_weight, cap=1000.0, decay=self.reject_decay
            ),
            gossip_threshold=self.gossip_threshold,
            publish_threshold=self.publish_threshold,
            graylist_threshold=self.graylist_threshold,
            accept_px_threshold=math.inf,  # peer exchange is off; never accept PX
        )

    def pubsub_limits(self) -> PubsubLimits:
        return PubsubLimits(
            messages_per_second=self.max_messages_per_peer_per_second,
            message_burst=self.message_burst,
            messages_per_ip_per_second=self.max_messages_per_ip_per_second,
            message_ip_burst=self.message_ip_burst,
            rpcs_per_second=self.max_rpcs_per_peer_per_second,
            rpc_burst=self.rpc_burst,
            known_messages_per_second=self.max_known_messages_per_peer_per_second,
            known_message_burst=self.known_message_burst,
            known_messages_per_ip_per_second=self.max_known_messages_per_ip_per_second,
            known_message_ip_burst=self.known_message_ip_burst,
            known_messages_per_sender_per_second=self.max_known_messages_per_sender_per_second,
            known_sender_burst=self.known_sender_burst,
            malformed_rpc_penalty=self.malformed_rpc_penalty,
        )


@dataclass(frozen=True)
class HostConfig:
    listen_addrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: Sequence[str] = ()  # full multiaddrs ending in /p2p/<peer id>
    mdns: bool = False  # discover (and dial) nodes on the same LAN by multicast DNS
    dial_timeout: float = 10.0
    negotiate_timeout: int = 5
    max_inbound_per_ip: int = 32  # concurrent inbound connections from one IP address
    max_inbound_per_peer: int = 3  # concurrent inbound connections of one peer id
    max_inbound_rate_per_ip: float = 10.0  # new inbound connections/s from one IP (burst 4x)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    # py-libp2p CPU fixes (node/libp2p_perf.py); False = upstream's yamux, pubsub frame reads,
    # peer records and IDONTWANT, for comparison benchmarks and the patched/unpatched interop test
    fast_gossip: bool = True
    # AutoNAT, relay v2 and DCUtR (node/reachability.py); None: none of them (no NAT traversal)
    reachability: ReachabilityConfig | None = field(default_factory=ReachabilityConfig)

    def conn_limits(self) -> ConnLimitsConfig:
        return ConnLimitsConfig(max_inbound_per_ip=self.max_inbound_per_ip,
                                max_inbound_per_peer=self.max_inbound_per_peer,
                                inbound_per_ip_per_second=self.max_inbound_rate_per_ip,
                                inbound_per_ip_burst=4 * self.max_inbound_rate_per_ip)


class RejectOnlyScorer(PeerScorer):
    """P4 counts only REJECT verdicts (see module docstring), with decay to zero; plus a
    topic-independent misbehaviour term (malformed RPCs, rate-limit excess, IGNOREs above the
    allowance) that lowers the score once it passes ``misbehaviour_threshold``."""

    def __init__(self, params: ScoreParams, config: GossipConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(params)
        config = config or GossipConfig()
        self.misbehaviour_threshold = config.misbehaviour_threshold
        self.misbehaviour_weight = config.misbehaviour_weight
        self.misbehaviour: dict[ID, float] = {}
        self._remembered: OrderedDict[ID, tuple[float, float]] = OrderedDict()
        self._clock = clock
        self._heartbeat_s = float(config.heartbeat_interval)
        self._ignore_allowance = KeyedBuckets(config.ignore_allowance_per_second,
                                              config.ignore_burst, clock=clock)

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        # Called by py-libp2p for every False from a validator, IGNORE included: not counted.
        pass

    def record_reject(self, peer: ID, topic: str) -> None:
        self.invalid_messages[peer][topic] += 1.0

    def record_misbehaviour(self, peer: ID, amount: float) -> None:
        self._restore(peer)
        self.misbehaviour[peer] = self.misbehaviour.get(peer, 0.0) + amount

    def _restore(self, peer: ID) -> None:
        """Misbehaviour outlives the connection (unlike py-libp2p's counters): a peer that
        reconnects gets back what it had, decayed for the time it was away."""
        if self._remembered and peer in self._remembered:
            value, since = self._remembered.pop(peer)
            decay = self.params.p4_invalid_messages.decay
            value *= decay ** max(0.0, (self._clock() - since) / self._heartbeat_s)
            if value >= SCORE_DECAY_TO_ZERO:
                self.misbehaviour[peer] = self.misbehaviour.get(peer, 0.0) + value

    def record_ignore(self, peer: ID, topic: str) -> bool:
        """An IGNORE verdict for a message ``peer`` forwarded: free within the allowance, a
        misbehaviour point beyond it. Returns whether it was within the allowance."""
        if self._ignore_allowance.allow(peer):
            return True
        self.record_misbehaviour(peer, 1.0)
        return False

    def misbehaviour_penalty(self, peer: ID) -> float:
        self._restore(peer)
        excess = self.misbehaviour.get(peer, 0.0) - self.misbehaviour_threshold
        return excess * self.misbehaviour_weight if excess > 0 else 0.0

    def topic_score(self, peer: ID, topic: str) -> float:
        # Every gate (allow_publish, allow_gossip, score, graylist) goes through topic_score,
        # about 30 times per gossiped message per node. With P1-P3 weighted 0 (our params) their
        # terms are 0 whatever the counters hold: skip their three nested dict lookups.
        p = self.params
        if p.p1_time_in_mesh.weight or p.p2_first_message_deliveries.weight or \
                p.p3_mesh_message_deliveries.weight:
            base = super().topic_score(peer, topic)
        else:
            p4 = p.p4_invalid_messages
            base = -p4.weight * min(self.invalid_messages[peer][topic], p4.cap)
        return base - self.misbehaviour_penalty(peer)

    def graylisted(self, peer: ID, topics: list[str]) -> bool:
        """Below ``graylist_threshold`` on any of ``topics`` (or on misbehaviour alone)."""
        threshold = self.params.graylist_threshold
        if -self.misbehaviour_penalty(peer) < threshold:
            return True
        return any(self.score(peer, [t]) < threshold for t in topics if peer in self.invalid_messages)

    def remove_peer(self, peer: ID) -> None:
        super().remove_peer(peer)
        value = self.misbehaviour.pop(peer, None)
        if value is not None and value > self.misbehaviour_threshold:
            self._remembered[peer] = (value, self._clock())
            self._remembered.move_to_end(peer)
            while len(self._remembered) > REMEMBERED_PEERS:
                self._remembered.popitem(last=False)
        self._ignore_allowance.forget(peer)

    def on_heartbeat(self, dt_seconds: float = 1.0) -> None:
        super().on_heartbeat(dt_seconds)
        for topics in self.invalid_messages.values():
            for topic, value in topics.items():
                if value < SCORE_DECAY_TO_ZERO:
                    topics[topic] = 0.0
        decay = self.params.p4_invalid_messages.decay
        for peer, value in list(self.misbehaviour.items()):
            value *= decay
            if value < SCORE_DECAY_TO_ZERO:
                del self.misbehaviour[peer]
            else:
                self.misbehaviour[peer] = value


class ScoredGossipSub(GossipSub):
    """GossipSub that prunes and refuses peers with a negative score (gossipsub v1.1 spec)."""

    scorer: RejectOnlyScorer

    def _negative(self, peer: ID, topic: str) -> bool:
        return self.scorer.score(peer, [topic]) < 0

    def mesh_heartbeat(self) -> Any:
        pruned: dict[ID, list[str]] = {}
        for topic, peers in self.mesh.items():
            for peer in [p for p in peers if self._negative(p, topic)]:
                peers.discard(peer)
                self._add_back_off(peer, topic, False)
                pruned.setdefault(peer, []).append(topic)
        to_graft, to_prune = super().mesh_heartbeat()
        for peer, topics in list(to_graft.items()):
            keep = [t for t in topics if not self._negative(peer, t)]
            for t in set(topics) - set(keep):
                self.mesh[t].discard(peer)
            if keep:
                to_graft[peer] = keep
            else:
                del to_graft[peer]
        for peer, topics in pruned.items():
            log.debug("pruning negative-score peer %s from %s", peer, topics)
            to_prune[peer].extend(t for t in topics if t not in to_prune[peer])
        return to_graft, to_prune

    async def handle_graft(self, graft_msg: rpc_pb2.ControlGraft, sender_peer_id: ID) -> None:
        topic = graft_msg.topicID
        if topic in self.mesh and self._negative(sender_peer_id, topic):
            self._add_back_off(sender_peer_id, topic, False)
            await self.emit_prune(topic, sender_peer_id, False, False)
            return
        await super().handle_graft(graft_msg, sender_peer_id)


class FastScoredGossipSub(FastGossipSub, ScoredGossipSub):
    """ScoredGossipSub with node/libp2p_perf.py's IDONTWANT threshold."""


class ListenError(Exception):
    """A listen address cannot be bound (its port is in use, or the address is not ours)."""


def check_listen_addrs(addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Bind each TCP listen address once, as the listener will (SO_REUSEADDR), and close it: a
    port in use is refused here with its name, where py-libp2p 0.8.1 logs it and goes on
    listening on nothing."""
    for addr in addrs:
        protos = [p.name for p in addr.protocols()]
        if len(protos) < 2 or protos[0] not in ("ip4", "ip6") or protos[1] != "tcp":
            continue
        host, port = addr.value_for_protocol(protos[0]), int(addr.value_for_protocol("tcp"))
        if port == 0:
            continue
        family = socket.AF_INET if protos[0] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(f"cannot listen on {addr}: port {port} is already in use "
                                      "(another gpumarket node or program); choose another port "
                                      "in node.listen or with --listen") from None
                raise ListenError(f"cannot listen on {addr}: {exc.strerror}") from None


class GossipHost:
    """A libp2p host with our gossipsub router; run it with ``await nursery.start(node.run)``."""

    def __init__(self, identity: NodeIdentity, config: HostConfig = HostConfig()) -> None:
        self.identity = identity
        self.config = config
        self._listen = [multiaddr.Multiaddr(a) for a in config.listen_addrs]
        self.counters: Counter[str] = Counter()  # p2p.* events: refusals, drops, penalties
        fast = config.fast_gossip
        self.host: IHost = build_libp2p_host(identity, self._listen, config.negotiate_timeout,
                                             mdns=config.mdns, fast_yamux=fast)
        apply_host_patches(self.host, conn_limits=config.conn_limits(), counters=self.counters)
        if fast:
            use_configured_muxer(self.host)
            quiet_libp2p_debug()
        g = config.gossip
        self.gossipsub = (FastScoredGossipSub if fast else ScoredGossipSub)(
            protocols=list(GOSSIPSUB_PROTOCOLS),
            degree=g.degree,
            degree_low=g.degree_low,
            degree_high=g.degree_high,
            heartbeat_interval=g.heartbeat_interval,
            prune_back_off=g.prune_back_off,
            do_px=False,
            adaptive_gossip_enabled=False,
            eclipse_protection_enabled=False,
            # replaced by GuardedPubsub's limit, which runs before validation (module docstring)
            spam_protection_enabled=False,
        )
        # GossipSub builds a plain PeerScorer; swap in ours before anything is scored.
        self.gossipsub.scorer = RejectOnlyScorer(g.score_params(), g)
        self.pubsub = (FastPubsub if fast else GuardedPubsub)(
            self.host,
            self.gossipsub,
            strict_signing=True,
            msg_id_constructor=content_message_id,
            seen_ttl=g.seen_ttl,
            max_inbound_rpc_size=g.max_message_bytes,
        )
        self.pubsub.configure_guard(g.pubsub_limits(), self.counters)
        self._nursery: trio.Nursery | None = None  # run()'s, once started
        self.reachability = (Reachability(self.host, config.reachability, self.counters)
                             if config.reachability is not None else None)

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def addrs(self) -> list[multiaddr.Multiaddr]:
        """Dialable listen addresses including /p2p/<peer id> (valid once running)."""
        suffix = multiaddr.Multiaddr(f"/p2p/{self.peer_id.to_base58()}")
        return [a.encapsulate(suffix) for a in self.host.get_transport_addrs()]

    async def run(self, *, task_status: trio.TaskStatus[GossipHost] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, start pubsub, dial bootstrap peers (and mDNS-discovered ones when enabled);
        ``started()`` once listening. Listeners and connections are closed on the way out.
        Raises ListenError when a listen address cannot be bound (py-libp2p only logs it)."""
        check_listen_addrs(self._listen)
        async with self.host.run(listen_addrs=self._listen):
            if self._listen and not self.host.get_transport_addrs():
                raise ListenError(f"could not listen on {', '.join(map(str, self._listen))} "
                                  "(see the node log)")
            try:
                async with background_trio_service(self.pubsub):
                    async with background_trio_service(self.gossipsub):
                        with trio.fail_after(10):
                            await self.pubsub.wait_until_ready()
                        async with trio.open_nursery() as nursery:
                            self._nursery = nursery
                            task_status.started(self)
                            if self.reachability is not None:
                                await nursery.start(self.reachability.run)
                            if self.config.mdns:
                                nursery.start_soon(self._dial_discovered)
                            if self.config.bootstrap:
                                await self.connect_all(self.config.bootstrap)
                            await trio.sleep_forever()
            finally:
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    await self._close_network()

    async def _close_network(self) -> None:
        """Close listeners and connections. py-libp2p (0.8.1) does this when its service stops,
        but unshielded: under cancellation the first await raises and the listening socket
        stays open, so a node stopped in-process kept accepting on its port."""
        network = self.host.get_network()
        for listener in list(getattr(network, "listeners", {}).values()):
            try:
                await listener.close()
            except Exception as exc:
                log.debug("closing a listener failed: %r", exc)
        for conns in list(getattr(network, "connections", {}).values()):
            for conn in list(conns if isinstance(conns, list) else [conns]):
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing a connection failed: %r", exc)

    async def _dial_discovered(self) -> None:
        """py-libp2p's mDNS only records discovered peers; dial them (one at a time, each once
        per discovery) so that nodes on one LAN find the market without bootstrap addresses."""
        from libp2p.discovery.events.peerDiscovery import peerDiscovery

        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[PeerInfo](64)

        def on_discovered(info: PeerInfo) -> None:  # called from zeroconf's thread
            def put() -> None:
                try:
                    send.send_nowait(info)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass  # a burst beyond 64: those peers are rediscovered later

            try:
                token.run_sync_soon(put)
            except trio.RunFinishedError:
                pass

        peerDiscovery.register_peer_discovered_handler(on_discovered)
        try:
            async with receive:
                async for info in receive:
                    if info.peer_id == self.peer_id or info.peer_id in self.host.get_network().connections:
                        continue
                    try:
                        await self.connect(info)
                        log.info("mDNS: connected to %s", info.peer_id)
                    except Exception as exc:
                        log.info("mDNS: dialling %s failed: %r", info.peer_id, exc)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(on_discovered)

    async def connect(self, addr: str | multiaddr.Multiaddr | PeerInfo) -> None:
        """Dial one peer under ``dial_timeout``; raises on failure. A ``/p2p-circuit`` address
        is dialled through the relay it names (py-libp2p's swarm skips those)."""
        if not isinstance(addr, PeerInfo) and "/p2p-circuit" in str(addr):
            maddr = multiaddr.Multiaddr(str(addr))
            peer = ID.from_base58(maddr.get_peer_id())
            if peer in self.host.get_network().connections:
                return
            if self.reachability is None:
                raise ConnectionError(f"{addr}: relayed addresses need reachability enabled")
            with trio.fail_after(self.config.dial_timeout):
                await self.reachability.dial_circuit(maddr)
            return
        info = addr if isinstance(addr, PeerInfo) else info_from_p2p_addr(multiaddr.Multiaddr(str(addr)))
        with trio.fail_after(self.config.dial_timeout):
            await self.host.connect(info)

    async def connect_all(self, addrs: Sequence[str | multiaddr.Multiaddr | PeerInfo]) -> list[bool]:
        """Dial all peers in parallel; returns which succeeded (failures are logged, not raised)."""
        ok = [False] * len(addrs)

        async def dial(i: int) -> None:
            try:
                await self.connect(addrs[i])
                ok[i] = True
            except Exception as exc:  # a bad bootstrap peer must not stop the node
                log.warning("dial %s failed: %r", addrs[i], exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(addrs)):
                nursery.start_soon(dial, i)
        return ok

    def set_topic_validator(self, topic: str, validate: TopicValidator) -> None:
        scorer = self.gossipsub.scorer

        def validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            try:
                verdict = validate(msg.data, forwarder)
            except Exception:
                self.counters["p2p.pubsub.validator_error"] += 1
                rlog.error(("validator_error", topic), "topic validator for %s raised; treating "
                           "as IGNORE", topic, exc_info=True)
                return False
            if verdict is True:
                verdict = Verdict.ACCEPT
            elif verdict is False:
                verdict = Verdict.REJECT
            if forwarder != self.peer_id:
                if verdict is Verdict.REJECT:
                    scorer.record_reject(forwarder, topic)
                elif verdict is Verdict.IGNORE and not scorer.record_ignore(forwarder, topic):
                    self.counters["p2p.pubsub.ignore_over_allowance"] += 1
            return verdict is Verdict.ACCEPT

        self.pubsub.set_topic_validator(topic, validator, is_async_validator=False)

    async def subscribe(self, topic: str,
                        deliver: Callable[[rpc_pb2.Message], None] | None = None) -> ISubscriptionAPI:
        """Join ``topic``. Without ``deliver``, read its messages from the returned
        subscription (``await sub.get()``). With ``deliver``, each message is handed to it
        instead, and the subscription stays empty: called where the message is accepted
        (node/libp2p_perf.py, item 18: no channel, no task wake-up per message), or with
        ``fast_gossip`` off from a task of the host's that reads the subscription. ``deliver``
        must not block; what it raises is counted (``p2p.pubsub.deliver_error``) and logged."""
        sub = await self.pubsub.subscribe(topic)
        if deliver is not None:
            if isinstance(self.pubsub, FastPubsub):
                self.pubsub.deliver_inline(topic, deliver)
            elif self._nursery is None:
                raise RuntimeError("subscribe(deliver=...) needs the host running (run())")
            else:
                self._nursery.start_soon(self._deliver_from, sub, topic, deliver)
        return sub

    async def _deliver_from(self, sub: ISubscriptionAPI, topic: str,
                            deliver: Callable[[rpc_pb2.Message], None]) -> None:
        async for msg in sub:  # ends when the subscription's channel closes (unsubscribe)
            deliver_guarded(deliver, msg, topic, self.counters)

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.pubsub.publish(topic, payload)

    def mesh_peers(self, topic: str) -> set[ID]:
        return set(self.gossipsub.mesh.get(topic, ()))

    def score(self, peer: ID, topic: str) -> float:
        return self.gossipsub.scorer.score(peer, [topic])


def build_libp2p_host(
    identity: NodeIdentity, listen_addrs: Sequence[multiaddr.Multiaddr], negotiate_timeout: int = 5,
    *, mdns: bool = False, fast_yamux: bool = True,
) -> IHost:
    """A BasicHost with Noise as the ONLY security transport and yamux as the only muxer
    (:class:`node.libp2p_perf.BatchedYamux` unless ``fast_yamux`` is False)."""
    noise = NoiseTransport(identity.key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=identity.key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): BatchedYamux if fast_yamux else Yamux},
        listen_addrs=listen_addrs,
        negotiate_timeout=negotiate_timeout,
        enable_mDNS=mdns,
        enable_upnp=False,
    )
