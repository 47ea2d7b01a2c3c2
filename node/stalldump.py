"""Stall diagnostics for a running node (opt-in, for benchmarks): what every trio task of this
process is waiting on, and the yamux state of each connection, written as JSON lines.

Enabled by ``GPUMARKET_STALL_DUMP=FILE`` in a ``python -m node.process`` child. Then:

- SIGUSR2 writes one dump (``{"why": "signal", ...}``);
- every outbound ``new_stream`` (stream open + multistream-select) that has not finished after
  ``GPUMARKET_STALL_AFTER`` seconds (2.0) writes a dump with that call's own await stack (the
  stage it reached) and, if ``GPUMARKET_STALL_PEER_PID`` names a process, sends it SIGUSR2 so
  that the other side of the connection is dumped at the same moment.

A dump is a snapshot and changes nothing: per connection, the open streams (protocol, unread
bytes, receive and send windows), the connection write lock (held? by which task? how many
waiting), the muxer's new-stream channel backlog, the kernel's socket queues (bytes received
but not read by the process, bytes written but not yet acknowledged by the peer), and the
await stack of the connection's read loop; and the await stack of every task blocked in a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import time
from collections import Counter
from typing import Any

import trio

SIOCINQ = 0x541B  # FIONREAD: bytes in the socket's receive queue
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the socket's send queue (unsent or unacknowledged)


def _frames(coro: Any, limit: int = 60) -> list[str]:
    """The await chain of a coroutine, outermost first: 'dir/file:line function'; trio's own
    frames are shown as one 'trio:function' (the first of them: what the task waits in)."""
    out: list[str] = []
    in_trio = False
    while coro is not None and len(out) < limit:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            path = code.co_filename
            if f"{os.sep}trio{os.sep}" in path:
                if not in_trio:
                    out.append(f"trio:{code.co_name}")
                in_trio = True
            else:
                in_trio = False
                where = os.path.join(os.path.basename(os.path.dirname(path)),
                                     os.path.basename(path))
                out.append(f"{where}:{frame.f_lineno} {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return out


def _all_tasks() -> list[Any]:
    root = trio.lowlevel.current_root_task()
    tasks, todo = [], [root]
    while todo:
        task = todo.pop()
        tasks.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


def _coro_name(task: Any) -> str | None:
    code = getattr(task.coro, "cr_code", None)
    return None if code is None else code.co_name


def _self_of(task: Any) -> Any:
    frame = getattr(task.coro, "cr_frame", None)
    return None if frame is None else frame.f_locals.get("self")


def _socket_queues(muxed: Any) -> dict[str, int] | None:
    io = getattr(getattr(getattr(muxed, "secured_conn", None), "conn", None), "read_writer", None)
    tcp = getattr(getattr(io, "read_write_closer", None), "stream", None)
    sock = getattr(getattr(tcp, "stream", None), "socket", None)
    if sock is None:
        return None
    try:
        fd = sock.fileno()
        if fd < 0:  # closed meanwhile
            return None
        inq = struct.unpack("i", fcntl.ioctl(fd, SIOCINQ, b"\0\0\0\0"))[0]
        outq = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        out: dict[str, Any] = {"kernel_unread": inq, "kernel_unsent": outq}
        if inq:
            out["unread_noise_msgs"] = _peek_noise_sizes(fd, inq)
        return out
    except (OSError, ValueError):
        return None


def _peek_noise_sizes(fd: int, inq: int) -> dict[str, int]:
    """What the unread bytes are, without reading them (MSG_PEEK on a duplicate descriptor):
    Noise transport messages are a 2-byte length and a ciphertext of yamux bytes + 16; a
    ciphertext of 28 bytes is a lone 12-byte yamux header (a WINDOW_UPDATE, PING, SYN/ACK/FIN
    without data). Counted by ciphertext size class; meaningful when the read loop is between
    messages (its stack ends in a header read), else the first count is off."""
    dup = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
    try:
        data = dup.recv(min(inq, 1 << 20), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return {}
    finally:
        dup.close()
    sizes: Counter[str] = Counter()
    i = 0
    while i + 2 <= len(data):
        n = int.from_bytes(data[i:i + 2], "big")
        sizes["header_only(28)" if n == 28 else "<=1KiB" if n <= 1024 else ">1KiB"] += 1
        i += 2 + n
    return dict(sizes)


def _lock_state(lock: Any) -> dict[str, Any]:
    stats = lock.statistics()
    owner = stats.owner
    return {"locked": stats.locked, "waiting": stats.tasks_waiting,
            "owner": None if owner is None else owner.name,
            "owner_stack": None if owner is None else _frames(owner.coro)[-8:]}


def connection_state(swarm_conn: Any, read_loops: dict[int, Any],
                     handlers: dict[int, list[Any]]) -> dict[str, Any]:
    muxed = swarm_conn.muxed_conn
    protocols = {id(s.muxed_stream): s.protocol_id for s in getattr(swarm_conn, "streams", ())}
    out: dict[str, Any] = {"peer": str(muxed.peer_id)[-8:], "muxer": type(muxed).__name__}
    streams = getattr(muxed, "streams", None)
    if streams is None:
        return out
    out["streams"] = [
        {"id": sid, "proto": protocols.get(id(s)), "unread": len(muxed.stream_buffers.get(sid, b"")),
         "recv_window": s.recv_window, "send_window": s.send_window,
         "target": s.target_recv_window,
         "flags": "".join(c for c, on in (("c", s.closed), ("s", s.send_closed),
                                          ("r", s.recv_closed)) if on)}
        for sid, s in list(streams.items())]
    out["write_lock"] = _lock_state(muxed._write_lock)
    out["streams_lock"] = _lock_state(muxed.streams_lock)
    ch = muxed.new_stream_send_channel.statistics()
    out["accept_backlog"] = {"queued": ch.current_buffer_used, "max": ch.max_buffer_size,
                             "senders_waiting": ch.tasks_waiting_send,
                             "receivers_waiting": ch.tasks_waiting_receive}
    out["backlog_free"] = muxed.stream_backlog_semaphore.value
    out["socket"] = _socket_queues(muxed)
    loop = read_loops.get(id(muxed))
    out["read_loop"] = None if loop is None else _frames(loop.coro)[-6:]
    # inbound streams of this connection still in their handler: where each one is (the first
    # ten; a stream in multistream-select shows it here)
    out["inbound_handlers"] = [
        {"stream": getattr(t.coro.cr_frame.f_locals.get("muxed_stream"), "stream_id", None),
         "stack": _frames(t.coro)[-7:]} for t in handlers.get(id(swarm_conn), [])[:10]]
    out["inbound_handlers_n"] = len(handlers.get(id(swarm_conn), []))
    return out


def snapshot(host: Any, why: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    tasks = _all_tasks()
    read_loops = {id(_self_of(t)): t for t in tasks
                  if _coro_name(t) == "_handle_incoming_with_ready_signal"}
    handlers: dict[int, list[Any]] = {}
    for t in tasks:
        if _coro_name(t) == "_handle_muxed_stream":
            handlers.setdefault(id(_self_of(t)), []).append(t)
    conns = [connection_state(c, read_loops, handlers)
             for cs in list(host.get_network().connections.values()) for c in list(cs)]
    blocked = []
    for t in tasks:
        stack = _frames(t.coro)
        if any(f.endswith((" acquire", "trio:acquire", " write_lock", " read_lock"))
               for f in stack[-3:]):
            blocked.append({"task": t.name, "stack": stack[-10:]})
    stats = trio.lowlevel.current_statistics()
    return {"t": round(time.time(), 3), "why": why, "tasks": len(tasks),
            "runnable": stats.tasks_runnable, "schedstat": _schedstat(), "connections": conns,
            "blocked_on_locks": blocked, **(extra or {})}


def _schedstat() -> list[float] | None:
    """This process's main thread: seconds on a CPU, seconds runnable but waiting for one (the
    OS run queue: CPU contention from other processes), timeslices (Linux schedstat)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            run_ns, wait_ns, slices = f.read().split()
        return [int(run_ns) / 1e9, int(wait_ns) / 1e9, int(slices)]
    except (OSError, ValueError):
        return None


class StallDumper:
    """Writes snapshots to `path` (JSON lines). See the module docstring."""

    def __init__(self, host: Any, path: str, after_s: float = 2.0, peer_pid: int | None = None) -> None:
        self.host = host  # the py-libp2p IHost
        self.path = path
        self.after_s = after_s
        self.peer_pid = peer_pid
        self.open_calls = 0
        self.slow_calls = 0

    @classmethod
    def from_env(cls, host: Any) -> StallDumper | None:
        path = os.environ.get("GPUMARKET_STALL_DUMP")
        if not path:
            return None
        pid = os.environ.get("GPUMARKET_STALL_PEER_PID")
        return cls(host, path, float(os.environ.get("GPUMARKET_STALL_AFTER", "2.0")),
                   int(pid) if pid else None)

    def dump(self, why: str, extra: dict[str, Any] | None = None) -> None:
        """Never raises: a diagnostic must not take the node down (a connection closing while
        it is read, an unexpected object in a frame, a full disk)."""
        try:
            record = snapshot(self.host, why, extra)
        except Exception as exc:
            record = {"t": round(time.time(), 3), "why": why, "error": repr(exc)[:300]}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except (OSError, TypeError, ValueError):
            pass

    def wrap_new_stream(self, nursery: trio.Nursery) -> None:
        original = self.host.new_stream

        async def new_stream(peer_id: Any, protocol_ids: Any) -> Any:
            caller = trio.lowlevel.current_task()
            done = trio.Event()
            self.open_calls += 1
            call = self.open_calls

            async def watch() -> None:
                t0 = trio.current_time()
                for n, at in enumerate((self.after_s, 2.2 * self.after_s)):
                    with trio.move_on_after(at - (trio.current_time() - t0)):
                        await done.wait()
                        return
                    if n == 0:
                        self.slow_calls += 1
                    if self.peer_pid:
                        try:
                            os.kill(self.peer_pid, signal.SIGUSR2)
                        except OSError:
                            pass
                    try:
                        extra = {"call": call, "waited_s": round(trio.current_time() - t0, 2),
                                 "peer": str(peer_id)[-8:],
                                 "protocols": [str(p) for p in protocol_ids],
                                 "caller_stack": _frames(caller.coro)[-14:]}
                    except Exception as exc:
                        extra = {"call": call, "error": repr(exc)[:300]}
                    self.dump("slow_new_stream", extra)

            nursery.start_soon(watch)
            try:
                return await original(peer_id, protocol_ids)
            finally:
                done.set()

        self.host.new_stream = new_stream  # type: ignore[method-assign]

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.after_s > 0:  # GPUMARKET_STALL_AFTER=0: dump on SIGUSR2 only
                self.wrap_new_stream(nursery)
            with trio.open_signal_receiver(signal.SIGUSR2) as signals:
                task_status.started()
                async for _ in signals:
                    self.dump("signal")
