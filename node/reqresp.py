"""Length-prefixed request/response over a libp2p stream (for negotiation and offer sync).

Frame = unsigned varint length (LEB128, as libp2p uses everywhere) + that many bytes. Every frame
read has a deadline covering the prefix and the body together, so a peer that opens a stream and
never writes, or trickles one byte at a time, is cut off after ``read_timeout``. Frames larger
than ``max_frame`` are refused from the prefix alone, before any body is buffered.

A server stream answers requests one after another until the client closes it or stays silent
past ``idle_timeout``: a client may open a stream per request (about 5 ms per round trip on
loopback) or keep one :class:`RequestStream` for many (about 1 ms).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME = 256 * 1024
DEFAULT_READ_TIMEOUT = 10.0
MAX_VARINT_BYTES = 10  # a uint64 needs at most 10 LEB128 bytes

Handler = Callable[[bytes, ID], Awaitable[bytes]]


class ReqRespError(Exception):
    """Root of request/response failures; the stream is unusable afterwards."""


class FrameTooLarge(ReqRespError):
    """The peer announced (or we tried to send) a frame over ``max_frame``."""


class ReadTimeout(ReqRespError):
    """The peer did not deliver a whole frame before the read deadline."""


class PeerClosed(ReqRespError):
    """The stream ended (EOF or reset) before a whole frame arrived."""


class MalformedFrame(ReqRespError):
    """The length prefix is not a valid unsigned varint."""


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds limit {max_frame}")
    return encode_uvarint(len(payload)) + payload


async def _read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except StreamEOF:
            chunk = b""
        except StreamError as exc:
            raise PeerClosed(f"stream failed after {len(buf)}/{n} bytes: {exc!r}") from exc
        if not chunk:
            raise PeerClosed(f"stream ended after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_frame_body(stream: INetStream, max_frame: int) -> bytes:
    length = 0
    for i in range(MAX_VARINT_BYTES):
        byte = (await _read_exact(stream, 1))[0]
        if i > 0 and byte == 0:
            raise MalformedFrame("non-minimal varint length prefix")
        length |= (byte & 0x7F) << (7 * i)
        if length > max_frame:
            raise FrameTooLarge(f"peer announced a frame over the {max_frame}-byte limit")
        if not byte & 0x80:
            return await _read_exact(stream, length) if length else b""
    raise MalformedFrame("varint length prefix longer than 10 bytes")


async def read_frame(
    stream: INetStream, *, max_frame: int = DEFAULT_MAX_FRAME, timeout: float = DEFAULT_READ_TIMEOUT
) -> bytes:
    """Read one frame; the whole frame must arrive within ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        return await _read_frame_body(stream, max_frame)
    assert scope.cancelled_caught
    raise ReadTimeout(f"no complete frame within {timeout} s")


async def write_frame(stream: INetStream, payload: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    frame = encode_frame(payload, max_frame)
    try:
        await stream.write(frame)
    except StreamError as exc:
        raise PeerClosed(f"write failed: {exc!r}") from exc


async def close_quietly(stream: INetStream) -> None:
    """Close a stream, giving up after 1 s and ignoring errors (it may already be gone).
    Shielded, so it also runs in a `finally` under cancellation."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await stream.close()
        except Exception:
            pass


async def _reset_quietly(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # already gone; nothing more to clean
            pass


class RequestStream:
    """One client stream reused for several sequential requests."""

    def __init__(self, stream: INetStream, max_frame: int, timeout: float) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.timeout = timeout
        self._lock = trio.Lock()  # frames of concurrent requests must not interleave

    async def request(self, payload: bytes) -> bytes:
        async with self._lock:
            try:
                await write_frame(self.stream, payload, max_frame=self.max_frame)
                return await read_frame(self.stream, max_frame=self.max_frame, timeout=self.timeout)
            except ReqRespError:
                await _reset_quietly(self.stream)
                raise

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.close()
            except Exception:
                pass

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_request_stream(
    host: IHost,
    peer_id: ID,
    protocol_id: str,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> RequestStream:
    with trio.fail_after(timeout):
        stream = await host.new_stream(peer_id, [TProtocol(protocol_id)])
    return RequestStream(stream, max_frame, timeout)


async def request(
    host: IHost,
    peer_id: ID,
    protocol_id: str,
    payload: bytes,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> bytes:
    """One request on a fresh stream; raises a :class:`ReqRespError` subclass on failure."""
    async with await open_request_stream(
        host, peer_id, protocol_id, max_frame=max_frame, timeout=timeout
    ) as rs:
        return await rs.request(payload)


def serve(
    host: IHost,
    protocol_id: str,
    handler: Handler,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    idle_timeout: float | None = None,
) -> None:
    """Answer ``protocol_id`` streams with ``handler(request, peer) -> response``.

    ``read_timeout`` bounds each frame once the stream is open; ``idle_timeout`` (default: the
    same) bounds the wait for the next request on a reused stream. A handler exception resets the
    stream (the client sees :class:`PeerClosed`); it is the handler's job to encode domain errors
    as responses.
    """
    idle = read_timeout if idle_timeout is None else idle_timeout

    async def on_stream(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        first = True
        try:
            while True:
                try:
                    req = await read_frame(
                        stream, max_frame=max_frame, timeout=read_timeout if first else idle
                    )
                except PeerClosed:
                    return  # client finished
                first = False
                resp = await handler(req, peer)
                await write_frame(stream, resp, max_frame=max_frame)
        except ReqRespError as exc:
            log.info("%s from %s: %s", protocol_id, peer, exc)
            await _reset_quietly(stream)
        except Exception:
            log.exception("%s handler failed for %s", protocol_id, peer)
            await _reset_quietly(stream)
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    pass

    host.set_stream_handler(TProtocol(protocol_id), on_stream)
