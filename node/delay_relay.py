"""A userspace TCP relay that adds a one-way delay: a stand-in for `tc netem` in tests.

Why it exists: calibrating the simulator's network model against real nodes needs real delay on
the real wire path. The usual tool, netem in a network namespace, needs the `sch_netem` kernel
module; where it is missing (`tc qdisc add dev lo root netem delay 10ms` fails with "Specified
qdisc kind is unknown."), a relay per link does the same job for TCP: node A dials the relay,
the relay dials B, and every chunk of bytes is forwarded ``one_way_ms`` after it was read, in
both directions, in order. Security handshakes are end to end (Noise sees only A and B), so peer
ids still verify.

Delay model: a chunk read at t leaves at max(t + d, the previous chunk's departure), with
d = one_way_ms * (1 + jitter_frac * U(-1, 1)) drawn per chunk from a seeded RNG; the max keeps
byte order, as a TCP stream does (the same rule as the simulator's `Network.send`). Not
modelled: bandwidth, loss, and the acknowledgements on the two loopback legs (they are not
delayed, so TCP windows never limit a delayed link).

Bounds: at most ``max_chunks`` chunks wait in each direction (then reading pauses: back-pressure),
every dial to the target sits under ``connect_timeout``, and cancelling :meth:`DelayRelay.run`
closes the listener and every relayed connection. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

CHUNK = 65536
LATE_SAMPLES = 100_000


@dataclass(frozen=True)
class LinkDelay:
    """The delay one relay adds, per direction."""

    one_way_ms: float
    jitter_frac: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.one_way_ms < 0 or not 0 <= self.jitter_frac <= 1:
            raise ValueError("need one_way_ms >= 0 and 0 <= jitter_frac <= 1")


class DelayRelay:
    """Accepts on 127.0.0.1 (``port`` once started) and relays each connection to ``target``
    with ``delay`` added in both directions. Start with ``await nursery.start(relay.run)``."""

    def __init__(self, target: tuple[str, int], delay: LinkDelay, *, max_chunks: int = 256,
                 connect_timeout: float = 10.0) -> None:
        self.target = target
        self.delay = delay
        self.max_chunks = max_chunks
        self.connect_timeout = connect_timeout
        self.port: int | None = None
        self.connections = 0  # accepted so far
        self.bytes = 0  # forwarded, both directions
        # how late chunks left compared with their due time (ms): the relay's own scheduling
        # error (a CPU-starved relay adds delay that was not configured); first `LATE_SAMPLES`
        self.late_ms: list[float] = []
        self._rng = random.Random(delay.seed)

    async def run(self, *, task_status: trio.TaskStatus[DelayRelay] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                for listener in listeners:
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            self.connections += 1
            nursery.start_soon(self._relay, stream)

    async def _relay(self, client: trio.SocketStream) -> None:
        server: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                server = await trio.open_tcp_stream(*self.target)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery)
                nursery.start_soon(self._pump, server, client, nursery)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # one end went away (or the target did not answer): close both (below)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await client.aclose()
                if server is not None:
                    await server.aclose()

    def _due(self, now: float, last: float) -> float:
        d = self.delay
        jitter = d.jitter_frac * (2.0 * self._rng.random() - 1.0) if d.jitter_frac else 0.0
        return max(now + d.one_way_ms * (1.0 + jitter) / 1000.0, last)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, conn: trio.Nursery) -> None:
        """Forward src -> dst, each chunk at its due time; EOF is forwarded (delayed) as EOF.
        A broken end cancels the whole connection (both directions)."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](self.max_chunks)

        async def reader() -> None:
            last = 0.0
            async with send:
                while True:
                    data = await src.receive_some(CHUNK)
                    last = self._due(trio.current_time(), last)
                    await send.send((last, data))
                    if not data:
                        return

        async def writer() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    if len(self.late_ms) < LATE_SAMPLES:
                        self.late_ms.append((trio.current_time() - due) * 1000.0)
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
                    self.bytes += len(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(writer)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            conn.cancel_scope.cancel()


async def start_relays(nursery: trio.Nursery, links: list[tuple[tuple[str, int], LinkDelay]]) -> list[DelayRelay]:
    """Start one relay per (target, delay), all in ``nursery``; returns them, ports set."""
    return [await nursery.start(DelayRelay(target, delay).run) for target, delay in links]
