"""Negotiation over libp2p streams: the driver around protocol/negotiation.py's state machines.

Protocol `/gpumarket/negotiate/1` (specs/node.md): the renter opens a stream to the provider and
both sides exchange varint-framed canonical messages (Proposal, CounterProposal, Accept,
NegotiationReject) until the negotiation ends. Every read waits at most until the state
machine's own step deadline, so a silent peer costs one step timeout, never more; a stream that
ends early or carries bytes that do not decode fails the negotiation with a counted reason.

A provider reserves the GPUs it accepted until the renter opens the escrow (or the open hold runs
out), so two renters can never be promised the same GPU. Holds cost the holder: before Accept the
renter's wallet must show the deposit and an allowance to the escrow on chain, and one renter
peer or wallet may hold only a few unopened agreements at a time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from protocol.effects import Effect, EscrowCall, Persist, Send
from protocol.identity import PeerKey, peer_id_from_public_key
from protocol.messages import Accept, Binding, Offer
from protocol.negotiation import (
    Fault,
    FirstAgreementWins,
    ProviderNegotiation,
    Reason,
    RenterNegotiation,
    State,
)
from protocol.params import Params

from .clock import now_ms
from .effects import EffectExecutor
from .host import GossipHost
from .reqresp import PeerClosed, ReadTimeout, ReqRespError, close_quietly, read_frame, write_frame

log = logging.getLogger(__name__)

NEGOTIATE_PROTOCOL = "/gpumarket/negotiate/1"
MAX_NEGOTIATION_FRAME = 4096  # the largest negotiation message (Proposal) is 4 KiB
# How long accepted GPUs wait for the renter's escrow: the provider's open hold. An honest
# renter's node approves the escrow before it proposes and opens as soon as Accept arrives,
# in about 0.1 s on a local chain (node.md, "Negotiation stream": measured figures); 30 s leaves
# room for a few blocks of a public chain. One setting: the node, the desk and the consent's
# deadline all read this value (ProviderSettings.open_hold_ms).
DEFAULT_OPEN_HOLD_MS = 30_000
DEFAULT_MAX_PENDING_PER_PEER = 2  # unopened agreements one renter peer may hold at this provider
DEFAULT_MAX_PENDING_PER_WALLET = 2  # ... and one renter wallet, whatever peer ids it uses
# A hold that ended unopened counts against its renter peer's and wallet's caps this long.
DEFAULT_UNOPENED_MEMORY_MS = 3_600_000
CANCEL_GRACE_S = 1.0  # a cancelled negotiation waits this long for the provider to close


@dataclass(frozen=True)
class Hold:
    """GPUs taken by one agreement. `until_ms` None: the escrow is open (a rental, not a hold).
    Unopened holds name the renter peer and wallet they count against, and the deposit."""

    gpus: tuple[bytes, ...]
    until_ms: int | None
    peer: str = ""
    wallet: bytes = b""
    deposit: int = 0


class Capacity:
    """Which of the provider's GPUs are free, held for an accepted agreement, or rented.

    It also remembers, for `unopened_memory_ms`, which renter peers and wallets let a hold end
    unopened (it ran out, or the renter cancelled after Accept): the desk counts those against
    the same caps as the holds still open, so one wallet cannot hold the GPUs again and again."""

    def __init__(self, gpus: Sequence[bytes], *,
                 unopened_memory_ms: int = DEFAULT_UNOPENED_MEMORY_MS,
                 max_remembered: int = 10_000) -> None:
        self.gpus = tuple(gpus)
        self.unopened_memory_ms = unopened_memory_ms
        self.max_remembered = max_remembered
        self._holds: dict[bytes, Hold] = {}  # agreement id -> hold
        self._ended: OrderedDict[str | bytes, list[int]] = OrderedDict()  # peer/wallet -> times

    def free(self, now: int) -> tuple[bytes, ...]:
        self._expire(now)
        taken = {g for h in self._holds.values() for g in h.gpus}
        return tuple(g for g in self.gpus if g not in taken)

    def reserve(self, agreement_id: bytes, gpus: Sequence[bytes], until_ms: int | None, *,
                peer: str = "", wallet: bytes = b"", deposit: int = 0) -> None:
        taken = {g for h in self._holds.values() for g in h.gpus}
        if any(g in taken for g in gpus) or agreement_id in self._holds:
            raise ValueError("GPU already reserved")
        self._holds[agreement_id] = Hold(tuple(gpus), until_ms, peer, wallet, deposit)

    def commit(self, agreement_id: bytes) -> None:
        """The escrow is open: the reservation no longer expires."""
        hold = self._holds.get(agreement_id)
        if hold is not None:
            self._holds[agreement_id] = replace(hold, until_ms=None)

    def release(self, agreement_id: bytes, *, ended_unopened_at: int | None = None) -> None:
        """Free the GPUs. `ended_unopened_at`: the renter walked away from an accepted, unopened
        agreement at this time (cancelled after Accept): remembered like a hold that ran out."""
        hold = self._holds.pop(agreement_id, None)
        if hold is not None and hold.until_ms is not None and ended_unopened_at is not None:
            self._remember_ended(hold, ended_unopened_at)

    def unopened(self, now: int) -> dict[bytes, Hold]:
        """The holds still waiting for their escrow, by agreement id."""
        self._expire(now)
        return {aid: h for aid, h in self._holds.items() if h.until_ms is not None}

    def ended_unopened(self, who: str | bytes, now: int) -> int:
        """How many of `who`'s (a peer id or a wallet) holds ended unopened within the memory."""
        self._expire(now)
        times = self._ended.get(who)
        if not times:
            return 0
        cutoff = now - self.unopened_memory_ms
        times[:] = [t for t in times if t > cutoff]
        return len(times)

    def next_expiry(self) -> int | None:
        ends = [h.until_ms for h in self._holds.values() if h.until_ms is not None]
        return min(ends) if ends else None

    def _expire(self, now: int) -> None:
        for aid, hold in list(self._holds.items()):
            if hold.until_ms is not None and hold.until_ms <= now:
                del self._holds[aid]
                self._remember_ended(hold, hold.until_ms)

    def _remember_ended(self, hold: Hold, at: int) -> None:
        for who in (hold.peer, hold.wallet):
            if who:
                times = self._ended.pop(who, [])
                times.append(at)
                self._ended[who] = times[-16:]  # more than any cap: enough to count
        while len(self._ended) > self.max_remembered:  # the least recently struck goes first
            self._ended.popitem(last=False)


class FundsUnavailable(Exception):
    """The renter's funds could not be read in time (slow chain, or too many checks at once)."""


ReadFunds = Callable[[bytes, bytes], Awaitable[tuple[int, int]]]


class RenterFunds:
    """A renter wallet's token balance and allowance to the escrow, read from the chain before
    the provider sends Accept. Reads run through `read` (a worker thread: the caller's chain
    client) under `timeout_s`; at most `at_once` run together; each answer is kept `ttl_s` so a
    renter that negotiates again (or a flood from one funded wallet) costs one read per `ttl_s`.

    An answer is kept with the time its read began. A caller about to refuse asks for one begun
    at or after `read_since` (when the proposal arrived): a renter approves the escrow just
    before it proposes, so only such a reading surely sees that approval. No age does: a reading
    kept from the renter's last negotiation may be milliseconds old when the renter, having
    opened (spending the allowance) and approved again, proposes its next rental. So a refused
    proposal costs a read of its own: no more than a fresh unfunded wallet per proposal costs,
    which is free to make and which no cache holds."""

    def __init__(self, read: ReadFunds, *, ttl_s: float = 2.0, timeout_s: float = 5.0,
                 at_once: int = 4, max_cached: int = 4096) -> None:
        self._read = read
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_cached = max_cached
        self._limiter = trio.CapacityLimiter(at_once)
        self._cache: dict[tuple[bytes, bytes], tuple[float, tuple[int, int]]] = {}
        self.reads = 0  # chain reads made (for metrics and tests)

    async def get(self, wallet: bytes, token: bytes, *,
                  read_since: float | None = None) -> tuple[int, int]:
        """(balance, allowance) from a read begun less than `ttl_s` ago or, given `read_since`
        (a `trio.current_time()`), begun at or after it; raises FundsUnavailable."""
        key = (wallet, token)

        def kept() -> tuple[int, int] | None:
            hit = self._cache.get(key)
            if hit is None:
                return None
            began, value = hit
            if read_since is not None:
                return value if began >= read_since else None
            return value if trio.current_time() - began < self.ttl_s else None

        if (value := kept()) is not None:
            return value
        with trio.move_on_after(self.timeout_s):
            async with self._limiter:
                if (value := kept()) is not None:  # another stream may have read it meanwhile
                    return value
                self.reads += 1
                began = trio.current_time()
                try:
                    value = await self._read(wallet, token)
                except Exception as exc:
                    raise FundsUnavailable(f"reading the renter's funds failed: {exc!r}") from None
                hit = self._cache.pop(key, None)
                if hit is None or hit[0] <= began:  # else a read begun later ended first: keep it
                    hit = (began, value)
                if len(self._cache) >= self.max_cached:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = hit
                return value
        raise FundsUnavailable(f"the chain did not answer within {self.timeout_s:g} s")


@dataclass(frozen=True)
class HoldPolicy:
    """What a provider asks before it sends Accept and how long it then holds the GPUs
    (specs/node.md, "Negotiation stream")."""

    open_hold_ms: int = DEFAULT_OPEN_HOLD_MS
    max_pending_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER
    max_pending_per_wallet: int = DEFAULT_MAX_PENDING_PER_WALLET


@dataclass
class NegotiationStats:
    """Counters by outcome and reason name, for logs and the node's metrics."""

    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


OnAgreed = Callable[[ProviderNegotiation, ID], Awaitable[None]]
# The provider's persist port: make `effect` (the machine's Persist of its proposal and accept)
# durable; it runs before the Accept is sent.
OnPersist = Callable[[ProviderNegotiation, ID, Persist], Awaitable[None]]
# A persisted agreement ended before it stood (the renter's cancel crossed our Accept).
OnWithdrawn = Callable[[bytes], Awaitable[None]]


class ProviderDesk:
    """Answers negotiation streams for this provider's current offer.

    Between the machine's decision to accept and the Accept leaving, the desk checks what the
    machine cannot (specs/node.md, "Negotiation stream"): the renter peer and wallet are under
    their caps of unopened agreements (TOO_MANY_PENDING), and the renter wallet's token balance
    covers this deposit plus its other unopened ones here and its allowance to the escrow covers
    this deposit (INSUFFICIENT_FUNDS; PROVIDER_BUSY when the chain does not answer in time). The
    GPUs are held meanwhile; a refusal frees them and the machine withholds the Accept."""

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
        open_hold_ms: int | None = None,
        policy: HoldPolicy = HoldPolicy(),
        funds: RenterFunds | None = None,
        on_holds_changed: Callable[[], None] | None = None,
        clock: Callable[[], int] = now_ms,
        persist: OnPersist | None = None,
        on_withdrawn: OnWithdrawn | None = None,
    ) -> None:
        self.host = host
        self.key = key
        self.wallet_key = wallet_key
        self.params = params
        self.current_offer = current_offer
        self.capacity = capacity
        self.min_price = min_price_per_gpu_second
        self.on_agreed = on_agreed
        if open_hold_ms is not None:
            policy = replace(policy, open_hold_ms=open_hold_ms)
        self.policy = policy
        self.funds = funds  # None: no chain to ask (tests of the stream layer alone)
        self.persist = persist  # None: no store (tests of the stream layer alone)
        self.on_withdrawn = on_withdrawn
        self.on_holds_changed = on_holds_changed or (lambda: None)
        self.clock = clock
        self.stats = NegotiationStats()
        # Streams run concurrently; GPU choice and reservation must not interleave.
        self._capacity_lock = trio.Lock()

    @property
    def open_hold_ms(self) -> int:
        return self.policy.open_hold_ms

    def install(self) -> None:
        self.host.host.set_stream_handler(TProtocol(NEGOTIATE_PROTOCOL), self._on_stream)

    def _free_for(self, offer: Offer) -> tuple[bytes, ...]:
        # Only GPUs the renter's offer lists: right after a hold ends the free GPUs may include
        # one that the current offer (announced while it was held) leaves out.
        listed = {g.uuid_digest for g in offer.gpus}
        return tuple(g for g in self.capacity.free(self.clock()) if g in listed)

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        current = self.current_offer()
        try:
            if current is None:
                self.stats.count("no_offer")
                return  # closing the stream tells the renter there is nothing to negotiate
            offer, digest = current
            machine = ProviderNegotiation(
                offer, digest, self.key, self.wallet_key, self._free_for(offer),
                self.min_price(), self.params, open_hold_ms=self.open_hold_ms,
            )
            await self._drive(machine, stream, peer)
        except Exception:
            log.exception("negotiation stream from %s failed", peer)
            self.stats.count("driver_error")
        finally:
            await close_quietly(stream)

    def _executor(self, machine: ProviderNegotiation, stream: INetStream, peer: ID,
                  persisted: set[bytes]) -> EffectExecutor:
        async def persist(effect: Persist) -> None:
            await self.persist(machine, peer, effect)
            persisted.add(effect.agreement_id)

        return EffectExecutor(persist=persist if self.persist is not None else None,
                              send=lambda effect: _send(stream, effect),
                              leave=(Persist,) if self.persist is None else ())

    async def _drive(self, machine: ProviderNegotiation, stream: INetStream, peer: ID) -> None:
        persisted: set[bytes] = set()  # agreement ids whose records the store holds
        executor = self._executor(machine, stream, peer, persisted)
        while machine.state not in (State.AGREED, State.FAILED):
            timeout = _seconds_until(machine.next_deadline(), self.clock(),
                                     self.params.negotiation_step_timeout_ms)
            try:
                data = await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME, timeout=timeout)
            except ReadTimeout:
                await executor.run(machine.on_timer(max(self.clock(), machine.next_deadline() or 0)))
                break
            except ReqRespError as exc:  # closed, oversized frame, bad prefix
                self.stats.count(f"stream_{type(exc).__name__}")
                return
            refusal = None
            async with self._capacity_lock:
                machine.set_free_gpus(self._free_for(machine.offer))
                effects = machine.receive_data(data, self.clock())
                # The machine decided to accept when it asks to persist its Accept: before any
                # of these effects is carried out, hold the GPUs and check what it cannot.
                accept = _accept_in(effects)
                if accept is not None:
                    refusal = self._over_cap(machine, peer)
                    if refusal is None:
                        assert machine.terms is not None
                        # Held while the consent can open the escrow (block time <= open_by).
                        self.capacity.reserve(
                            accept.agreement_id, accept.gpus, (accept.open_by + 1) * 1000,
                            peer=peer.to_base58(), wallet=machine.terms.renter,
                            deposit=machine.terms.deposit)
            if accept is not None:
                if refusal is None:
                    refusal = await self._check_funds(machine)  # GPUs held meanwhile
                if refusal is not None:
                    self.capacity.release(accept.agreement_id)
                    effects = machine.withhold(self.clock(), *refusal)
                else:
                    self.on_holds_changed()  # the offer is re-announced without these GPUs
            # In order: the proposal and the accept are durable before the consent leaves.
            await executor.run(effects)
        if machine.state is State.AGREED:
            await self._await_close_or_cancel(machine, stream, executor)
        if machine.state is State.AGREED:
            self.stats.count("agreed")
            await self.on_agreed(machine, peer)
        else:
            if machine.terms is not None:  # accepted, then it ended: free the GPUs now
                aid = machine.terms.agreement_id()
                # The renter walked away after our Accept (its cancel): remembered against its
                # caps. A refusal of ours (withheld Accept) is not the renter's doing.
                walked_away = machine.failure is not None and machine.failure.fault is Fault.REMOTE
                self.capacity.release(aid, ended_unopened_at=self.clock() if walked_away else None)
                self.on_holds_changed()
                if aid in persisted and self.on_withdrawn is not None:
                    await self.on_withdrawn(aid)
            failure = machine.failure
            self.stats.count(failure.reason_name if failure else "failed")

    def _over_cap(self, machine: ProviderNegotiation, peer: ID) -> tuple[Reason, str] | None:
        assert machine.terms is not None
        # Holds still waiting for an escrow, plus those that ended unopened lately.
        now = self.clock()
        holds = self.capacity.unopened(now).values()
        who = peer.to_base58()
        by_peer = sum(1 for h in holds if h.peer == who) + self.capacity.ended_unopened(who, now)
        if by_peer >= self.policy.max_pending_per_peer:
            return (Reason.TOO_MANY_PENDING,
                    f"this peer has {by_peer} agreements here unopened or lately left unopened "
                    f"(at most {self.policy.max_pending_per_peer})")
        wallet = machine.terms.renter
        by_wallet = sum(1 for h in holds if h.wallet == wallet) + \
            self.capacity.ended_unopened(wallet, now)
        if by_wallet >= self.policy.max_pending_per_wallet:
            return (Reason.TOO_MANY_PENDING,
                    f"wallet 0x{wallet.hex()} has {by_wallet} agreements here unopened or lately "
                    f"left unopened (at most {self.policy.max_pending_per_wallet})")
        return None

    async def _check_funds(self, machine: ProviderNegotiation) -> tuple[Reason, str] | None:
        if self.funds is None:
            return None
        terms = machine.terms
        assert terms is not None
        aid = terms.agreement_id()
        others = sum(h.deposit for a, h in self.capacity.unopened(self.clock()).items()
                     if h.wallet == terms.renter and a != aid)
        need = terms.deposit + others
        arrived = trio.current_time()  # the proposal is here: so is the approval made before it
        try:
            balance, allowance = await self.funds.get(terms.renter, terms.token)
            if balance < need or allowance < terms.deposit:  # refuse on a reading made since
                balance, allowance = await self.funds.get(terms.renter, terms.token,
                                                          read_since=arrived)
        except FundsUnavailable as exc:
            return Reason.PROVIDER_BUSY, str(exc)
        if balance < need:
            return (Reason.INSUFFICIENT_FUNDS,
                    f"balance {balance} < {need} (deposit {terms.deposit} + {others} for this "
                    "wallet's other unopened agreements here)")
        if allowance < terms.deposit:
            return (Reason.INSUFFICIENT_FUNDS,
                    f"allowance to the escrow {allowance} < deposit {terms.deposit}: approve "
                    "before proposing")
        return None

    async def _await_close_or_cancel(self, machine: ProviderNegotiation, stream: INetStream,
                                     executor: EffectExecutor) -> None:
        """After Accept the renter closes the stream, unless its cancel crossed our Accept
        (it took another provider's agreement): then a NegotiationReject arrives first."""
        try:
            data = await read_frame(stream, max_frame=MAX_NEGOTIATION_FRAME,
                                    timeout=self.params.negotiation_step_timeout_ms / 1000)
        except ReqRespError:
            return  # closed (the normal case) or silent: the agreement stands
        await executor.run(machine.receive_data(data, self.clock()))


async def _send(stream: INetStream, effect: Send) -> None:
    """The negotiation stream's send port. A peer that closed gets nothing more; the machine
    learns of it from the stream (or its deadline), so the effects after it still run."""
    try:
        await write_frame(stream, effect.message.encode(), max_frame=MAX_NEGOTIATION_FRAME)
    except PeerClosed:
        log.info("negotiation peer closed before %s", type(effect.message).__name__)


def _accept_in(effects: list[Effect]) -> Accept | None:
    """The Accept a provider machine asks to persist (it decided to accept), if any."""
    for effect in effects:
        if isinstance(effect, Persist) and isinstance(effect.message, Accept):
            return effect.message
    return None


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
    tried = []
    for addr in candidate.offer.addrs:
        try:
            await host.connect(addr)
            return
        except Exception as exc:
            log.info("dialling %s failed: %r", addr, exc)
            how = "relayed" if "/p2p-circuit" in addr else "direct"
            tried.append(f"{how} {addr.split('/p2p/')[0]}: {type(exc).__name__} {str(exc)[:80]}")
    # every address failed: say so (before any escrow is opened), not a bare timeout
    raise ConnectionError("unreachable from here (" + ("; ".join(tried) or
                          "the offer names no address and we are not connected") + ")")


HOLE_PUNCH_WAIT_S = 8.0  # a relay too short for the rental: how long a hole punch may take


async def _check_relay_limits(host: GossipHost, candidate: "Candidate", duration_s: int,
                              wait_s: float) -> None:
    """Before anything is agreed (so before any escrow): when the provider is reached only
    through a relay whose published limits (seconds, bytes per circuit) do not cover this
    rental, try for a direct connection (hole punch) for up to ``wait_s``; failing that, say
    so with the numbers (ConnectionError)."""
    reach = host.reachability
    if reach is None:
        return
    peer = candidate.resolve_peer()
    interval = candidate.offer.terms.heartbeat_interval_s
    why = reach.relay_shortfall(peer, duration_s, interval)
    if why is None:
        return
    log.info("provider %s: %s; trying for a direct connection", peer, why)
    if await reach.wait_direct(peer, wait_s):
        return
    why = reach.relay_shortfall(peer, duration_s, interval) or why
    raise ConnectionError(f"unreachable from here for this rental ({why}; no direct "
                          f"connection: hole punching {'failed' if reach.dcutr else 'is off'})")


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
    persist: Callable[[RenterNegotiation, Persist], Awaitable[None]] | None = None,
    escrow: Callable[[RenterNegotiation, EscrowCall], Awaitable[None]] | None = None,
    **limits: Any,
) -> FirstAgreementWins:
    """Negotiate with every candidate at once; the first agreement wins and the rest are
    cancelled cleanly (NegotiationReject CANCELLED). Returns the group: `group.winner` is the
    agreed RenterNegotiation, or None if every negotiation failed (see each `.failure`).

    The winner's effects are carried out in order through `persist` (its Accept, durable) and
    then `escrow` (the EscrowCall open), each called with the winner; only the winner emits
    them. Without these ports the caller carries those effects out itself (tests of the stream
    layer alone)."""
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

    async def send(effect: Send) -> None:
        if effect.to in streams:  # none yet: the provider was unreachable
            await _send(streams[effect.to], effect)

    def winner_port(port):
        return None if port is None else (lambda effect: port(group.winner, effect))

    leave = tuple(t for t, port in ((Persist, persist), (EscrowCall, escrow)) if port is None)
    executor = EffectExecutor(send=send, persist=winner_port(persist),
                              escrow=winner_port(escrow), leave=leave)
    dispatch = executor.run

    async def run_one(candidate: Candidate, machine: RenterNegotiation) -> None:
        with trio.CancelScope() as scope:
            scopes[machine.negotiation_id] = scope
            await talk(candidate, machine)

    async def talk(candidate: Candidate, machine: RenterNegotiation) -> None:
        provider = candidate.offer.provider
        phase = "dial"
        try:
            with trio.fail_after(params.negotiation_step_timeout_ms / 1000):
                await _dial_offer(host, candidate)
                phase = "relay limits"
                await _check_relay_limits(host, candidate, duration_s, min(
                    HOLE_PUNCH_WAIT_S, params.negotiation_step_timeout_ms / 1000 * 0.6))
                phase = "open stream"
                stream = await host.host.new_stream(candidate.resolve_peer(),
                                                    [TProtocol(NEGOTIATE_PROTOCOL)])
        except Exception as exc:
            log.info("cannot reach provider %s (%s): %r", candidate.resolve_peer(), phase, exc)
            async with lock:
                # Another provider may have agreed while this dial hung: the group has already
                # cancelled this machine (cancelling it twice is a LocalProtocolError).
                if machine.state not in (State.AGREED, State.FAILED):
                    why = str(exc) if isinstance(exc, ConnectionError) else type(exc).__name__
                    if isinstance(exc, trio.TooSlowError) and candidate.resolve_peer() not in \
                            host.host.get_network().connections:
                        why = (f"unreachable from here (no connection within "
                               f"{params.negotiation_step_timeout_ms / 1000:g} s to "
                               + ", ".join(a.split("/p2p/")[0] for a in candidate.offer.addrs) + ")")
                    await dispatch(machine.cancel(clock(), f"provider unreachable: {why}"[:500]))
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
