"""Fixes for py-libp2p 0.8.1 bugs that let one hostile peer kill or starve a node.

Each fix is a subclass override (or, for objects that ``new_host()`` builds for us, a class swap
of that one instance onto a subclass) applied by :mod:`node.host` when it builds a host: only our
hosts are changed, nothing is patched process-wide except log filters on py-libp2p's loggers,
and applying a fix twice is a no-op. Each says the upstream bug, why it matters, and how it could
go upstream. Counters (``p2p.*``) land in the host's :class:`collections.Counter`.

1. :class:`GuardedPubsub`: a malformed or truncated pubsub RPC frame (protobuf ``DecodeError``)
   escaped ``Pubsub.continuously_read_stream``, crossed the connection's nursery and stopped the
   node. Now the stream is reset, the peer penalised (graylisted) and the node runs on. The same
   read loop also rate-limits each peer's RPC frames and new messages *before* the envelope
   signature check and before any validator, drops a graylisted peer's frames unparsed (and
   disconnects it if it keeps sending), and penalises bad envelope signatures as REJECTs
   (py-libp2p drops them silently, at no cost to the sender). Messages from senders the
   application already knows (``p2p_known_sender``) have a budget of their own, and the ids in
   IHAVE/IWANT control entries are deduplicated and bounded per peer.
2. :func:`guard_stream_handlers`: an exception from any stream handler (ours, identify, ping,
   pubsub, multistream-select) propagated into ``SwarmConn``'s nursery, the swarm's service
   manager, and the node. Now it resets that stream only.
3. :class:`GuardedSwarm`: the swarm took an inbound-connection slot per accepted connection and
   gave it back only when the swarm stopped (``_do_handle_inbound_connection`` awaited
   ``manager.wait_finished()``), so after 250 lifetime inbound connections every dial was
   refused. Now the slot is held until that connection closes. It also enforces per-IP and
   per-peer inbound connection limits (:class:`ConnLimits`).
4. :func:`install_libp2p_log_limits`: py-libp2p logs some peer-triggered events at WARNING or
   ERROR once per event (e.g. a traceback per failed inbound connection); a filter limits each
   (logger, message) to a few lines per minute plus a count.
5. :class:`NoVerdictCache` (installed by :class:`GuardedPubsub`): ``Pubsub.validate_msg`` cached
   each validator verdict by message id for 300 s and answered repeats from it without running
   the validators. A message that failed validation is not "seen", so a peer could resend a
   REJECTed message (under a fresh envelope: our ids hash the data alone) and be penalised only
   the first time; a verdict that depends on time (an offer not valid yet, or expired since)
   stayed stuck; and a message dropped from the seen cache (120 s) but still cached as valid
   was forwarded unvalidated. The cache was also a list scanned per message (``in``,
   ``remove``, ``pop(0)``: O(size), about 3-5% of a relay's CPU at its 1,000 entries). Now every
   message that is not in the seen cache runs the validators, as in go-libp2p, which keeps no
   verdict cache. Upstream fix: drop the cache, or let ``validation_cache_size=0`` disable it.

CPU fixes for the gossip path (issue 16: frame amplification, a signed peer record on every RPC,
IDONTWANT for small messages, DEBUG f-strings) live in the sibling :mod:`node.libp2p_perf` and are
applied from the same place (:class:`node.host.GossipHost`). Both modules are written against
py-libp2p 0.8.1 (several overrides copy or depend on its private methods) and refuse to load
against another version (:func:`check_libp2p_version`).
NAT traversal (AutoNAT, circuit relay v2, DCUtR): fixes and findings in the sibling module
:mod:`node.libp2p_nat_patches`, applied by :mod:`node.reachability`.

Why not py-libp2p's resource manager (``libp2p/rcmgr``) for item 3 (read in 0.8.1, not adopted):
it cannot say "N per remote IP": its ``CIDRLimiter`` keeps one aggregate count per configured
network (a ``0.0.0.0/0`` rule caps all inbound connections together, and a per-IP cap would need
a rule per address); it does not touch the inbound-slot bug above (that is the swarm's own
limiter); it fails open on internal errors (its checks sit in ``try/except Exception: pass``);
"graceful degradation" changes limits for every peer at once; and its per-peer limit lives in a
lifecycle tracker that the swarm reconciles against "phantom" entries. We need two counters
whose every increment has exactly one decrement; :class:`ConnLimits` is that.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import libp2p
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IMuxedConn, INetStream
from libp2p.io.exceptions import IncompleteReadError, IOException, MessageTooLarge
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import GossipsubEvent, Pubsub
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.pubsub.validators import signature_validator
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from node.ratelimit import KeyedBuckets, RateLimitedLog, RateLimitFilter

if TYPE_CHECKING:
    from libp2p.abc import IHost

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log, burst=5, interval=60.0)

LIBP2P_VERSION = "0.8.1"
"""The py-libp2p release these patches were written and tested against."""


def check_libp2p_version(version: str | None = None) -> None:
    """Refuse to run the patches on another py-libp2p: they override (and in places copy) its
    private methods, and a silent mismatch would change behaviour nobody has tested. Moving to
    a new release means re-reading each patch against it, re-running tests/node/test_hostile_p2p.py,
    tests/node/test_libp2p_perf.py and tests/interop, then changing :data:`LIBP2P_VERSION`."""
    found = version if version is not None else getattr(libp2p, "__version__", "unknown")
    if found != LIBP2P_VERSION:
        raise RuntimeError(
            f"node/libp2p_patches.py and node/libp2p_perf.py are written for py-libp2p "
            f"{LIBP2P_VERSION}, found {found}: re-check each patch against it before changing "
            f"LIBP2P_VERSION")


check_libp2p_version()


class PeerPenalties(Protocol):
    """What the pubsub guard needs from the scorer (``node.host.RejectOnlyScorer``)."""

    def record_reject(self, peer: ID, topic: str) -> None: ...
    def record_misbehaviour(self, peer: ID, amount: float) -> None: ...
    def graylisted(self, peer: ID, topics: list[str]) -> bool: ...
    def allow_publish(self, peer: ID, topics: list[str]) -> bool: ...


# --------------------------------------------------------------------------------------------
# 1. pubsub: malformed frames, pre-validation rate limits, bad envelope signatures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PubsubLimits:
    """Per forwarding peer, counted before any signature check or validator runs."""

    messages_per_second: float = 50.0  # new (unseen) messages on subscribed topics
    message_burst: float = 100.0
    # All peers behind one IP address together: new peer ids are free, so without this each
    # fresh identity would bring a fresh budget. Safe for honest peers sharing an IP (a devnet on
    # one machine): a message is new only once, so their total cannot exceed the network's rate;
    # but while a flooder at the same IP drains it, their new messages are dropped too (and not
    # penalised), until the flooder is graylisted, which stops its frames before this budget.
    messages_per_ip_per_second: float = 50.0
    message_ip_burst: float = 100.0
    rpcs_per_second: float = 200.0  # RPC frames of any kind (one message costs ~2 frames)
    rpc_burst: float = 400.0
    malformed_rpc_penalty: float = 1000.0  # misbehaviour points: graylists at once
    rate_excess_penalty: float = 1.0  # misbehaviour points per message/frame over the limit
    graylisted_frames_before_disconnect: int = 100  # then close the peer's connections
    # The known-sender lane: messages the application says come from a sender it already
    # holds valid state for (an offer or withdrawal of a provider in the book: see
    # ``GuardedPubsub.p2p_known_sender``) are counted against these budgets instead of the
    # two above, so a relay's flood of new identities cannot starve them. A forged one fails
    # its signature in the validator and costs the forwarder a REJECT.
    known_messages_per_second: float = 20.0  # per forwarding peer
    known_message_burst: float = 40.0
    known_messages_per_ip_per_second: float = 40.0  # all peers at one IP together
    known_message_ip_burst: float = 80.0
    known_messages_per_sender_per_second: float = 1.0  # per (forwarding peer, known sender)
    known_sender_burst: float = 5.0
    known_sender_keys: int = 16_384  # (peer, sender) buckets kept
    # Gossip control entries per peer (gossipsub v1.1's max_ihave_length / max_ihave_messages,
    # and a bound on IWANT): duplicates within an RPC are dropped, then at most these many ids
    # a second (burst the same) and IHAVE entries per RPC are handed to the router; the rest is
    # dropped and counted. py-libp2p bounded only the number of IHAVE/IWANT control messages per
    # second, not their ids: one IWANT naming a cached message 15,000 times (a 1 MiB frame) was
    # answered with 15,000 copies of it.
    max_ihave_ids_per_second: float = 5000.0
    max_ihave_messages_per_rpc: int = 10
    max_iwant_ids_per_second: float = 500.0
    iwant_id_burst: float = 1000.0


class NoVerdictCache:
    """Stands in for ``Pubsub.validation_cache``: remembers no verdict, so every message that is
    not in the seen cache is validated (module docstring, item 5)."""

    def get(self, msg_id: bytes) -> None:
        return None

    def put(self, msg_id: bytes, result: object) -> None:
        pass

    def clear_expired(self) -> None:
        pass


class GuardedPubsub(Pubsub):
    """``Pubsub`` whose inbound read loop no peer can crash or flood.

    Upstream bug (py-libp2p 0.8.1, ``pubsub.py``): ``continuously_read_stream`` calls
    ``rpc_pb2.RPC.ParseFromString`` on a peer's frame and catches ``MessageTooLarge`` and stream
    errors, but not ``google.protobuf.message.DecodeError``; ``stream_handler`` catches
    ``StreamError``, ``ParseError`` (libp2p's own) and ``IncompleteReadError`` only. 65 bytes of
    bad protobuf therefore escaped to ``SwarmConn``'s nursery and stopped the swarm. A published
    message whose ``key`` field is not a protobuf public key made ``signature_validator`` raise
    inside the ``push_msg`` task, which stopped the pubsub service and the node. Also, every
    received message is spawned as a ``push_msg`` task before any limit applies; the signature
    check inside it fails silently; and gossipsub's spam limit (``_check_spam_protection``) runs
    only after validation and logs a WARNING per message.

    Upstream fix: catch ``DecodeError`` (and any ``Exception``) per stream in ``stream_handler``,
    reset the stream and report the peer to the router's scorer; give ``Pubsub`` an admission
    hook called from the read loop before ``run_task(push_msg, ...)`` (where a limiter and the
    signature check belong), and have a failed signature count as an invalid message (P4).

    Here :meth:`continuously_read_stream` is the upstream loop with those hooks; the message
    path after admission (``push_msg``: seen-cache, score gate, signature, validators, router)
    is upstream's. The signature of an admitted message is therefore verified twice (about 70 us
    each with ed25519), a price paid only for new messages within the rate limit.
    """

    p2p_limits: PubsubLimits
    p2p_counters: Counter[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validation_cache = NoVerdictCache()  # item 5

    def configure_guard(self, limits: PubsubLimits, counters: Counter[str]) -> None:
        self.p2p_limits = limits
        self.p2p_counters = counters
        self._msg_buckets = KeyedBuckets(limits.messages_per_second, limits.message_burst)
        self._rpc_buckets = KeyedBuckets(limits.rpcs_per_second, limits.rpc_burst)
        self._ip_buckets = KeyedBuckets(limits.messages_per_ip_per_second, limits.message_ip_burst)
        self._known_buckets = KeyedBuckets(limits.known_messages_per_second,
                                           limits.known_message_burst)
        self._known_ip_buckets = KeyedBuckets(limits.known_messages_per_ip_per_second,
                                              limits.known_message_ip_burst)
        self._known_sender_buckets = KeyedBuckets(limits.known_messages_per_sender_per_second,
                                                  limits.known_sender_burst,
                                                  max_keys=limits.known_sender_keys)
        self._ihave_buckets = KeyedBuckets(limits.max_ihave_ids_per_second,
                                           limits.max_ihave_ids_per_second)
        self._iwant_buckets = KeyedBuckets(limits.max_iwant_ids_per_second, limits.iwant_id_burst)
        self._graylisted_frames: Counter[ID] = Counter()

    # Set by the application (node/offers.py): the key of a sender it already holds valid
    # state for, or None. Called before the signature check: it must only peek at the payload.
    p2p_known_sender: Callable[[rpc_pb2.Message], Hashable | None] | None = None

    # -- penalties ---------------------------------------------------------------------------

    def _penalties(self) -> PeerPenalties | None:
        scorer = getattr(self.router, "scorer", None)
        return scorer if hasattr(scorer, "record_misbehaviour") else None

    def _misbehaved(self, peer: ID, amount: float) -> None:
        penalties = self._penalties()
        if penalties is not None:
            penalties.record_misbehaviour(peer, amount)

    # -- the read loop -----------------------------------------------------------------------

    async def stream_handler(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            await self.continuously_read_stream(stream)
        except DecodeError as error:
            self.p2p_counters["p2p.pubsub.malformed_rpc"] += 1
            self._misbehaved(peer_id, self.p2p_limits.malformed_rpc_penalty)
            rlog.warning("pubsub.malformed_rpc", "malformed pubsub RPC from %s (%s): stream reset, "
                         "peer graylisted", peer_id, error)
            await _reset_quietly(stream)
        except (StreamError, IncompleteReadError, IOException, RawConnError) as error:
            # upstream's handling of a broken stream: forget the peer's pubsub state
            log.debug("pubsub stream from %s failed: %r", peer_id, error)
            await _reset_quietly(stream)
            self._handle_dead_peer(peer_id)
        except Exception as error:  # our bug or py-libp2p's, triggered by this peer's input
            self.p2p_counters["p2p.pubsub.handler_error"] += 1
            self._misbehaved(peer_id, self.p2p_limits.malformed_rpc_penalty)
            rlog.warning("pubsub.handler_error", "pubsub RPC from %s raised %r: stream reset",
                         peer_id, error)
            await _reset_quietly(stream)

    async def continuously_read_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        ip = _stream_ip(stream)
        limits = self.p2p_limits
        counters = self.p2p_counters
        frames = self._frame_reader(stream)
        try:
            while self.manager.is_running:
                incoming = await frames.read_frame()
                # Cheapest checks first, before the frame is even parsed.
                if self._graylisted(peer_id):
                    counters["p2p.pubsub.drop.graylisted_rpc"] += 1
                    self._graylisted_frames[peer_id] += 1
                    if self._graylisted_frames[peer_id] >= limits.graylisted_frames_before_disconnect:
                        # Reading and decrypting a graylisted flood still costs us; a new
                        # connection costs the flooder a handshake (and it comes back graylisted:
                        # the scorer remembers misbehaviour across reconnects).
                        del self._graylisted_frames[peer_id]
                        counters["p2p.pubsub.disconnect.graylisted_flood"] += 1
                        rlog.warning("pubsub.disconnect", "disconnecting %s: graylisted and still "
                                     "sending", peer_id)
                        await _reset_quietly(stream)
                        self.manager.run_task(self._disconnect, peer_id)
                        return
                    continue
                if not self._rpc_buckets.allow(peer_id):
                    counters["p2p.pubsub.drop.rpc_rate"] += 1
                    self._misbehaved(peer_id, limits.rate_excess_penalty)
                    rlog.warning("pubsub.rpc_rate", "peer %s exceeds %.0f RPC frames/s: dropping",
                                 peer_id, limits.rpcs_per_second)
                    continue
                rpc_incoming = rpc_pb2.RPC()
                rpc_incoming.ParseFromString(incoming)  # DecodeError: handled in stream_handler

                if not self._consume_sender_record(rpc_incoming, peer_id):
                    counters["p2p.pubsub.drop.bad_peer_record"] += 1
                    continue

                for msg in rpc_incoming.publish:
                    if self._is_subscribed_to_msg(msg) and self._admit(peer_id, ip, msg):
                        await self._dispatch(peer_id, msg)

                if rpc_incoming.subscriptions:
                    if len(rpc_incoming.subscriptions) > self.max_subscriptions_per_rpc:
                        counters["p2p.pubsub.drop.too_many_subscriptions"] += 1
                    else:
                        for message in rpc_incoming.subscriptions:
                            self.handle_subscription(peer_id, message)

                if rpc_incoming.HasField("control"):
                    self._bound_gossip_control(peer_id, rpc_incoming.control)
                    await self.router.handle_rpc(rpc_incoming, peer_id)

                if stream.metric_send_channel is not None:
                    event = GossipsubEvent()
                    event.peer_id = peer_id.pretty()
                    event.message_size = len(incoming)
                    event.publish = bool(rpc_incoming.publish)
                    event.subopts = bool(rpc_incoming.subscriptions)
                    event.control = rpc_incoming.HasField("control")
                    await stream.metric_send_channel.send(event)
        except MessageTooLarge as error:
            counters["p2p.pubsub.drop.rpc_too_large"] += 1
            self._misbehaved(peer_id, limits.malformed_rpc_penalty)
            rlog.warning("pubsub.rpc_too_large", "pubsub RPC from %s too large: %s", peer_id, error)
            await _reset_quietly(stream)
        except StreamEOF:
            log.debug("pubsub stream from %s closed", peer_id)
        except (StreamError, IOException, RawConnError) as error:
            log.debug("pubsub stream from %s failed: %r", peer_id, error)

    async def _dispatch(self, peer: ID, msg: rpc_pb2.Message) -> None:
        """Hand an admitted message on to validation and forwarding: upstream spawns a task for
        each (``push_msg``)."""
        if self.manager.is_running:
            self.manager.run_task(self._push_msg_guarded, peer, msg)

    def _frame_reader(self, stream: INetStream) -> Any:
        """Where the read loop gets its RPC frames: upstream's reader (length prefix byte by
        byte). :class:`node.libp2p_perf.FastPubsub` buffers instead."""
        return _UpstreamFrames(stream, self.max_inbound_rpc_size)

    def _consume_sender_record(self, rpc: rpc_pb2.RPC, peer: ID) -> bool:
        """Upstream's handling of the RPC's signed peer record (verify and store it every time);
        False drops the RPC."""
        return maybe_consume_signed_record(rpc, self.host, peer)

    def _graylisted(self, peer: ID) -> bool:
        penalties = self._penalties()
        return penalties is not None and penalties.graylisted(peer, list(self.topic_ids))

    def _admit(self, peer: ID, ip: str, msg: rpc_pb2.Message) -> bool:
        """Pre-validation admission of one received message; False drops it."""
        counters = self.p2p_counters
        if self._is_msg_seen(msg):  # a duplicate: the cheapest drop, and not the peer's fault
            return False
        if self._known_lane(peer, ip, msg):
            counters["p2p.pubsub.admit.known_sender"] += 1
        elif not self._within_budget(peer, ip):
            return False
        penalties = self._penalties()
        topics = list(msg.topicIDs)
        if penalties is not None and not penalties.allow_publish(peer, topics):
            counters["p2p.pubsub.drop.below_publish_threshold"] += 1
            return False
        if self.strict_signing and not self._signature_ok(msg):
            # Provably bad: an honest relay verifies before forwarding.
            counters["p2p.pubsub.reject.bad_signature"] += 1
            if penalties is not None:
                for topic in topics:
                    penalties.record_reject(peer, topic)
            rlog.info("pubsub.bad_signature", "message with a bad envelope signature from %s", peer)
            return False
        return True

    def _signature_ok(self, msg: rpc_pb2.Message) -> bool:
        """The envelope signature check (a method so node.libp2p_perf can cache keys)."""
        return _signature_ok(msg)

    def _bound_gossip_control(self, peer: ID, control: rpc_pb2.ControlMessage) -> None:
        """Cut the IHAVE and IWANT entries of one RPC to the peer's budgets (in place)."""
        limits = self.p2p_limits
        counters = self.p2p_counters
        if control.ihave:
            entries = list(control.ihave)
            if len(entries) > limits.max_ihave_messages_per_rpc:
                counters["p2p.pubsub.drop.ihave_messages"] += len(entries) - limits.max_ihave_messages_per_rpc
                entries = entries[:limits.max_ihave_messages_per_rpc]
            kept = self._take_ids(peer, [(e.topicID, list(e.messageIDs)) for e in entries],
                                  self._ihave_buckets, "ihave")
            del control.ihave[:]
            for topic, ids in kept:
                control.ihave.add(topicID=topic, messageIDs=ids)
        if control.iwant:
            kept = self._take_ids(peer, [(None, list(e.messageIDs)) for e in control.iwant],
                                  self._iwant_buckets, "iwant")
            del control.iwant[:]
            for _, ids in kept:
                control.iwant.add(messageIDs=ids)

    def _take_ids(self, peer: ID, groups: list[tuple[Any, list[bytes]]], buckets: KeyedBuckets,
                  kind: str) -> list[tuple[Any, list[bytes]]]:
        """Unique ids from `groups` in order, as many as the peer's bucket has tokens for."""
        seen: set[bytes] = set()
        unique: list[tuple[Any, list[bytes]]] = []
        total = duplicates = 0
        for key, ids in groups:
            mine = []
            for mid in ids:
                if mid in seen:
                    duplicates += 1
                    continue
                seen.add(mid)
                mine.append(mid)
            unique.append((key, mine))
            total += len(mine)
        allowed = min(total, int(buckets.tokens(peer)))
        if allowed:
            buckets.allow(peer, allowed)
        if duplicates:
            self.p2p_counters[f"p2p.pubsub.drop.{kind}_duplicate_ids"] += duplicates
        if allowed < total:
            self.p2p_counters[f"p2p.pubsub.drop.{kind}_ids"] += total - allowed
            rlog.info(f"pubsub.{kind}_ids", "peer %s exceeds %s ids per second: %d dropped",
                      peer, kind.upper(), total - allowed)
        out = []
        for key, ids in unique:
            if allowed <= 0:
                break
            out.append((key, ids[:allowed]))
            allowed -= len(out[-1][1])
        return [(k, ids) for k, ids in out if ids]

    def _within_budget(self, peer: ID, ip: str) -> bool:
        """The ordinary per-peer and per-IP budgets of new messages."""
        counters = self.p2p_counters
        if not self._msg_buckets.allow(peer):
            counters["p2p.pubsub.drop.message_rate"] += 1
            self._misbehaved(peer, self.p2p_limits.rate_excess_penalty)
            rlog.warning("pubsub.message_rate", "peer %s exceeds %.0f new messages/s: dropping "
                         "before validation", peer, self.p2p_limits.messages_per_second)
            return False
        if not self._ip_buckets.allow(ip):
            counters["p2p.pubsub.drop.message_rate_ip"] += 1
            # Only a peer that has itself used most of its own budget pays: an honest peer that
            # shares the IP with a flooder (a devnet on one machine) forwards at the network's
            # rate and keeps its bucket nearly full.
            if self._msg_buckets.tokens(peer) < self.p2p_limits.message_burst / 2:
                self._misbehaved(peer, self.p2p_limits.rate_excess_penalty)
            rlog.warning("pubsub.message_rate_ip", "peers at %s exceed %.0f new messages/s "
                         "together: dropping before validation", ip,
                         self.p2p_limits.messages_per_ip_per_second)
            return False
        return True

    def _known_lane(self, peer: ID, ip: str, msg: rpc_pb2.Message) -> bool:
        """Whether a message from a known sender fits the known-sender budgets (per peer, per
        IP, per peer and sender). One that does not goes through the ordinary budgets."""
        known = self.p2p_known_sender
        sender = known(msg) if known is not None else None
        if sender is None:
            return False
        return (self._known_sender_buckets.allow((peer, sender))
                and self._known_buckets.allow(peer) and self._known_ip_buckets.allow(ip))

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except Exception as error:
            log.debug("disconnecting %s failed: %r", peer, error)

    async def _push_msg_guarded(self, peer: ID, msg: rpc_pb2.Message) -> None:
        """``push_msg`` runs as a service task: an exception there stopped the whole pubsub
        service (and the node); here it drops that one message."""
        try:
            await self.push_msg(peer, msg)
        except Exception as error:
            self.p2p_counters["p2p.pubsub.push_error"] += 1
            self._misbehaved(peer, self.p2p_limits.rate_excess_penalty)
            rlog.warning("pubsub.push_error", "processing a message from %s raised %r", peer, error)


class _UpstreamFrames:
    def __init__(self, stream: INetStream, max_length: int) -> None:
        self._stream = stream
        self._max = max_length

    async def read_frame(self) -> bytes:
        return await read_varint_prefixed_bytes_limited(self._stream, self._max)


def _stream_ip(stream: INetStream) -> str:
    try:
        addr = stream.get_remote_address()
        if addr:
            return str(addr[0])
    except Exception:
        pass
    return "?"


def _signature_ok(msg: rpc_pb2.Message) -> bool:
    """py-libp2p's ``signature_validator`` raises (``DecodeError``, ``ValueError``) on an
    undecodable ``key`` field instead of returning False; inside ``push_msg`` that exception
    stopped the pubsub service, and the node with it."""
    try:
        return bool(signature_validator(msg))
    except Exception:
        return False


async def _reset_quietly(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# 2. every stream handler: an exception stays in its stream
# --------------------------------------------------------------------------------------------

_GUARD_MARK = "_gpumarket_guarded"


def guard_stream_handlers(host: IHost, counters: Counter[str]) -> None:
    """Wrap the swarm's one entry point for inbound streams (``BasicHost._swarm_stream_handler``:
    multistream-select, then the protocol's handler) so that an ``Exception`` from any handler
    resets that stream, is counted and logged (rate-limited), and goes no further.

    Upstream bug: ``SwarmConn._handle_muxed_stream`` awaits the handler inside the connection's
    nursery, which runs as a task of the swarm's service manager; an exception from any handler
    (a protocol handler's bug, a parser that raises on hostile bytes) cancels the swarm.
    Upstream fix: the same ``try/except Exception`` in ``_handle_muxed_stream``. Cancellation
    (a ``BaseException``) still propagates. Idempotent."""
    network = host.get_network()
    inner = network.common_stream_handler  # type: ignore[attr-defined]
    if getattr(inner, _GUARD_MARK, False):
        return

    async def guarded(stream: INetStream) -> None:
        try:
            await inner(stream)
        except Exception as error:
            protocol = None
            try:
                protocol = stream.get_protocol()
            except Exception:
                pass
            counters["p2p.stream.handler_error"] += 1
            rlog.warning(("stream.handler_error", str(protocol)),
                         "stream handler for %s from %s raised %r: stream reset", protocol,
                         _peer_of(stream), error)
            await _reset_quietly(stream)

    setattr(guarded, _GUARD_MARK, True)
    network.set_stream_handler(guarded)


def _peer_of(stream: INetStream) -> Any:
    try:
        return stream.muxed_conn.peer_id
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# 3. inbound connection slots, per-IP and per-peer limits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnLimitsConfig:
    max_inbound_per_ip: int = 32  # concurrent, counted from accept (before the handshake)
    max_inbound_per_peer: int = 3  # concurrent inbound connections of one peer id
    # New inbound connections (each one a Noise handshake to pay for) per remote IP, a token
    # bucket: the concurrent cap alone lets an address connect and drop as fast as it likes.
    inbound_per_ip_per_second: float = 10.0
    inbound_per_ip_burst: float = 40.0


class ConnLimits:
    """Concurrent inbound connection counts per remote IP and per peer id. Every ``acquire``
    that returns True has exactly one ``release`` (in a ``finally``)."""

    def __init__(self, config: ConnLimitsConfig) -> None:
        self.config = config
        self.per_ip: Counter[str] = Counter()
        self.per_peer: Counter[ID] = Counter()
        self.rate_per_ip = KeyedBuckets(config.inbound_per_ip_per_second,
                                        config.inbound_per_ip_burst)

    def allow_new_from(self, ip: str) -> bool:
        """Whether `ip` may start one more inbound connection now (its rate)."""
        return self.rate_per_ip.allow(ip)

    def acquire_ip(self, ip: str) -> bool:
        if self.per_ip[ip] >= self.config.max_inbound_per_ip:
            return False
        self.per_ip[ip] += 1
        return True

    def release_ip(self, ip: str) -> None:
        _decrement(self.per_ip, ip)

    def acquire_peer(self, peer: ID) -> bool:
        if self.per_peer[peer] >= self.config.max_inbound_per_peer:
            return False
        self.per_peer[peer] += 1
        return True

    def release_peer(self, peer: ID) -> None:
        _decrement(self.per_peer, peer)


def _decrement(counter: Counter[Any], key: Hashable) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class GuardedSwarm(Swarm):
    """The swarm ``new_host()`` builds, moved onto this subclass (see :func:`guard_swarm`).

    Upstream bug (py-libp2p 0.8.1, ``network/swarm.py``): ``_handle_inbound_connection`` takes a
    slot of ``_inbound_limiter`` (max_connections - min_connections = 250) and releases it when
    ``_do_handle_inbound_connection`` returns, which, after a successful upgrade, awaits
    ``self.manager.wait_finished()``: the swarm's end. 250 connect-and-drop cycles, or plain
    renter churn, locked a provider out of inbound connections for good.
    Upstream fix: after ``upgrade_inbound_raw_conn`` wait for that connection's close
    (``SwarmConn.event_closed``), not the swarm's. The handler must stay alive while the
    connection lives (trio's ``serve_listeners`` closes the socket when it returns).

    Added limits (documented in node/host.py): at most ``inbound_per_ip_per_second`` new
    inbound connections per remote IP (a token bucket) and ``max_inbound_per_ip`` concurrent
    ones, both counted from accept so a flood of handshakes from one address is refused before
    any Noise work; at most ``max_inbound_per_peer`` concurrent inbound
    connections per authenticated peer id, checked in ``add_conn`` before the connection is
    registered (so no notifications, identify or pubsub streams are spent on it).
    """

    p2p_conn_limits: ConnLimits
    p2p_counters: Counter[str]

    async def _handle_inbound_connection(self, read_write_closer: Any, maddr: Any) -> None:
        ip = _remote_ip(read_write_closer)
        if not self.p2p_conn_limits.allow_new_from(ip):
            self.p2p_counters["p2p.conn.refused.per_ip_rate"] += 1
            rlog.info("conn.refused.per_ip_rate", "inbound connection from %s refused: more than "
                      "%.0f new connections/s from that IP", ip,
                      self.p2p_conn_limits.config.inbound_per_ip_per_second)
            try:
                await read_write_closer.close()
            except Exception:
                pass
            return
        if not self.p2p_conn_limits.acquire_ip(ip):
            self.p2p_counters["p2p.conn.refused.per_ip"] += 1
            rlog.info("conn.refused.per_ip", "inbound connection from %s refused: %d open from "
                      "that IP", ip, self.p2p_conn_limits.config.max_inbound_per_ip)
            try:
                await read_write_closer.close()
            except Exception:
                pass
            return
        try:
            self.p2p_counters["p2p.conn.inbound"] += 1
            await super()._handle_inbound_connection(read_write_closer, maddr)
        finally:
            self.p2p_conn_limits.release_ip(ip)

    async def _do_handle_inbound_connection(self, read_write_closer: Any, maddr: Any,
                                            failure_event: Any) -> None:
        if isinstance(read_write_closer, IMuxedConn):  # QUIC etc.: not a transport we run
            await super()._do_handle_inbound_connection(read_write_closer, maddr, failure_event)
            return
        remote_maddr = self._build_remote_multiaddr(read_write_closer)
        if remote_maddr is not None and not await self.connection_gate.is_allowed(remote_maddr):
            try:
                await read_write_closer.close()
            except Exception:
                pass
            return
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as error:
            log.debug("inbound connection on %s failed: %r", maddr, error)
            try:
                await raw_conn.close()
            except Exception:
                pass
            return
        await _wait_closed(self, muxed_conn)

    async def add_conn(self, muxed_conn: IMuxedConn, direction: str = "unknown") -> Any:
        if direction != "inbound":
            return await super().add_conn(muxed_conn, direction)
        peer = muxed_conn.peer_id
        if not self.p2p_conn_limits.acquire_peer(peer):
            self.p2p_counters["p2p.conn.refused.per_peer"] += 1
            rlog.info("conn.refused.per_peer", "inbound connection from %s refused: %d open "
                      "from that peer", peer, self.p2p_conn_limits.config.max_inbound_per_peer)
            try:
                await muxed_conn.close()
            except Exception:
                pass
            raise SwarmException("too many inbound connections from this peer")
        try:
            swarm_conn = await super().add_conn(muxed_conn, direction)
        except BaseException:
            self.p2p_conn_limits.release_peer(peer)
            raise
        if getattr(swarm_conn, "muxed_conn", None) is muxed_conn and not swarm_conn.is_closed:
            swarm_conn._p2p_peer_slot = True  # released by remove_conn, whoever closes it
        else:  # closed while registering, or a dedup answer (an existing connection)
            self.p2p_conn_limits.release_peer(peer)
        return swarm_conn

    def remove_conn(self, swarm_conn: Any) -> None:
        super().remove_conn(swarm_conn)
        if getattr(swarm_conn, "_p2p_peer_slot", False):
            swarm_conn._p2p_peer_slot = False
            self.p2p_conn_limits.release_peer(swarm_conn.muxed_conn.peer_id)


async def _wait_closed(swarm: Swarm, muxed_conn: IMuxedConn) -> None:
    for conn in list(swarm.connections.get(muxed_conn.peer_id, ())):
        if conn.muxed_conn is muxed_conn:
            await conn.event_closed.wait()
            return
    event = getattr(muxed_conn, "event_closed", None)
    if isinstance(event, trio.Event):
        await event.wait()


def _remote_ip(read_write_closer: Any) -> str:
    try:
        addr = read_write_closer.get_remote_address()
        if addr:
            return str(addr[0])
    except Exception:
        pass
    return "?"


def guard_swarm(swarm: Any, limits: ConnLimitsConfig, counters: Counter[str]) -> None:
    """Move this swarm instance onto :class:`GuardedSwarm` (``new_host()`` builds the swarm, so we
    cannot choose its class; a subclass adds no slots, so ``__class__`` assignment is allowed).
    Idempotent. Any other swarm class is refused rather than silently left unguarded."""
    if type(swarm) is Swarm:
        swarm.__class__ = GuardedSwarm
    elif not isinstance(swarm, GuardedSwarm):
        raise TypeError(f"cannot guard a {type(swarm).__name__}: expected py-libp2p's Swarm")
    swarm.p2p_conn_limits = ConnLimits(limits)
    swarm.p2p_counters = counters


# --------------------------------------------------------------------------------------------
# 4. py-libp2p's own peer-triggered log lines
# --------------------------------------------------------------------------------------------

_log_filter: RateLimitFilter | None = None


def install_libp2p_log_limits(burst: int = 5, interval: float = 60.0) -> RateLimitFilter:
    """Add one :class:`RateLimitFilter` (INFO and above) to every ``libp2p.*`` logger that exists
    (they are created when py-libp2p's modules are imported, which :mod:`node.host` has done by
    now). A logging filter applies only to records of the logger it is attached to, hence one
    per logger. Idempotent; returns the shared filter.

    Upstream: log peer-triggered events at DEBUG, or through a rate limiter."""
    global _log_filter
    if _log_filter is None:
        _log_filter = RateLimitFilter(burst=burst, interval=interval, min_level=logging.INFO)
    for name in list(logging.Logger.manager.loggerDict):
        if name == "libp2p" or name.startswith("libp2p."):
            logger = logging.getLogger(name)
            if _log_filter not in logger.filters:
                logger.addFilter(_log_filter)
    return _log_filter


def apply_host_patches(host: IHost, *, conn_limits: ConnLimitsConfig, counters: Counter[str]) -> None:
    """Everything above that applies to a host (the pubsub guard is a class we instantiate)."""
    guard_swarm(host.get_network(), conn_limits, counters)
    guard_stream_handlers(host, counters)
    install_libp2p_log_limits()


__all__ = [
    "LIBP2P_VERSION", "ConnLimits", "ConnLimitsConfig", "GuardedPubsub", "GuardedSwarm",
    "PubsubLimits", "apply_host_patches", "check_libp2p_version", "guard_stream_handlers",
    "guard_swarm", "install_libp2p_log_limits",
]
