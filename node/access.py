"""`/gpumarket/exec/1`: a command or a terminal in the rental's container, over the libp2p
connection the rental already uses (specs/runtime.md has the framing, the messages and the
refusals).

The renter's node opens a stream to the provider and sends OPEN (the agreement, the command,
whether it wants a terminal and its size); the provider checks that the peer is the
agreement's renter, that the rental is live and that its container runs, answers ACCEPTED or
REFUSED, then pipes STDIN and RESIZE into a Docker exec in that container and STDOUT, STDERR
and finally EXIT back. Every refusal is a REFUSED frame with a code and a counted reason
(`ExecDesk.rejected`).

The renter's `gpumarket run` / `gpumarket shell` reach the renter's node through its control
socket (node/control.py, op `exec`), which relays the same frames unchanged to and from the
libp2p stream (`relay_exec`); `exec_client` is that CLI side.

The provider talks to the Engine API's exec endpoint itself (HTTP upgrade on the daemon's
socket, under trio) so no byte of output is buffered away in a blocking client; creating,
resizing and inspecting an exec go through the docker SDK on a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from protocol.identity import peer_id_from_public_key

from .reqresp import ReqRespError, close_quietly, read_frame, write_frame

log = logging.getLogger(__name__)

EXEC_PROTOCOL = "/gpumarket/exec/1"
FORWARD_PROTOCOL = "/gpumarket/forward/1"
COPY_PROTOCOL = "/gpumarket/cp/1"
MAX_EXEC_FRAME = 64 * 1024  # one frame's payload (kind byte included)
MAX_CHUNK = 32 * 1024  # output is sent in chunks of at most this
MAX_ARGV = 256  # arguments in OPEN
OPEN_TIMEOUT_S = 10.0  # OPEN must arrive this soon after the stream opens
OPEN_RATE_PER_S = 2.0  # provider: OPENs per second one peer may send ...
OPEN_BURST = 10  # ... with this burst
MAX_OPEN_PEERS = 4096  # peers whose rate is remembered
MAX_SESSIONS_PER_RENTAL = 16  # exec sessions at once in one rental's container
EXIT_WAIT_S = 5.0  # after the output ends, the exit code must be known within this

# frame kinds (the first byte of every frame's payload)
OPEN, STDIN, STDIN_EOF, RESIZE, FORWARD, COPY = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
COPY_IN, COPY_OUT = 0, 1  # COPY's direction: a tar stream into the container, or out of it
ACCEPTED, STDOUT, STDERR, EXIT, REFUSED = 0x10, 0x11, 0x12, 0x13, 0x14

REFUSAL_CODES = ("rate_limited", "bad_open", "unknown_agreement", "not_renter", "rental_over",
                 "no_container", "busy", "exec_failed", "no_network", "port_closed", "copy_failed")


class ExecError(Exception):
    """A malformed frame or a refusal; `code` is one of REFUSAL_CODES or a framing reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    agreement_id: bytes
    tty: bool
    rows: int
    cols: int
    argv: tuple[str, ...]

    def encode(self) -> bytes:
        return bytes([OPEN]) + msgpack.packb(
            [self.agreement_id, int(self.tty), self.rows, self.cols, list(self.argv)], use_bin_type=True)

    @classmethod
    def decode(cls, frame: bytes) -> "Open":
        value = _opening_value(frame, OPEN, "OPEN")
        if not (isinstance(value, list) and len(value) == 5):
            raise ExecError("bad_open", "OPEN is [agreement_id, tty, rows, cols, argv]")
        aid, tty, rows, cols, argv = value
        if not (isinstance(aid, bytes) and len(aid) == 32):
            raise ExecError("bad_open", "agreement_id must be 32 bytes")
        if not (_is_integer(tty) and tty in (0, 1)):
            raise ExecError("bad_open", "tty must be the integer 0 or 1")
        for n in (rows, cols):
            if not (_is_integer(n) and 0 <= n <= 0xFFFF):
                raise ExecError("bad_open", "rows and cols must be integers 0..65535")
        if not (isinstance(argv, list) and len(argv) <= MAX_ARGV
                and all(isinstance(a, str) and "\x00" not in a for a in argv)):
            raise ExecError("bad_open", f"argv must be at most {MAX_ARGV} strings without NUL")
        if not argv and not tty:
            raise ExecError("bad_open", "a command is needed without a terminal")
        return cls(aid, bool(tty), rows, cols, tuple(argv))


def _opening_value(frame: bytes, kind: int, name: str) -> Any:
    """The msgpack value after the kind byte of a stream's first frame, which must be `kind`
    (`name` in the errors); a bad_open ExecError if it is another kind or does not parse."""
    if not frame or frame[0] != kind:
        raise ExecError("bad_open", f"the first frame must be {name}")
    try:
        return msgpack.unpackb(frame[1:], raw=False, strict_map_key=True)
    except Exception as exc:
        raise ExecError("bad_open", f"{name} does not parse: {type(exc).__name__}") from None


def _is_integer(value: object) -> bool:
    """A msgpack integer: msgpack decodes floats to float and true/false to bool, and both
    compare equal to 0 and 1 (1.0 in (0, 1) is True), so the type is checked, not the value."""
    return type(value) is int


@dataclass(frozen=True)
class ForwardOpen:
    agreement_id: bytes
    port: int

    def encode(self) -> bytes:
        return bytes([FORWARD]) + msgpack.packb([self.agreement_id, self.port], use_bin_type=True)

    @classmethod
    def decode(cls, frame: bytes) -> "ForwardOpen":
        value = _opening_value(frame, FORWARD, "FORWARD")
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes)
                and len(value[0]) == 32 and _is_integer(value[1]) and 1 <= value[1] <= 65535):
            raise ExecError("bad_open", "FORWARD is [agreement_id: 32 bytes, port: 1..65535]")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class CopyOpen:
    agreement_id: bytes
    direction: int  # COPY_IN or COPY_OUT
    path: str  # in: an existing directory to unpack into; out: the file or directory to pack

    def encode(self) -> bytes:
        return bytes([COPY]) + msgpack.packb([self.agreement_id, self.direction, self.path],
                                             use_bin_type=True)

    @classmethod
    def decode(cls, frame: bytes) -> "CopyOpen":
        value = _opening_value(frame, COPY, "COPY")
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], bytes)
                and len(value[0]) == 32 and _is_integer(value[1]) and value[1] in (COPY_IN, COPY_OUT)
                and isinstance(value[2], str)
                and value[2].startswith("/") and "\x00" not in value[2] and len(value[2]) <= 4096):
            raise ExecError("bad_open", "COPY is [agreement_id: 32 bytes, 0 or 1, an absolute path]")
        return cls(value[0], value[1], value[2])


async def copy_p2p_to_trio(src: INetStream, dst: trio.abc.Stream) -> None:
    """Bytes from a libp2p stream to a trio stream until EOF, then half-close `dst`."""
    while True:
        try:
            data = await src.read(MAX_CHUNK)
        except Exception:  # EOF or reset
            data = b""
        if not data:
            break
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
    with contextlib.suppress(Exception):
        await dst.send_eof()


async def copy_trio_to_p2p(src: trio.abc.Stream, dst: INetStream) -> None:
    """Bytes from a trio stream to a libp2p stream until EOF, then half-close `dst`."""
    while True:
        try:
            data = await src.receive_some(MAX_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            break
        try:
            await dst.write(data)
        except Exception:
            return
    with contextlib.suppress(Exception):
        await dst.close()  # a yamux close is a half-close: the other direction goes on


def resize_frame(rows: int, cols: int) -> bytes:
    return bytes([RESIZE]) + struct.pack(">HH", rows, cols)


def exit_frame(code: int) -> bytes:
    return bytes([EXIT]) + struct.pack(">i", code)


def refused_frame(code: str, detail: str) -> bytes:
    return bytes([REFUSED]) + msgpack.packb([code, detail[:512]], use_bin_type=True)


def parse_refused(frame: bytes) -> tuple[str, str]:
    try:
        code, detail = msgpack.unpackb(frame[1:], raw=False)
        return str(code), str(detail)
    except Exception:
        return "bad_frame", "an unreadable REFUSED frame"


def parse_exit(frame: bytes) -> int:
    if len(frame) != 5:
        raise ExecError("bad_frame", "EXIT carries a 4-byte code")
    return struct.unpack(">i", frame[1:])[0]


# -- the Docker exec endpoint, under trio -----------------------------------------------------


async def _engine_stream(base_url: str | None) -> trio.abc.Stream:
    url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    parsed = urlparse(url)
    if parsed.scheme in ("unix", "http+unix"):
        return await trio.open_unix_socket(parsed.path)
    if parsed.scheme in ("tcp", "http"):
        return await trio.open_tcp_stream(parsed.hostname, parsed.port or 2375)
    raise ExecError("exec_failed", f"unsupported Docker endpoint {url!r} (unix:// or tcp://)")


async def engine_exec_attach(base_url: str | None, api_version: str, exec_id: str,
                             tty: bool) -> tuple[trio.abc.Stream, bytes]:
    """Start an exec and take over the connection (the Engine API's HTTP upgrade): returns the
    raw stream and any bytes of output that arrived with the response head."""
    stream = await _engine_stream(base_url)
    body = json.dumps({"Detach": False, "Tty": tty}).encode()
    head = (f"POST /v{api_version}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
            f"Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    await stream.send_all(head + body)
    buf = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk or len(buf) > 64 * 1024:
                await stream.aclose()
                raise ExecError("exec_failed", "the Docker daemon closed the exec connection")
            buf += chunk
    response, rest = buf.split(b"\r\n\r\n", 1)
    first = response.split(b"\r\n", 1)[0]
    status = first.split()
    if len(status) < 2 or status[1] not in (b"101", b"200"):
        await stream.aclose()
        raise ExecError("exec_failed", "exec start: " + first.decode(errors="replace"))
    return stream, rest


# -- provider ---------------------------------------------------------------------------------


@dataclass
class ExecTarget:
    """What the desk needs from the node for one OPEN (found by `ExecDesk.lookup`)."""

    renter_peer_id: str
    live: Callable[[], bool]  # the rental is being served
    ended: trio.Event  # set when the rental's service ends
    container_id: Callable[[], Awaitable[str | None]]  # the running container, or None


class ExecDesk:
    """Provider: answers `/gpumarket/exec/1` (see the module docstring)."""

    def __init__(self, host: Any, runtime: Any, lookup: Callable[[bytes], ExecTarget | None]) -> None:
        self.host = host
        self.runtime = runtime
        self.lookup = lookup
        self.rejected: dict[str, int] = {}
        self.sessions: dict[bytes, int] = {}  # agreement id -> exec sessions running
        self.opened = 0
        self.forwarded = 0
        self.copied = 0
        self._buckets: OrderedDict[ID, tuple[float, float]] = OrderedDict()

    def install(self) -> None:
        self.host.host.set_stream_handler(TProtocol(EXEC_PROTOCOL), self._on_stream)
        self.host.host.set_stream_handler(TProtocol(FORWARD_PROTOCOL), self._on_forward)
        self.host.host.set_stream_handler(TProtocol(COPY_PROTOCOL), self._on_copy)

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _allow(self, peer: ID) -> bool:
        now = trio.current_time()
        tokens, at = self._buckets.pop(peer, (float(OPEN_BURST), now))
        tokens = min(float(OPEN_BURST), tokens + (now - at) * OPEN_RATE_PER_S)
        allowed = tokens >= 1
        self._buckets[peer] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > MAX_OPEN_PEERS:
            self._buckets.popitem(last=False)
        return allowed

    async def _refuse(self, stream: INetStream, code: str, detail: str) -> None:
        self._count(code)
        log.info("exec refused (%s): %s", code, detail)
        try:
            with trio.move_on_after(2):
                await write_frame(stream, refused_frame(code, detail), max_frame=MAX_EXEC_FRAME)
        except ReqRespError:
            pass

    async def _admit(self, stream: INetStream, decode: Callable[[bytes], Any]) -> tuple[Any, ExecTarget, str] | None:
        """The checks every exec and forward stream passes (specs/runtime.md 2.2), in order:
        the request, its target and the running container; None after a refusal."""
        peer = stream.muxed_conn.peer_id
        if not self._allow(peer):
            await self._refuse(stream, "rate_limited", "too many streams; slow down")
            return None
        try:
            frame = await read_frame(stream, max_frame=MAX_EXEC_FRAME, timeout=OPEN_TIMEOUT_S)
            request = decode(frame)
        except ReqRespError as exc:
            self._count(type(exc).__name__)
            return None
        except ExecError as exc:
            await self._refuse(stream, exc.code, exc.detail)
            return None
        target = self.lookup(request.agreement_id)
        if target is None:
            await self._refuse(stream, "unknown_agreement", "no rental of this provider has that id")
            return None
        if target.renter_peer_id != peer.to_base58():
            await self._refuse(stream, "not_renter", "only the agreement's renter may open it")
            return None
        if not target.live():
            await self._refuse(stream, "rental_over", "the rental is not being served")
            return None
        if self.sessions.get(request.agreement_id, 0) >= MAX_SESSIONS_PER_RENTAL:
            await self._refuse(stream, "busy", f"{MAX_SESSIONS_PER_RENTAL} sessions already open")
            return None
        container = await target.container_id()
        if container is None:
            await self._refuse(stream, "no_container", "this rental has no running container")
            return None
        return request, target, container

    async def _on_stream(self, stream: INetStream) -> None:
        try:
            admitted = await self._admit(stream, Open.decode)
            if admitted is None:
                return
            request, target, container = admitted
            async with self._session(request.agreement_id):
                await self._serve(stream, request, container, target)
        finally:
            await close_quietly(stream)

    @asynccontextmanager
    async def _session(self, agreement_id: bytes):
        self.sessions[agreement_id] = self.sessions.get(agreement_id, 0) + 1
        try:
            yield
        finally:
            self.sessions[agreement_id] -= 1
            if not self.sessions[agreement_id]:
                del self.sessions[agreement_id]

    async def _on_forward(self, stream: INetStream) -> None:
        """`/gpumarket/forward/1`: after ACCEPTED, the stream carries one TCP connection to the
        asked port of the rental's container, raw, both ways (each side half-closes)."""
        try:
            admitted = await self._admit(stream, ForwardOpen.decode)
            if admitted is None:
                return
            request, target, container = admitted
            ip = await self.runtime.container_ip(request.agreement_id)
            if ip is None:
                await self._refuse(stream, "no_network", "the rental's container has no network")
                return
            try:
                with trio.fail_after(OPEN_TIMEOUT_S):
                    tcp = await trio.open_tcp_stream(ip, request.port)
            except (OSError, trio.TooSlowError) as exc:
                await self._refuse(stream, "port_closed", f"nothing accepts on port {request.port}: {exc}")
                return
            async with self._session(request.agreement_id), tcp:
                self.forwarded += 1
                await write_frame(stream, bytes([ACCEPTED]), max_frame=MAX_EXEC_FRAME)
                async with trio.open_nursery() as nursery:
                    async def watch_rental() -> None:
                        await target.ended.wait()
                        nursery.cancel_scope.cancel()

                    async def both() -> None:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(copy_p2p_to_trio, stream, tcp)
                            inner.start_soon(copy_trio_to_p2p, tcp, stream)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_rental)
                    nursery.start_soon(both)
        finally:
            await close_quietly(stream)

    async def _on_copy(self, stream: INetStream) -> None:
        """`/gpumarket/cp/1`: a tar stream into or out of the rental's container, through the
        Engine API's archive endpoint (no tar binary needed in the image)."""
        try:
            admitted = await self._admit(stream, CopyOpen.decode)
            if admitted is None:
                return
            request, target, container = admitted
            async with self._session(request.agreement_id):
                if request.direction == COPY_OUT:
                    await self._copy_out(stream, request, container)
                else:
                    await self._copy_in(stream, request, container)
        finally:
            await close_quietly(stream)

    async def _copy_out(self, stream: INetStream, request: CopyOpen, container: str) -> None:
        api = self.runtime.client.api
        try:
            chunks, _ = await self.runtime._call(api.get_archive, container, request.path,
                                                 chunk_size=MAX_CHUNK)
        except Exception as exc:
            detail = getattr(exc, "explanation", None) or str(exc)
            await self._refuse(stream, "copy_failed", f"{request.path}: {detail}")
            return
        self.copied += 1
        await write_frame(stream, bytes([ACCEPTED]), max_frame=MAX_EXEC_FRAME)
        done = object()
        try:
            while (chunk := await self.runtime._call(next, chunks, done)) is not done:
                await stream.write(chunk)
        finally:
            await trio.to_thread.run_sync(chunks.close)

    async def _copy_in(self, stream: INetStream, request: CopyOpen, container: str) -> None:
        """ACCEPTED, then the renter's tar bytes until its half-close, then EXIT 0 or REFUSED
        `copy_failed` (the engine unpacks as it reads: a bad archive fails at its end)."""
        await write_frame(stream, bytes([ACCEPTED]), max_frame=MAX_EXEC_FRAME)
        self.copied += 1

        def body():  # runs on the worker thread: pulls each chunk from trio
            while True:
                try:
                    data = trio.from_thread.run(stream.read, MAX_CHUNK)
                except Exception:
                    data = b""
                if not data:
                    return
                yield data

        api = self.runtime.client.api
        try:
            ok = await trio.to_thread.run_sync(api.put_archive, container, request.path, body(),
                                               limiter=self.runtime.limiter)
            detail = "" if ok else "the engine refused the archive"
        except Exception as exc:
            ok, detail = False, str(getattr(exc, "explanation", None) or exc)
        frame = exit_frame(0) if ok else refused_frame("copy_failed", f"{request.path}: {detail}")
        if not ok:
            self._count("copy_failed")
        try:
            await write_frame(stream, frame, max_frame=MAX_EXEC_FRAME)
        except ReqRespError:
            pass

    async def _serve(self, stream: INetStream, request: Open, container: str, target: ExecTarget) -> None:
        rt = self.runtime
        argv = list(request.argv) or ["/bin/sh"]
        env = {"TERM": "xterm-256color"} if request.tty else None
        try:
            created = await rt._call(rt.client.api.exec_create, container, argv, stdin=True,
                                     tty=request.tty, environment=env)
            exec_id = created["Id"]
            engine, early = await engine_exec_attach(rt.base_url, rt.client.api._version, exec_id,
                                                     request.tty)
        except Exception as exc:
            detail = getattr(exc, "explanation", None) or str(exc)
            await self._refuse(stream, "exec_failed", f"could not start the command: {detail}")
            return
        self.opened += 1
        await write_frame(stream, bytes([ACCEPTED]), max_frame=MAX_EXEC_FRAME)
        if request.tty and request.rows and request.cols:
            await self._resize(exec_id, request.rows, request.cols)
        ended_by_rental = renter_gone = False
        async with engine:
            async with trio.open_nursery() as nursery:
                async def watch_rental() -> None:
                    nonlocal ended_by_rental
                    await target.ended.wait()
                    ended_by_rental = True
                    nursery.cancel_scope.cancel()

                async def output() -> None:
                    nonlocal renter_gone
                    try:
                        await self._pump_output(engine, early, stream, request.tty)
                    except ReqRespError:  # the renter went away: closing the exec's
                        renter_gone = True  # connection hangs up its terminal
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_rental)
                nursery.start_soon(output)
                nursery.start_soon(self._pump_input, stream, engine, exec_id)
        if ended_by_rental:
            await self._refuse(stream, "rental_over", "the rental ended")
            return
        if renter_gone:
            return
        code = await self._exit_code(exec_id)
        try:
            await write_frame(stream, exit_frame(code), max_frame=MAX_EXEC_FRAME)
        except ReqRespError:
            pass

    async def _resize(self, exec_id: str, rows: int, cols: int) -> None:
        try:
            await self.runtime._call(self.runtime.client.api.exec_resize, exec_id, height=rows,
                                     width=cols)
        except Exception as exc:  # the process may have exited meanwhile
            log.debug("exec resize failed: %r", exc)

    async def _exit_code(self, exec_id: str) -> int:
        with trio.move_on_after(EXIT_WAIT_S):
            while True:
                try:
                    info = await self.runtime._call(self.runtime.client.api.exec_inspect, exec_id)
                except Exception:
                    return 255
                if not info.get("Running") and info.get("ExitCode") is not None:
                    return int(info["ExitCode"])
                await trio.sleep(0.05)
        return 255

    async def _pump_input(self, stream: INetStream, engine: trio.abc.Stream, exec_id: str) -> None:
        """Renter -> container: STDIN, STDIN_EOF, RESIZE. Anything else ends the session."""
        while True:
            try:
                frame = await read_frame(stream, max_frame=MAX_EXEC_FRAME, timeout=float("inf"))
            except ReqRespError:
                return  # the renter went away: the output side ends when the process does
            kind = frame[0] if frame else -1
            if kind == STDIN:
                await engine.send_all(frame[1:])
            elif kind == STDIN_EOF:
                await engine.send_eof()  # the process reads end of file
            elif kind == RESIZE and len(frame) == 5:
                rows, cols = struct.unpack(">HH", frame[1:])
                await self._resize(exec_id, rows, cols)
            else:
                self._count("bad_frame")
                return

    async def _pump_output(self, engine: trio.abc.Stream, early: bytes, stream: INetStream,
                           tty: bool) -> None:
        """Container -> renter. With a terminal the bytes are raw; without one the Engine
        multiplexes stdout and stderr in frames of an 8-byte header (stream, 0, 0, 0, size)."""
        buf = bytearray(early)
        while True:
            if tty:
                while buf:
                    chunk, buf = bytes(buf[:MAX_CHUNK]), buf[MAX_CHUNK:]
                    await write_frame(stream, bytes([STDOUT]) + chunk, max_frame=MAX_EXEC_FRAME)
            else:
                while len(buf) >= 8:
                    kind, size = buf[0], struct.unpack(">I", buf[4:8])[0]
                    if len(buf) < 8 + size:
                        break
                    payload, buf = bytes(buf[8:8 + size]), buf[8 + size:]
                    out = STDERR if kind == 2 else STDOUT
                    for i in range(0, len(payload), MAX_CHUNK):
                        await write_frame(stream, bytes([out]) + payload[i:i + MAX_CHUNK],
                                          max_frame=MAX_EXEC_FRAME)
            try:
                data = await engine.receive_some(MAX_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return
            buf += data


# -- renter: the node relays its control connection to the provider ---------------------------


PROVIDER_STREAM_TIMEOUT_S = 15  # connect (if needed) and negotiate the protocol


async def open_to_provider(node: Any, agreement_id: bytes, protocol: str) -> Any:
    """A new `protocol` stream to the provider of this node's rental `agreement_id`. Raises
    ExecRefused("unknown_agreement") for an id that is not one of this node's rentals as
    renter, ExecRefused("unreachable") when the stream cannot be opened in time."""
    rental = node.rentals.get(agreement_id)
    if rental is None or rental.role != "renter":
        raise ExecRefused("unknown_agreement", "no rental of yours has that id")
    provider = ID.from_base58(peer_id_from_public_key(rental.details.provider_key))
    try:
        with trio.fail_after(PROVIDER_STREAM_TIMEOUT_S):
            return await node.host.host.new_stream(provider, [TProtocol(protocol)])
    except Exception as exc:
        raise ExecRefused("unreachable", f"the provider: {exc!r}") from None


async def open_accepted(node: Any, agreement_id: bytes, protocol: str, request: bytes,
                        timeout_s: float, reply: Callable[[dict], Awaitable[None]]) -> Any:
    """`open_to_provider`, send `request` and wait `timeout_s` for the provider's ACCEPTED:
    the accepted stream, after replying ok to the control client; None after replying with
    the refusal (the stream closed)."""
    try:
        p2p = await open_to_provider(node, agreement_id, protocol)
    except ExecRefused as exc:
        await reply({"ok": False, "error": f"refused ({exc.code}): {exc.detail}"})
        return None
    try:
        await write_frame(p2p, request, max_frame=MAX_EXEC_FRAME)
        try:
            answer = await read_frame(p2p, max_frame=MAX_EXEC_FRAME, timeout=timeout_s)
        except ReqRespError as exc:
            await reply({"ok": False, "error": f"refused (unreachable): {exc}"})
            await close_quietly(p2p)
            return None
        if not answer or answer[0] != ACCEPTED:
            code, detail = parse_refused(answer) if answer and answer[0] == REFUSED else ("bad_frame", "?")
            await reply({"ok": False, "error": f"refused ({code}): {detail}"})
            await close_quietly(p2p)
            return None
        await reply({"ok": True, "result": "bytes follow"})
    except BaseException:
        await close_quietly(p2p)
        raise
    return p2p


async def relay_exec(node: Any, client: trio.abc.Stream, agreement_id: bytes, argv: list[str],
                     tty: bool, rows: int, cols: int) -> None:
    """Open the exec stream to the rental's provider, send OPEN, then copy frames both ways
    until the provider sends EXIT or REFUSED or either side goes away."""
    request = Open(agreement_id, tty, rows, cols, tuple(argv))
    try:
        p2p = await open_to_provider(node, agreement_id, EXEC_PROTOCOL)
    except ExecRefused as exc:
        await write_control_frame(client, refused_frame(exc.code, exc.detail))
        return
    try:
        await write_frame(p2p, request.encode(), max_frame=MAX_EXEC_FRAME)
        async with trio.open_nursery() as nursery:
            async def from_provider() -> None:
                while True:
                    try:
                        frame = await read_frame(p2p, max_frame=MAX_EXEC_FRAME, timeout=float("inf"))
                    except ReqRespError:
                        frame = refused_frame("unreachable", "the provider closed the stream")
                    await write_control_frame(client, frame)
                    if not frame or frame[0] in (EXIT, REFUSED):
                        nursery.cancel_scope.cancel()
                        return

            async def from_client() -> None:
                reader = ControlFrames(client)
                while True:
                    frame = await reader.read()
                    if frame is None:
                        nursery.cancel_scope.cancel()
                        return
                    if frame and frame[0] in (STDIN, STDIN_EOF, RESIZE):
                        await write_frame(p2p, frame, max_frame=MAX_EXEC_FRAME)

            nursery.start_soon(from_provider)
            nursery.start_soon(from_client)
    finally:
        await close_quietly(p2p)


# -- the same frames on a plain trio stream (the control socket) --------------------------------


def encode_control_frame(payload: bytes) -> bytes:
    from .reqresp import encode_frame

    return encode_frame(payload, MAX_EXEC_FRAME)


async def write_control_frame(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(encode_control_frame(payload))


class ControlFrames:
    """Reads uvarint-length frames from a trio stream; None at the end of the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self) -> bytes | None:
        while True:
            length, used = _uvarint(self.buf)
            if length is not None:
                if length > MAX_EXEC_FRAME:
                    raise ExecError("bad_frame", "frame over the limit")
                if len(self.buf) >= used + length:
                    frame = bytes(self.buf[used:used + length])
                    del self.buf[:used + length]
                    return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self.buf += data


def _uvarint(buf: bytearray) -> tuple[int | None, int]:
    n = 0
    for i, byte in enumerate(buf[:10]):
        n |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return n, i + 1
    return None, 0


# -- the CLI side: `gpumarket run` and `gpumarket shell` -----------------------------------------


class ExecRefused(Exception):
    """The provider (or the renter's own node) refused the session; str() is one line."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"refused ({code}): {detail}")
        self.code = code
        self.detail = detail


async def exec_session(sock_path: str, token: str, agreement_id: str, argv: list[str], *,
                       tty: bool, rows: int = 0, cols: int = 0,
                       input_chunks: Any = None, resizes: Any = None,
                       out: Callable[[int, bytes], None]) -> int:
    """One run/shell session through the renter's node (control socket `sock_path`): sends what
    `input_chunks` yields (an async iterator of bytes; None: no input), each (rows, cols) that
    `resizes` yields, calls `out(STDOUT or STDERR, data)` for the output, and returns the
    command's exit code. Raises ExecRefused."""
    stream = await trio.open_unix_socket(sock_path)
    async with stream:
        request = {"token": token, "op": "exec", "args": {
            "agreement_id": agreement_id, "argv": argv, "tty": tty, "rows": rows, "cols": cols}}
        await stream.send_all(json.dumps(request).encode() + b"\n")
        frames = ControlFrames(stream)
        with trio.fail_after(30):
            while b"\n" not in frames.buf:
                data = await stream.receive_some(65536)
                if not data:
                    raise ExecRefused("node_closed", "the node closed the control connection")
                frames.buf += data
        line, _, rest = bytes(frames.buf).partition(b"\n")
        frames.buf = bytearray(rest)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ExecRefused("node", reply.get("error", "unknown error"))
        result: list[int] = []
        refusal: list[ExecRefused] = []  # raised after the nursery (not inside an ExceptionGroup)
        async with trio.open_nursery() as nursery:
            async def send_input() -> None:
                if input_chunks is not None:
                    async for chunk in input_chunks:
                        for i in range(0, len(chunk), MAX_CHUNK):
                            await write_control_frame(stream, bytes([STDIN]) + chunk[i:i + MAX_CHUNK])
                await write_control_frame(stream, bytes([STDIN_EOF]))

            async def send_resizes() -> None:
                async for r, c in resizes:
                    await write_control_frame(stream, resize_frame(r, c))

            def refuse(code: str, detail: str) -> None:
                refusal.append(ExecRefused(code, detail))
                nursery.cancel_scope.cancel()

            async def receive() -> None:
                accepted = False
                while True:
                    frame = await frames.read()
                    if frame is None:
                        return refuse("node_closed", "the session ended without an exit status")
                    kind = frame[0] if frame else -1
                    if kind == ACCEPTED:
                        accepted = True
                        if not tty or input_chunks is not None:
                            nursery.start_soon(send_input)
                        if resizes is not None:
                            nursery.start_soon(send_resizes)
                    elif kind in (STDOUT, STDERR) and accepted:
                        out(kind, frame[1:])
                    elif kind == EXIT and accepted:
                        result.append(parse_exit(frame))
                        nursery.cancel_scope.cancel()
                        return
                    elif kind == REFUSED:
                        return refuse(*parse_refused(frame))
                    else:
                        return refuse("bad_frame", f"unexpected frame kind {kind}")

            nursery.start_soon(receive)
        if refusal:
            raise refusal[0]
        return result[0]


def run_cli_session(data_dir: str, agreement_id: str, argv: list[str], *, tty: bool) -> int:
    """`gpumarket run` (tty False: stdin forwarded when it is not a terminal) and `gpumarket
    shell` (tty True: the local terminal in raw mode, its size followed). Returns the exit
    code; raises ExecRefused or control.ControlError."""
    import signal
    import sys
    import termios
    import tty as ttymod
    from pathlib import Path

    from .control import SOCKET_NAME, TOKEN_NAME, NoNodeRunning

    base = Path(data_dir).expanduser()
    try:
        token = (base / TOKEN_NAME).read_text().strip()
    except FileNotFoundError:
        raise NoNodeRunning(f"no node is running for {base}: start one with `gpumarket node run`") from None
    stdin_fd, out_fds = sys.stdin.fileno(), {STDOUT: sys.stdout.fileno(), STDERR: sys.stderr.fileno()}
    sys.stdout.flush()
    interactive = os.isatty(stdin_fd)
    rows = cols = 0
    if tty and interactive:
        cols, rows = os.get_terminal_size(stdin_fd)

    def out(kind: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(out_fds[kind], view):]

    async def chunks():
        src = trio.lowlevel.FdStream(os.dup(stdin_fd))
        async with src:
            while True:
                data = await src.receive_some(MAX_CHUNK)
                if not data:
                    return
                yield data

    async def winch():
        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                c, r = os.get_terminal_size(stdin_fd)
                yield r, c

    forward_input = tty or not interactive
    saved = termios.tcgetattr(stdin_fd) if tty and interactive else None
    try:
        if saved is not None:
            ttymod.setraw(stdin_fd)  # Ctrl-C, Ctrl-D and the rest go to the container's terminal
        return trio.run(lambda: exec_session(
            str(base / SOCKET_NAME), token, agreement_id, argv, tty=tty, rows=rows, cols=cols,
            input_chunks=chunks() if forward_input else None,
            resizes=winch() if saved is not None else None, out=out))
    finally:
        os.set_blocking(stdin_fd, True)  # FdStream made the shared file description non-blocking
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)


# -- forward: one local TCP connection per libp2p stream -------------------------------------------


async def relay_forward(node: Any, client: trio.abc.Stream, agreement_id: bytes, port: int,
                        reply: Callable[[dict], Awaitable[None]]) -> None:
    """Renter's node: open `/gpumarket/forward/1` to the rental's provider for `port`, answer
    the control request with `reply`, then copy bytes both ways."""
    p2p = await open_accepted(node, agreement_id, FORWARD_PROTOCOL,
                              ForwardOpen(agreement_id, port).encode(), OPEN_TIMEOUT_S + 5, reply)
    if p2p is None:
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy_p2p_to_trio, p2p, client)
            nursery.start_soon(copy_trio_to_p2p, client, p2p)
    finally:
        await close_quietly(p2p)


async def _copy_trio(src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes = b"") -> None:
    try:
        if first:
            await dst.send_all(first)
        while data := await src.receive_some(MAX_CHUNK):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def forward_connection(sock_path: str, token: str, agreement_id: str, port: int,
                             local: trio.abc.Stream, on_error: Callable[[str], None]) -> None:
    """One accepted local connection: a control connection to the renter's node asking for
    `forward`, then bytes both ways until both sides are done."""
    async with local:
        try:
            control = await trio.open_unix_socket(sock_path)
        except OSError as exc:
            on_error(f"the node does not answer: {exc}")
            return
        async with control:
            request = {"token": token, "op": "forward", "args": {"agreement_id": agreement_id, "port": port}}
            await control.send_all(json.dumps(request).encode() + b"\n")
            buf = b""
            with trio.move_on_after(30):
                while b"\n" not in buf:
                    data = await control.receive_some(65536)
                    if not data:
                        break
                    buf += data
            line, _, rest = buf.partition(b"\n")
            try:
                reply = json.loads(line)
            except ValueError:
                reply = {"ok": False, "error": "the node did not answer"}
            if not reply.get("ok"):
                on_error(reply.get("error", "unknown error"))
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy_trio, control, local, rest)
                nursery.start_soon(_copy_trio, local, control)


async def forward_listen(sock_path: str, token: str, agreement_id: str, port: int, local_port: int,
                         on_error: Callable[[str], None], *,
                         task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on 127.0.0.1:`local_port` (0: any free port, given to task_status) and forward
    every connection to `port` in the rental's container, many at once."""
    listeners = await trio.open_tcp_listeners(local_port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        await forward_connection(sock_path, token, agreement_id, port, stream, on_error)

    await trio.serve_listeners(handle, listeners)


# -- cp: a tar stream through the renter's node -----------------------------------------------------


async def relay_copy(node: Any, client: trio.abc.Stream, agreement_id: bytes, direction: int,
                     path: str, reply: Callable[[dict], Awaitable[None]]) -> None:
    """Renter's node: `/gpumarket/cp/1` to the rental's provider. Out: after the reply line the
    tar bytes follow to the end of the connection. In: the client's tar bytes up to its
    half-close go to the provider, then one more JSON line says how it went."""
    p2p = await open_accepted(node, agreement_id, COPY_PROTOCOL,
                              CopyOpen(agreement_id, direction, path).encode(), OPEN_TIMEOUT_S + 20, reply)
    if p2p is None:
        return
    try:
        if direction == COPY_OUT:
            await copy_p2p_to_trio(p2p, client)
            return
        await copy_trio_to_p2p(client, p2p)
        try:
            final = await read_frame(p2p, max_frame=MAX_EXEC_FRAME, timeout=120)
        except ReqRespError as exc:
            final = refused_frame("unreachable", str(exc))
        if final and final[0] == EXIT:
            await reply({"ok": True, "result": "copied"})
        else:
            code, detail = parse_refused(final) if final else ("bad_frame", "?")
            await reply({"ok": False, "error": f"refused ({code}): {detail}"})
    finally:
        await close_quietly(p2p)


def _refusal(text: str) -> ExecRefused:
    """The node's error line as a refusal: "refused (CODE): DETAIL" keeps its code."""
    if text.startswith("refused (") and "): " in text:
        code, _, detail = text[len("refused ("):].partition("): ")
        return ExecRefused(code, detail)
    return ExecRefused("node", text)


def copy_cli(data_dir: str, src: str, dst: str) -> str:
    """`gpumarket cp`: RENTAL:PATH -> a local directory, or a local file or directory ->
    RENTAL:DIR (an existing directory in the container). Blocking sockets, streaming tar.
    Returns a one-line summary; raises ExecRefused."""
    import socket
    import tarfile
    from pathlib import Path

    from .control import SOCKET_NAME, TOKEN_NAME, NoNodeRunning

    def remote(arg: str) -> tuple[str, str] | None:
        rental, sep, path = arg.partition(":")
        return (rental, path) if sep and path.startswith("/") and "/" not in rental else None

    out, into = remote(src), remote(dst)
    if (out is None) == (into is None):
        raise ExecRefused("usage", "one of SRC and DST must be RENTAL:/ABSOLUTE/PATH, the other local")
    base = Path(data_dir).expanduser()
    try:
        token = (base / TOKEN_NAME).read_text().strip()
    except FileNotFoundError:
        raise NoNodeRunning(f"no node is running for {base}: start one with `gpumarket node run`") from None
    rental, path = out or into
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(base / SOCKET_NAME))
    request = {"token": token, "op": "cp", "args": {"agreement_id": rental, "path": path,
                                                     "direction": COPY_OUT if out else COPY_IN}}
    sock.sendall(json.dumps(request).encode() + b"\n")
    reader = sock.makefile("rb")
    try:
        reply = json.loads(reader.readline() or b"{}")
        if not reply.get("ok"):
            raise _refusal(reply.get("error", "the node closed the connection"))
        if out:
            target = Path(dst)
            if not target.is_dir():
                raise ExecRefused("usage", f"{dst} is not a directory to copy into")
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                names = []
                for member in tar:
                    names.append(member.name)
                    tar.extract(member, target, filter="data")  # no absolute paths, no escapes
            return f"copied {len(names)} entries from {rental}:{path} into {target}"
        local = Path(src)
        if not local.exists():
            raise ExecRefused("usage", f"{src} does not exist")
        writer = sock.makefile("wb")
        with tarfile.open(fileobj=writer, mode="w|") as tar:
            tar.add(str(local), arcname=local.name)
        writer.close()
        sock.shutdown(socket.SHUT_WR)
        final = json.loads(reader.readline() or b"{}")
        if not final.get("ok"):
            raise _refusal(final.get("error", "the node closed the connection"))
        return f"copied {local} into {rental}:{path}"
    finally:
        reader.close()
        sock.close()
