"""Negotiation over libp2p streams: the driver around protocol/negotiation.py's state machines.

Protocol `/gpumarket/negotiate/1` (specs/node.md): the renter opens a stream to the provider and
both sides exchange varint-framed canonical messages (Proposal, CounterProposal, Accept,
NegotiationReject) until the negotiation ends. Every read waits at most until the state
machine's own step deadline, so a silent peer costs one step timeout, never more; a stream that
ends early or carries bytes that do not decode fails the negotiation with a counted reason.

A provider reserves the GPUs it accepted until the renter opens the escrow (or the hold runs
out), so two renters can never be promised the same GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from protocol.effects import Effect, Send
from protocol.identity import PeerKey, peer_id_from_public_key
from protocol.messages import Binding, Offer
from protocol.negotiation import (
    FirstAgreementWins,
    ProviderNegotiation,
    RenterNegotiation,
    State,
)
from protocol.params import Params

from .host import GossipHost
from .reqresp import PeerClosed, ReadTimeout, ReqRespError, close_quietly, read_frame, write_frame

log = logging.getLogger(__name__)

NEGOTIATE_PROTOCOL = "/gpumarket/negotiate/1"
MAX_NEGOTIATION_FRAME = 4096  # the largest negotiation message (Proposal) is 4 KiB
DEFAULT_OPEN_HOLD_MS = 120_000  # how long accepted GPUs wait for the renter's escrow
CANCEL_GRACE_S = 1.0  # a cancelled negotiation waits this long for the provider to close


def now_ms() -> int:
    return int(time.time() * 1000)


class Capacity:
    """Which of the provider's GPUs are free, reserved for an accepted agreement, or rented."""

    def __init__(self, gpus: Sequence[bytes]) -> None:
        self.gpus = tuple(gpus)
        self._taken: dict[bytes, tuple[bytes, int | None]] = {}  # gpu -> (agreement id, hold until)

    def free(self, now: int) -> tuple[bytes, ...]:
        self._expire(now)
        return tuple(g for g in self.gpus if g not in self._taken)

    def reserve(self, agreement_id: bytes, gpus: Sequence[bytes], until_ms: int) -> None:
        for g in gpus:
            if g in self._taken:
                raise ValueError("GPU already reserved")
        for g in gpus:
            self._taken[g] = (agreement_id, until_ms)

    def commit(self, agreement_id: bytes) -> None:
        """The escrow is open: the reservation no longer expires."""
        for g, (aid, _) in list(self._taken.items()):
            if aid == agreement_id:
                self._taken[g] = (aid, None)

    def release(self, agreement_id: bytes) -> None:
        for g, (aid, _) in list(self._taken.items()):
            if aid == agreement_id:
                del self._taken[g]

    def _expire(self, now: int) -> None:
        for g, (_, until) in list(self._taken.items()):
            if until is not None and until <= now:
                del self._taken[g]


@dataclass
class NegotiationStats:
    """Counters by outcome and reason name, for logs and the node's metrics."""

    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


OnAgreed = Callable[[ProviderNegotiation, ID], Awaitable[None]]


class ProviderDesk:
    """Answers negotiation streams for this provider's current offer."""

    def __init__(
        self,
        host: GossipHost,
        key: PeerKey,
        wallet_key: bytes,
        params: Params,
        current_offer: Callable[[], tuple[Offer, bytes] | None],
        capacity: Capacity,
        min_price_per_gpu_second: Callable[[], int],
        on_agreed: OnAgreed,
        *,
        open_hold_ms: int = DEFAULT_OPEN_HOLD_MS,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.host = host
        self.key = key
        self.wallet_key = wallet_key
        self.params = params
        self.current_offer = current_offer
        self.capacity = capacity
        self.min_price = min_price_per_gpu_second
        self.on_agreed = on_agreed
        self.open_hold_ms = open_hold_ms
        self.clock = clock
        self.stats = NegotiationStats()
        # Streams run concurrently; GPU choice and reservation must not interleave.
        self._capacity_lock = trio.Lock()

    def install(self) -> None:
        self.host.host.set_stream_handler(TProtocol(NEGOTIATE_PROTOCOL), self._on_stream)

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        current = self.current_offer()
        try:
            if current is None:
                self.stats.count("no_offer")
                return  # closing the stream tells the renter there is nothing to negotiate
            offer, digest = current
            machine = ProviderNegotiation(
                offer, digest, self.key, self.wallet_key, self.capacity.free(self.clock()),
                self.min_price(), self.params, open_hold_ms=self.open_hold_ms,
            )
            await self._drive(machine, stream, peer)
        except Exception:
            log.exception("negotiation stream from %s failed", peer)
            self.stats.count("driver_error")
        finally:
            await close_quietly(stream)

    async def _drive(self, machine: ProviderNegotiation, stream: INetStream, peer: ID) -> None:
        while machine.state not in (State.AGREED, State.FAILED):
            timeout = _seconds_until(machine.next_deadline(), self.clock(),
                                     self.params.negotiation_step_timeout_ms)
            try:
                data = await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME, timeout=timeout)
            except ReadTimeout:
                await _send_all(stream, machine.on_timer(max(self.clock(), machine.next_deadline() or 0)))
                break
            except ReqRespError as exc:  # closed, oversized frame, bad prefix
                self.stats.count(f"stream_{type(exc).__name__}")
                return
            async with self._capacity_lock:
                if machine.state is not State.AGREED:
                    machine.set_free_gpus(self.capacity.free(self.clock()))
                effects = machine.receive_data(data, self.clock())
                if machine.state is State.AGREED:
                    assert machine.terms is not None and machine.accept is not None
                    # Held while the consent can open the escrow (block time <= open_by).
                    self.capacity.reserve(machine.terms.agreement_id(), machine.accept.gpus,
                                          (machine.terms.open_by + 1) * 1000)
            await _send_all(stream, effects)
        if machine.state is State.AGREED:
            await self._await_close_or_cancel(machine, stream)
        if machine.state is State.AGREED:
            self.stats.count("agreed")
            await self.on_agreed(machine, peer)
        else:
            if machine.terms is not None:  # accepted, then cancelled: free the GPUs now
                self.capacity.release(machine.terms.agreement_id())
            failure = machine.failure
            self.stats.count(failure.reason_name if failure else "failed")

    async def _await_close_or_cancel(self, machine: ProviderNegotiation, stream: INetStream) -> None:
        """After Accept the renter closes the stream, unless its cancel crossed our Accept
        (it took another provider's agreement): then a NegotiationReject arrives first."""
        try:
            data = await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME,
                                    timeout=self.params.negotiation_step_timeout_ms / 1000)
        except ReqRespError:
            return  # closed (the normal case) or silent: the agreement stands
        await _send_all(stream, machine.receive_data(data, self.clock()))


async def _send_all(stream: INetStream, effects: list[Effect]) -> None:
    for effect in effects:
        if isinstance(effect, Send):
            try:
                await write_frame(stream, effect.message.encode(), max_frame=MAX_NEGOTIATION_FRAME)
            except PeerClosed:
                return


def _seconds_until(deadline: int | None, now: int, default_ms: int) -> float:
    if deadline is None:
        return default_ms / 1000
    return max(0.0, (deadline - now) / 1000) + 0.05  # a little slack: the machine decides


async def _dial_offer(host: GossipHost, candidate: "Candidate") -> None:
    """Connect to the provider through the addresses its signed offer names, unless already
    connected: the offer may have reached us through relays, which do not pass addresses on.
    (Validation guarantees each address ends in the provider's own /p2p/ id.)"""
    peer = candidate.resolve_peer()
    if peer in host.host.get_network().connections:
        return
    for addr in candidate.offer.addrs:
        try:
            await host.connect(addr)
            return
        except Exception as exc:
            log.info("dialling %s failed: %r", addr, exc)


async def _await_peer_close(stream: INetStream) -> None:
    """After we sent a NegotiationReject, let the peer read it and close first (bounded):
    closing at once can drop the frame, and a provider takes a plain close for agreement."""
    with trio.move_on_after(CANCEL_GRACE_S):
        try:
            await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME, timeout=CANCEL_GRACE_S)
        except ReqRespError:
            pass


@dataclass
class Candidate:
    """An offer to negotiate for, and the libp2p peer to reach its provider at."""

    offer: Offer
    digest: bytes
    peer_id: ID | None = None  # default: derived from the offer's provider key

    def resolve_peer(self) -> ID:
        return self.peer_id or ID.from_base58(peer_id_from_public_key(self.offer.provider))


async def negotiate_first(
    host: GossipHost,
    key: PeerKey,
    binding: Binding,
    candidates: Sequence[Candidate],
    *,
    gpu_count: int,
    duration_s: int,
    max_price_per_gpu_second: int,
    access_key: str,
    params: Params,
    rng: Any,
    clock: Callable[[], int] = now_ms,
    **limits: Any,
) -> FirstAgreementWins:
    """Negotiate with every candidate at once; the first agreement wins and the rest are
    cancelled cleanly (NegotiationReject CANCELLED). Returns the group: `group.winner` is the
    agreed RenterNegotiation, or None if every negotiation failed (see each `.failure`)."""
    machines = [
        RenterNegotiation(c.offer, c.digest, key, binding, gpu_count, duration_s,
                          max_price_per_gpu_second, access_key, params, rng, **limits)
        for c in candidates
    ]
    group = FirstAgreementWins(machines)
    streams: dict[bytes, INetStream] = {}  # provider key -> stream
    scopes: dict[bytes, trio.CancelScope] = {}  # negotiation id -> its stream task's scope
    lock = trio.Lock()

    def stop_finished(current: RenterNegotiation) -> None:
        # A machine ended by another's agreement (cancelled) need not wait out its step
        # deadline, but it must not cut the stream at once either: the provider answers our
        # NegotiationReject by closing its side, and closing ours first could drop the reject
        # (the provider would then take the closed stream for an agreement that stands).
        for m in machines:
            if m is not current and m.state is State.FAILED and m.negotiation_id in scopes:
                scope = scopes[m.negotiation_id]
                scope.deadline = min(scope.deadline, trio.current_time() + CANCEL_GRACE_S)

    async def dispatch(effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send) and effect.to in streams:
                try:
                    await write_frame(streams[effect.to], effect.message.encode(),
                                      max_frame=MAX_NEGOTIATION_FRAME)
                except PeerClosed:
                    pass

    async def run_one(candidate: Candidate, machine: RenterNegotiation) -> None:
        with trio.CancelScope() as scope:
            scopes[machine.negotiation_id] = scope
            await talk(candidate, machine)

    async def talk(candidate: Candidate, machine: RenterNegotiation) -> None:
        provider = candidate.offer.provider
        try:
            with trio.fail_after(params.negotiation_step_timeout_ms / 1000):
                await _dial_offer(host, candidate)
                stream = await host.host.new_stream(candidate.resolve_peer(),
                                                    [TProtocol(NEGOTIATE_PROTOCOL)])
        except Exception as exc:
            log.info("cannot reach provider %s: %r", candidate.resolve_peer(), exc)
            async with lock:
                await dispatch(machine.cancel(clock(), f"provider unreachable: {type(exc).__name__}"))
            return
        streams[provider] = stream
        try:
            async with lock:
                await dispatch(machine.start(clock()))
            while machine.state not in (State.AGREED, State.FAILED):
                timeout = _seconds_until(machine.next_deadline(), clock(),
                                         params.negotiation_step_timeout_ms)
                try:
                    data = await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME, timeout=timeout)
                except ReadTimeout:
                    async with lock:
                        await dispatch(machine.on_timer(max(clock(), machine.next_deadline() or 0)))
                    continue
                except ReqRespError as exc:
                    async with lock:
                        if machine.state not in (State.AGREED, State.FAILED):
                            await dispatch(machine.cancel(clock(), f"stream ended: {exc}"))
                    return
                async with lock:
                    await dispatch(group.receive_data(machine.negotiation_id, data, clock()))
                    stop_finished(machine)
            if machine.state is State.FAILED:
                await _await_peer_close(stream)
        finally:
            await close_quietly(stream)

    async with trio.open_nursery() as nursery:
        for candidate, machine in zip(candidates, machines):
            nursery.start_soon(run_one, candidate, machine)
    return group
