"""CPU fixes for py-libp2p 0.8.1's gossip path: fewer frames, fewer signatures, no dead logging.

The sibling of :mod:`node.libp2p_patches` (hostile-peer fixes), applied from the same place,
:class:`node.host.GossipHost` (``HostConfig.fast_gossip``, on by default), in the same way:
subclasses we instantiate ourselves, nothing patched process-wide. Pinned to py-libp2p 0.8.1
(:func:`node.libp2p_patches.check_libp2p_version`). Wire compatibility: every frame and protobuf
these classes send is one py-libp2p 0.8.1 could send (tests/interop runs them against js-libp2p
and against unpatched py-libp2p).

Measured before (issue 16): one gossiped 750-byte offer cost a node with 6 mesh peers 12.7-22.5
ms of CPU: 37-43 transport frames in and 39-42 out and ~515 trio task steps per message.
Figures after: tests/benchmarks/bench_gossip_cpu.py and README.md ("What the node changes in
py-libp2p").

Each patch, as it could be proposed upstream (docs/upstream/libp2p-gossip-cpu.md has the
maintainers' version of each):

1. :class:`BatchedYamux` / :class:`BatchedYamuxStream`: yamux receive-window credit is returned
   when half the window is owed, not after every ``read()``.
   Upstream (``stream_muxer/yamux/yamux.py``): ``_auto_tune_and_send_window_update`` has
   go-yamux's half-window hysteresis, but its ``PY_YAMUX_RELEASE_ON_READ`` branch (on unless an
   environment variable says otherwise) sends a WINDOW_UPDATE for the bytes of every read that
   did not reach the threshold: one extra frame, an extra Noise encryption and a write-lock
   pass per read, each way. go-yamux (``sendWindowUpdate``) and js-yamux send credit only when
   at least half the window is owed, so this is also what a peer expects. The arithmetic runs
   without ``window_lock``: it does not await, and under trio a block without an await is atomic,
   so the lock bought nothing but a scheduling point. ``_write_frame`` decoded every outgoing
   header to build a DEBUG f-string even with DEBUG off; here that happens only when the
   muxer's logger is enabled for DEBUG.
2. :class:`ConfiguredMuxerMultistream`: the yamux class given to ``new_host`` is the one
   used. Upstream (``stream_muxer/muxer_multistream.py``, ``new_conn``) builds every yamux
   connection with the hard-coded ``Yamux``, so without this 1. never runs.
3. :class:`FrameReader` (used by :class:`FastPubsub`): pubsub reads its RPC frames from a buffer
   filled by reads of whatever the stream has (up to 64 KiB), instead of the length prefix one
   byte per ``read(1)`` and then the body. Upstream (``utils/varint.py``,
   ``read_varint_prefixed_bytes_limited``): 2-4 stream reads per RPC, each through the stream's
   state lock, the muxer's stream lock and (with 1.) a window update. Same limits and errors:
   the length is checked against the maximum before any body is buffered (``MessageTooLarge``),
   an over-long varint is a ``ParseError``, the end of stream mid-frame an
   ``IncompleteReadError``.
4. :class:`FastPubsub`: the signed peer record (``senderRecord``, 216 bytes, a py-libp2p-only
   field of the pubsub RPC) is sent once per stream and verified once per distinct record.
   Upstream: every RPC (each forwarded message, each IDONTWANT/IHAVE/GRAFT) carries it, and each
   receiver verifies its ed25519 signature and updates the certified address book for every RPC,
   control RPCs twice (``continuously_read_stream`` and ``GossipSub.handle_rpc``): about 80 us
   per send and 76 us per receive, measured. Here ``write_msg`` omits the record when this stream
   has already carried the same bytes (the first RPC on a stream, and the first after our record
   changes, still carry it), and the read loop skips verification when a peer resends the record
   it last sent us and that we verified less than ``PEER_RECORD_REVERIFY_S`` ago (so the
   address book's 2-hour TTL is still refreshed), and clears the field before the router sees the
   RPC. A changed or new record is verified exactly as upstream does; a bad one still drops the
   RPC. go-libp2p and js-libp2p do not send the field at all and ignore it.
5. :class:`FastGossipSub`: IDONTWANT only for received messages whose data is at least
   ``IDONTWANT_MIN_BYTES`` (1 KiB, go-libp2p's default threshold), never for our own publishes.
   Upstream (``GossipSub.publish``): an IDONTWANT RPC to every v1.2 mesh peer for every message,
   including the ones we publish; for a 750-byte offer that is 5 RPCs out and 5 in per message
   per node, each costing more than the duplicate it saves. The gossipsub v1.2 spec makes
   IDONTWANT an optimisation for large messages; nothing requires it for small ones.
6. :class:`FastPubsub` again: each received message's envelope signature is verified once, and
   a copy that arrives while the first copy is still being validated is dropped at once.
   Upstream: the read loop (here :meth:`GuardedPubsub._admit`, which verifies the signature so
   that a bad one can be penalised) and then ``push_msg`` each verify it (about 100 us each);
   and a message counts as seen only after validation, so in a mesh the copies arriving from
   other peers meanwhile are each verified and each spawn a task that drops them. go-libp2p and
   nim-libp2p drop duplicates during validation the same way.
7. :class:`FastPubsub` once more: a received message whose topic validators are all synchronous
   is validated and forwarded in the stream's read loop, not in a task of its own. Upstream
   (``continuously_read_stream``) spawns one ``push_msg`` task per message through the service
   manager (5-6% of a relay's CPU, measured) and so has no backpressure: a peer's messages
   become tasks as fast as its frames are read. Inline, validation and forwarding (which only
   queue RPCs) finish before the next frame of that peer is read; order per peer is kept. A
   message with an async validator (which may wait up to 5 s) is still spawned as upstream.
8. :func:`quiet_libp2p_debug`: the ``libp2p`` logger stays at INFO unless it is configured
   explicitly (or ``GPUMARKET_LIBP2P_DEBUG=1``), so that turning on DEBUG for the node
   (``--debug``, or a root logger at DEBUG in tests) does not make py-libp2p format ~40 DEBUG
   records per message. Upstream: use ``%``-style arguments (or ``isEnabledFor``) in hot paths,
   as 1. does for ``_write_frame``.

9. :class:`BatchedYamuxStream` and :class:`BatchedYamux` again: a stream write takes no lock
   (and passes no scheduling point) that nobody else holds. Upstream (``YamuxStream.write``,
   ``Yamux._write_frame``): every frame passes the stream's write lock, its window lock and the
   connection's write lock, each acquire a scheduling point even when free, and then one more
   ``checkpoint()``: with NetStream's lock, the TCP stream's lock and the socket send, 7
   scheduling points per small write (3 patched, measured). Here the window check and debit
   and the header, which contain no ``await``, run without the stream's locks when no other
   writer holds them; the connection's write lock is taken with ``acquire_nowait`` when free
   (trio's Lock is fair, so this never jumps a waiter); the trailing checkpoint is dropped
   because the secured connection's write is a checkpoint already. Frames still go out whole
   and in order; a contended lock, a large write or an empty window takes upstream's path.
10. :class:`FastTCPStream`: the TCP stream under each patched connection takes its read and
   write lock without a scheduling point when free. Upstream (``io/trio.py``,
   ``TrioTCPStream``): a lock pass per socket read (two per Noise frame received) and per
   write, each a scheduling point, before the socket call that is one already. Every call is
   still a checkpoint, errors included. Items 9-10 together: 16.3 -> 8.2 trio task steps and
   about 30% less CPU per 750-byte stream message, both ends (tests/benchmarks/
   bench_stream_steps.py; upstream: 25.6 steps).
11. :class:`FastTCPStream` again: a connection's read loop takes the frames that one socket
   read brought without a socket read (and its scheduling point) per frame. Upstream: per received
   frame, two socket reads (a Noise message's 2-byte length, then its body, each asking the
   socket for exactly that many bytes) and a pass of the connection's ``streams_lock`` (and a
   stream's ``window_lock`` for a WINDOW_UPDATE), each a checkpoint even when free. When the
   process is short of CPU (a node under attack on a busy machine), every checkpoint waits a
   whole round of the trio run queue, so a connection's frames were read at a few per round:
   a peer that sends many small frames (upstream py-libp2p returns window credit after every
   read and reads pubsub length prefixes a byte at a time: about six 12-byte WINDOW_UPDATEs per
   gossip message it reads) got ahead of that rate, and a new stream's SYN and
   multistream-select on that connection waited behind the backlog in the socket: measured in
   tests/benchmarks/bench_soak.py (``--stall-dump``), up to 300 KB (3,853 lone yamux
   headers) unread by the provider on the renter's connection while the renter's stream opens
   timed out after 5 s and fresh connections were served. Here a socket read asks for up to
   ``READ_AHEAD`` (64 KiB) and keeps what was not asked for; a later read is served from it
   with no scheduling point (a read that reaches the socket is still one): per WINDOW_UPDATE
   frame 2 scheduling points remain (the lock passes), from 4 with items 1-10 and 6 upstream.
   Taking those lock passes without a scheduling point too (``acquire_nowait`` when free, as
   item 9 does for writes) brought it to 0.005, but changed when a dialler saw a refused
   connection close (tests/node/test_hostile_p2p.py's per-peer refusal test then saw redials);
   not adopted until that is understood. Upstream fix: a buffered reader under the Noise
   session (as go-libp2p's ``bufio`` under its secure transport).

"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import OrderedDict
from typing import Any

import trio
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError, MessageTooLarge
from libp2p.io.trio import TrioTCPStream
from libp2p.peer.id import ID
from libp2p.pubsub.exceptions import NoPubsubAttached
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import ValidationError
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux import yamux as _yamux
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from node.libp2p_patches import GuardedPubsub, check_libp2p_version

check_libp2p_version()

log = logging.getLogger(__name__)
_yamux_log = _yamux.logger  # the muxer's own logger: its DEBUG switch is the user's to set

_YAMUX_HEADER = _yamux.YAMUX_HEADER_FORMAT
_MAX_FRAME_DATA = _yamux.MAX_MESSAGE_SIZE - _yamux.HEADER_SIZE  # upstream's largest DATA chunk
_pack_header = struct.pack
READ_CHUNK = 64 * 1024  # bytes asked of the stream per read (= yamux's largest DATA frame)
READ_AHEAD = 64 * 1024  # item 11: bytes asked of a TCP socket per read (kept until asked for)
IDONTWANT_MIN_BYTES = 1024  # go-libp2p's GossipSubIDontWantMessageThreshold
PEER_RECORD_REVERIFY_S = 600.0  # re-verify (and refresh the 2 h address-book TTL) this often
MAX_REMEMBERED_RECORDS = 4096  # peers whose last verified record we remember


# --------------------------------------------------------------------------------------------
# 1-2. yamux: window credit at half the window; no header decoding for a disabled DEBUG
# line; the configured yamux class used
# --------------------------------------------------------------------------------------------


class BatchedYamuxStream(YamuxStream):
    """A yamux stream that returns receive-window credit only when half the window is owed
    (go-yamux's rule). See the module docstring, item 1."""

    def _owed_credit(self) -> int:
        """Credit to send now (0: not yet); updates ``recv_window`` for what it returns."""
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)  # read, not yet credited
        if owed <= 0 or owed < self.target_recv_window // 2:
            return 0
        self.recv_window += owed
        self._pending_recv_release = 0
        return owed + self._apply_autotune_epoch(buffered)

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        increment = self._owed_credit()
        if increment > 0:
            await self.send_window_update(increment)

    async def write(self, data: bytes) -> None:
        """Item 9: a write that fits in one frame and in the send window, while no other
        writer of this stream holds its locks, is framed without taking them: the check, the
        window debit and the header involve no ``await``, so under trio nothing can interleave
        with them; upstream's two lock passes were two scheduling points and nothing else.
        Anything else (a large write, an empty window, a closed stream, a contended lock) is
        upstream's ``write``."""
        size = len(data)
        if (0 < size <= _MAX_FRAME_DATA and size <= self.send_window and not self.send_closed
                and not self.closed and self.rw_lock._writer_lock.value
                and not self.window_lock.locked()):
            self.send_window -= size
            await self.conn._write_frame(
                _pack_header(_YAMUX_HEADER, 0, _yamux.TYPE_DATA, 0, self.stream_id, size) + data)
            return
        await super().write(data)


class FastTCPStream(TrioTCPStream):
    """Item 10: py-libp2p's TCP stream wrapper whose read and write lock is taken without a
    scheduling point when it is free. Upstream (``io/trio.py``, ``TrioTCPStream``): each
    ``read``/``write`` acquires ``read_lock``/``write_lock`` (a scheduling point even when free,
    and these are almost never contended: one reader task, and writes serialised by the muxer)
    and then calls the socket, whose successful send or receive is a scheduling point of its
    own. Same errors as upstream; a call that ends in an error (where the socket may not have
    yielded) passes a scheduling point before it returns or raises, so every call is still a
    checkpoint. trio's Lock is fair: ``acquire_nowait`` refuses while anyone waits."""

    async def write(self, data: bytes) -> None:
        lock = self.write_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as error:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}",
                                        transport="tcp") from error
        except trio.ClosedResourceError:
            await trio.lowlevel.cancel_shielded_checkpoint()  # upstream: closed locally, no error
        finally:
            lock.release()

    async def read(self, n: int | None = None) -> bytes:
        # Item 11: what an earlier socket read brought beyond what was asked is served first,
        # with no scheduling point (see the module docstring).
        ahead = self.__dict__.get("_ahead")
        if ahead and n != 0:
            if n is None or n >= len(ahead):
                data = bytes(ahead)
                ahead.clear()
            else:
                data = bytes(ahead[:n])
                del ahead[:n]
            return data
        lock = self.read_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if n is not None and n == 0:
                await trio.lowlevel.checkpoint()
                return b""
            if n is None:
                return await self.stream.receive_some(n)
            data = await self.stream.receive_some(max(n, READ_AHEAD))
            if len(data) > n:
                if ahead is None:
                    ahead = self.__dict__["_ahead"] = bytearray()
                ahead += memoryview(data)[n:]
                data = data[:n]
            return data
        except trio.BrokenResourceError as error:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}",
                                        transport="tcp") from error
        except trio.ClosedResourceError:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return b""  # upstream: closed locally, EOF
        finally:
            lock.release()


def _fast_tcp(secured_conn: Any) -> None:
    """Move the TCP stream under a Noise session onto :class:`FastTCPStream` (a subclass adds
    no slots, so ``__class__`` assignment is allowed). Other transports are left as they are."""
    io = getattr(getattr(secured_conn, "conn", None), "read_writer", None)
    raw = getattr(io, "read_write_closer", None)
    tcp = getattr(raw, "stream", None)
    if type(tcp) is TrioTCPStream:
        tcp.__class__ = FastTCPStream


class BatchedYamux(Yamux):
    """The yamux muxer whose streams are :class:`BatchedYamuxStream` (``new_host`` takes the
    muxer class in ``muxer_opt``). Streams are created inside upstream's ``open_stream`` and
    ``handle_incoming``; their class changes before the stream is handed to its user, which is
    the only caller of ``read`` (the only method that differs). Needs
    :func:`use_configured_muxer` on the host (upstream ignores the configured yamux class)."""

    def __init__(self, secured_conn: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(secured_conn, *args, **kwargs)
        _fast_tcp(secured_conn)  # items 10-11

    async def open_stream(self) -> YamuxStream:
        return _batched(await super().open_stream())

    async def accept_stream(self) -> Any:
        return _batched(await super().accept_stream())

    async def _write_frame(self, data: bytes) -> None:
        if _yamux_log.isEnabledFor(logging.DEBUG):
            await super()._write_frame(data)
            return
        # Item 9: the write lock is taken without a scheduling point when it is free (trio's
        # Lock is fair: acquire_nowait fails while anyone waits), and no checkpoint follows
        # the write: the secured connection's write is itself a checkpoint (its TCP stream
        # takes a lock and the socket send yields), so each frame still is one.
        lock = self._write_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.secured_conn.write(data)
        finally:
            lock.release()


def _batched(stream: Any) -> Any:
    if type(stream) is YamuxStream:
        stream.__class__ = BatchedYamuxStream
    return stream


class ConfiguredMuxerMultistream(MuxerMultistream):
    """Upstream bug (``stream_muxer/muxer_multistream.py``, ``new_conn``): when yamux is
    negotiated the connection is built with the hard-coded ``Yamux`` class, ignoring the class
    given in ``new_host(muxer_opt=...)`` (mplex and others use it). Upstream fix: construct
    ``transport_class`` in the yamux branch too. Without this, :class:`BatchedYamux` is never
    used."""

    async def new_conn(self, conn: Any, peer_id: ID) -> Any:
        protocol, transport_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout)
        if protocol == YAMUX_PROTOCOL_ID and issubclass(transport_class, Yamux):
            muxed = transport_class(conn, peer_id, is_initiator=conn.is_initiator,
                                    on_close=_no_op)
        else:
            muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


async def _no_op() -> None:
    pass


def use_configured_muxer(host: Any) -> None:
    """Move this host's muxer negotiator onto :class:`ConfiguredMuxerMultistream` (``new_host``
    builds it; a subclass adds no slots, so ``__class__`` assignment is allowed). Idempotent;
    any other class is refused rather than silently left as it is."""
    negotiator = host.get_network().upgrader.muxer_multistream
    if type(negotiator) is MuxerMultistream:
        negotiator.__class__ = ConfiguredMuxerMultistream
    elif not isinstance(negotiator, ConfiguredMuxerMultistream):
        raise TypeError(f"cannot patch a {type(negotiator).__name__}: expected MuxerMultistream")


# --------------------------------------------------------------------------------------------
# 3. pubsub frames from a buffer
# --------------------------------------------------------------------------------------------


class FrameReader:
    """Varint-length-prefixed frames from a stream, read in chunks of what the stream has.

    ``read_frame`` returns one frame's body. The maximum length is checked as soon as the prefix
    is complete, before the body is waited for; at most one partial frame plus one chunk is ever
    buffered."""

    def __init__(self, stream: Any, max_length: int, chunk: int = READ_CHUNK) -> None:
        if max_length <= 0:
            raise ValueError("max_length must be greater than 0")
        self._stream = stream
        self._max = max_length
        self._chunk = chunk
        self._buf = bytearray()
        self.reads = 0  # stream reads so far (tests compare it with upstream's)

    def _next_frame(self) -> bytes | None:
        buf = self._buf
        length = 0
        shift = 0
        for i in range(min(len(buf), 10)):
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                start = i + 1
                break
            shift += 7
        else:
            if len(buf) >= 10:
                raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
            return None  # prefix incomplete
        if length > self._max:
            raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {self._max}")
        end = start + length
        if len(buf) < end:
            return None
        frame = bytes(buf[start:end])
        del buf[:end]
        return frame

    async def read_frame(self) -> bytes:
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            data = await self._stream.read(self._chunk)
            self.reads += 1
            if not data:
                raise IncompleteReadError("Stream ended inside a length-prefixed frame",
                                          expected_bytes=1, received_bytes=0)
            self._buf += data


# --------------------------------------------------------------------------------------------
# 4, 6, 7. pubsub: the signed peer record once per stream, verified once per distinct record;
# each message's signature checked once; no task per message
# --------------------------------------------------------------------------------------------


class FastPubsub(GuardedPubsub):
    """:class:`GuardedPubsub` with buffered frame reads (item 3) and the signed peer record sent
    once per stream and verified once per distinct record (item 4); items 6 and 7 below."""

    def _frame_reader(self, stream: Any) -> Any:
        return FrameReader(stream, self.max_inbound_rpc_size)

    def _consume_sender_record(self, rpc: rpc_pb2.RPC, peer: ID) -> bool:
        if not rpc.HasField("senderRecord"):
            return True
        records = self._verified_records()
        record = rpc.senderRecord
        known = records.get(peer)
        now = time.monotonic()
        if known is not None and known[0] == record and now - known[1] < PEER_RECORD_REVERIFY_S:
            self.p2p_counters["p2p.pubsub.peer_record.reused"] += 1
        else:
            if not maybe_consume_signed_record(rpc, self.host, peer):
                records.pop(peer, None)
                return False
            self.p2p_counters["p2p.pubsub.peer_record.verified"] += 1
            records[peer] = (record, now)
            records.move_to_end(peer)
            while len(records) > MAX_REMEMBERED_RECORDS:
                records.popitem(last=False)
        rpc.ClearField("senderRecord")  # consumed: GossipSub.handle_rpc would verify it again
        return True

    # -- item 6: each message's signature verified once, duplicates in flight dropped ------

    def _admit(self, peer: ID, ip: str, msg: rpc_pb2.Message) -> bool:
        msg_id = self._msg_id_constructor(msg)
        in_flight = self._in_flight()
        if msg_id in in_flight:
            # A copy of a message whose first copy is still being validated: upstream admits it
            # (it is not "seen" until validated), checks its signature again, spawns a task
            # for it, and drops it there.
            self.p2p_counters["p2p.pubsub.drop.duplicate_in_flight"] += 1
            return False
        if not super()._admit(peer, ip, msg):  # its envelope signature is checked here
            return False
        in_flight.add(msg_id)
        return True

    async def _dispatch(self, peer: ID, msg: rpc_pb2.Message) -> None:
        # item 7: validate and forward in the read loop when every validator is synchronous
        if any(v.is_async for v in self.get_msg_validators(msg)):
            await super()._dispatch(peer, msg)  # a slow validator must not stall this stream
        elif self.manager.is_running:
            self.p2p_counters["p2p.pubsub.inline"] += 1
            await self._push_msg_guarded(peer, msg)

    async def _push_msg_guarded(self, peer: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super()._push_msg_guarded(peer, msg)
        finally:
            self._in_flight().discard(self._msg_id_constructor(msg))

    def _in_flight(self) -> set[bytes]:
        in_flight = self.__dict__.get("_p2p_in_flight")
        if in_flight is None:
            in_flight = self._p2p_in_flight = set()
        return in_flight

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        """Upstream's ``push_msg`` (0.8.1) with one change, marked: a message from the network
        reaches it only through :meth:`_admit`, which has already checked its envelope signature
        (and penalised a bad one), so it is not checked a second time (about 100 us per message:
        key extraction, re-serialisation and an ed25519 verification). Our own publishes are
        signed by us and were never checked upstream either."""
        if self.is_peer_blacklisted(msg_forwarder):
            return
        if self.is_peer_blacklisted(ID(msg.from_id)):
            return
        if self._is_msg_seen(msg):
            return
        scorer = getattr(self.router, "scorer", None)
        if scorer is not None and not scorer.allow_publish(msg_forwarder, list(msg.topicIDs)):
            return
        # changed: no second signature_validator(msg) here (see the docstring)
        try:
            await self.validate_msg(msg_forwarder, msg)
        except ValidationError:
            if scorer is not None:
                for topic in msg.topicIDs:
                    scorer.on_invalid_message(msg_forwarder, topic)
            return
        self._mark_msg_seen(msg)
        if scorer is not None:
            for topic in msg.topicIDs:
                scorer.on_first_delivery(msg_forwarder, topic)
        self_id = self.my_id
        if msg.from_id == self_id.to_bytes() and msg_forwarder != self_id:
            return  # claims to be from us but was not published here
        self.notify_subscriptions(msg)
        await self.router.publish(msg_forwarder, msg)

    def _verified_records(self) -> OrderedDict[ID, tuple[bytes, float]]:
        records = self.__dict__.get("_p2p_records")
        if records is None:
            records = self._p2p_records = OrderedDict()
        return records

    def _handle_dead_peer(self, peer_id: ID) -> None:
        super()._handle_dead_peer(peer_id)
        self._verified_records().pop(peer_id, None)

    async def write_msg(self, stream: Any, rpc_msg: rpc_pb2.RPC) -> bool:
        # Each RPC handed to write_msg is this stream's own copy (GossipSub.send_rpc copies per
        # peer; the other callers build one per peer), so clearing the field touches no other.
        if rpc_msg.senderRecord:
            record = rpc_msg.senderRecord
            if getattr(stream, "_p2p_sent_record", None) == record:
                rpc_msg.ClearField("senderRecord")
            else:
                stream._p2p_sent_record = record
        return await super().write_msg(stream, rpc_msg)


# --------------------------------------------------------------------------------------------
# 4-5. gossipsub: no peer record built per forwarded message; IDONTWANT only for large
# received messages
# --------------------------------------------------------------------------------------------


class FastGossipSub(GossipSub):
    """GossipSub that forwards without building a signed peer record per message (item 4) and
    sends IDONTWANT only for received messages of at least ``idontwant_min_bytes`` of data
    (item 5). A mixin-friendly subclass: put it before any other GossipSub subclass in the bases.

    :meth:`publish` is upstream's (0.8.1) with two changes, marked: the forwarded RPC carries no
    ``senderRecord`` (upstream called ``env_to_send_in_RPC`` for every message: 70-115 us, most
    of it ``host.get_addrs()``, and on a relay line about a fifth of all CPU once the frame count
    was down; the record reaches each peer in the hello RPC of our stream and, through
    :meth:`FastPubsub.write_msg`, whenever it changes), and IDONTWANT goes out only for a
    received message of at least ``idontwant_min_bytes`` of data."""

    idontwant_min_bytes: int = IDONTWANT_MIN_BYTES

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        if not self._check_spam_protection(msg_forwarder, pubsub_msg):
            return
        if not self._check_equivocation(pubsub_msg):
            return
        self.mcache.put(pubsub_msg)
        pubsub = self.pubsub
        if pubsub is None:
            raise NoPubsubAttached
        msg_id = pubsub.get_message_id(pubsub_msg)
        origin = ID(pubsub_msg.from_id)
        peers_gen = self._get_peers_to_send(
            pubsub_msg.topicIDs, msg_forwarder=msg_forwarder, origin=origin, msg_id=msg_id)
        rpc_msg = rpc_pb2.RPC(publish=[pubsub_msg])  # changed: no senderRecord

        # changed: IDONTWANT only for a received message of idontwant_min_bytes or more
        if msg_forwarder != pubsub.my_id and len(pubsub_msg.data) >= self.idontwant_min_bytes:
            await self._emit_idontwant_for_message(msg_id, pubsub_msg.topicIDs)

        await self._notify_observers(pubsub_msg.topicIDs, msg_id)

        scorer = self.scorer
        topics = list(pubsub_msg.topicIDs)
        for peer_id in peers_gen:
            if peer_id not in pubsub.peers:
                continue
            if scorer is not None and not scorer.allow_publish(peer_id, topics):
                continue
            self.send_rpc(peer_id, rpc_msg)

        # Upstream: queue the message for peers whose identify or subscription is pending.
        queued_peers: set[ID] = set()
        skip = (msg_forwarder, origin)
        now = time.time()
        for topic in pubsub_msg.topicIDs:
            if topic in pubsub.peer_topics:
                for peer_id in pubsub.peer_topics[topic]:
                    if peer_id in skip:
                        continue
                    if (peer_id not in self.peer_protocol and peer_id not in self.direct_peers
                            and peer_id not in queued_peers):
                        self._prune_pending_messages(peer_id)
                        self._pending_messages[peer_id].append((now, rpc_msg))
                        queued_peers.add(peer_id)
            for peer_id in pubsub.peers:
                if peer_id in skip or peer_id in self.direct_peers or peer_id in queued_peers:
                    continue
                if topic not in pubsub.peer_topics or peer_id not in pubsub.peer_topics[topic]:
                    self._prune_pending_messages(peer_id)
                    self._pending_messages[peer_id].append((now, rpc_msg))
                    queued_peers.add(peer_id)

        for topic in pubsub_msg.topicIDs:
            self.time_since_last_publish[topic] = int(now)
            self.recent_message_deliveries[topic].append(now)


# --------------------------------------------------------------------------------------------
# 8. py-libp2p's DEBUG logging stays off unless asked for
# --------------------------------------------------------------------------------------------


def quiet_libp2p_debug() -> None:
    """Set the ``libp2p`` logger to INFO if nobody configured its level (NOTSET) and
    ``GPUMARKET_LIBP2P_DEBUG`` is not 1: its children inherit it, so a root logger at DEBUG no
    longer reaches py-libp2p's per-frame DEBUG lines. An explicit level is left alone."""
    if os.environ.get("GPUMARKET_LIBP2P_DEBUG") == "1":
        return
    logger = logging.getLogger("libp2p")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


__all__ = [
    "IDONTWANT_MIN_BYTES", "BatchedYamux", "BatchedYamuxStream", "ConfiguredMuxerMultistream",
    "FastGossipSub", "FastPubsub", "FastTCPStream", "FrameReader", "quiet_libp2p_debug", "use_configured_muxer",
]
