"""A gpumarket node: the I/O shell that runs the protocol core for one participant.

One trio nursery; every service is started with `await nursery.start(...)` and is running when
that returns: the libp2p host, the offer service (gossip topic, offer book, offer sync), and for a
provider the offer publisher, the negotiation desk and the rental desk. A renter calls `rent()`,
which negotiates, opens the escrow and runs a rental session in the node's nursery. A watcher
polls the escrow's events and tells the rental machines about closes and settlements
(node/chainwatch.py).

Cancelling the node's scope shuts it down: the publisher withdraws the offer (shielded, 2 s),
streams close, and the store is flushed and closed.

Restart and resume: node/resume.py. The agreement records: node/records.py.
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from protocol.agreement import AgreementTerms
from protocol.effects import EscrowCall, Persist
from protocol.encoding import is_wire_text, to_wire_text
from protocol.identity import PeerKey, peer_id_from_public_key
from protocol.messages import (MAX_ADDR_LEN, MAX_IMAGE_LEN, MAX_OFFER_ADDRS, AccessGrant,
                               AgreementDetails, Binding, GpuMetrics, OfferTerms)
from protocol.money import PriceError, format_tokens, price_units_per_second
from protocol.negotiation import (FirstAgreementWins, ProviderNegotiation, RenterNegotiation,
                                  escrow_domain, renter_refusal)
from protocol.offerbook import Entry, OfferBook
from protocol.params import DEFAULT_PARAMS, Params
from protocol.rental import ProviderRental, RenterRental

from .chain import AsyncChain, ChainError, RpcUnavailableError, TxResult, WalletEscrow
from .addresses import NoDialableAddress, dialable_addrs, no_dialable_address_message
from .chainwatch import ChainWatchMixin
from .clock import SYSTEM_CLOCK, Clock, now_ms
from .config import ConfigError, ProviderSection
from .gpu import GpuProbe
from .host import GossipHost, HostConfig
from .identity import load_or_create_identity
from .discovery import Discovery, DiscoveryConfig
from .peer_table import PeerTable
from .reachability import ReachabilityConfig, Reachable
from .lifecycle import AgreementState, check_transition
from .negotiate import (DEFAULT_MAX_PENDING_PER_PEER, DEFAULT_MAX_PENDING_PER_WALLET,
                        DEFAULT_OPEN_HOLD_MS, DEFAULT_UNOPENED_MEMORY_MS, Candidate, Capacity, HoldPolicy, ProviderDesk,
                        RenterFunds, negotiate_first)
from .offers import OfferService
from .publisher import OfferPublisher, ProviderConfig
from .rentals import HelloRefused, ProviderSession, RentalDesk, RenterSession
from .spot import SpotMixin, SpotSettings
from .records import decode_agreement, decode_bindings  # noqa: F401  (re-exported: callers import them from here)
from .records import PendingAgreement, Rental, encode_agreement
from .reputation import LocalReputation
from .resume import RENTER_OPEN_WAIT_S, ResumeMixin  # noqa: F401  (RENTER_OPEN_WAIT_S: re-exported)
from .access import ExecDesk, ExecTarget
from .runtime import DockerRuntime, DockerSettings, HookRuntime, RentalSpec, Runtime, RuntimeError_, nvml_uuids
from .standing import STANDING_POLL_S, EscrowStanding
from .store import Store

log = logging.getLogger(__name__)

OPEN_RECHECK_S = 2.0  # provider: at most one chain read per unopened agreement this often
FUNDS_TIMEOUT_S = 5.0  # provider: the renter's balance and allowance must be read within this
STALE_RETRY_WAIT_S = 2.0  # renter: after OFFER_STALE, wait this long for the provider's new offer
RUNTIME_CHECK_S = 2.0  # provider: how often each rental's container is checked to be running
RUNTIME_STOP_S = 30.0  # provider: the node stopping waits this long for its containers' removal


@dataclass(frozen=True)
class ProviderSettings:
    """What a provider offers and how it serves, as the node runs it.

    The [provider] section of the configuration file (node.config.ProviderSection) is the one
    source of truth: its defaults are these defaults, and `from_section` derives these settings
    from it; the fields after `bandwidth_mbps` are not in the file (tests, demos, benchmarks).
    Prices are whole tokens per GPU-hour, exact; the node turns them into integer units per
    GPU-second with the token's decimals read from its contract (protocol/money.py)."""

    price_per_gpu_hour: Decimal = ProviderSection.price_per_gpu_hour  # advertised
    min_price_per_gpu_hour: Decimal | None = None  # floor in negotiation (default: advertised)
    min_duration_s: int = ProviderSection.min_duration_s
    max_duration_s: int = ProviderSection.max_duration_s
    heartbeat_interval_s: int = ProviderSection.heartbeat_interval_s
    grace_s: int = ProviderSection.grace_s
    region: str = ProviderSection.region
    bandwidth_mbps: int = ProviderSection.bandwidth_mbps
    access_hook: Sequence[str] | None = None  # command run when an agreement opens
    offer_lifetime_ms: int = ProviderConfig.lifetime_ms
    publish_interval_s: float = ProviderConfig.publish_interval_s
    nvml: Any = None  # the pynvml module (default) or a node.fake_nvml.FakeNvml
    access_hook_timeout_s: float = 30.0
    open_hold_ms: int = DEFAULT_OPEN_HOLD_MS  # accepted GPUs wait this long for the escrow
    max_pending_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER  # unopened agreements per renter peer
    max_pending_per_wallet: int = DEFAULT_MAX_PENDING_PER_WALLET  # ... and per renter wallet
    unopened_memory_ms: int = DEFAULT_UNOPENED_MEMORY_MS  # a hold left unopened counts this long
    docker: DockerSettings | None = None  # a container per rental (node/runtime.py)
    rental_runtime: Runtime | None = None  # given directly (tests); default: docker, else the hook
    images: tuple[str, ...] = ()  # published in the offer (the docker runtime's images)
    spot: SpotSettings | None = None  # interruptible GPUs and power curtailment (node/spot.py)

    @classmethod
    def from_section(cls, section: ProviderSection, *, nvml: Any = None) -> ProviderSettings:
        docker = None
        if section.runtime == "docker":
            docker = DockerSettings(images=section.images, gpus=section.docker_gpus,
                                    network=section.docker_network, cpus=section.docker_cpus,
                                    memory_mib=section.docker_memory_mib, pids=section.docker_pids,
                                    scratch=section.docker_scratch)
        return cls(price_per_gpu_hour=section.price_per_gpu_hour,
                   min_price_per_gpu_hour=section.min_price_per_gpu_hour,
                   min_duration_s=section.min_duration_s, max_duration_s=section.max_duration_s,
                   heartbeat_interval_s=section.heartbeat_interval_s, grace_s=section.grace_s,
                   region=section.region, bandwidth_mbps=section.bandwidth_mbps,
                   access_hook=section.access_hook or None, nvml=nvml, docker=docker,
                   images=section.images if docker is not None else (),
                   spot=SpotSettings.from_section(section))

    def make_runtime(self, provider_peer_id: str) -> Runtime | None:
        if self.rental_runtime is not None:
            return self.rental_runtime
        if self.docker is not None:
            return DockerRuntime(self.docker, provider_peer_id)
        if self.access_hook:
            return HookRuntime(tuple(self.access_hook), self.access_hook_timeout_s)
        return None

    def prices(self, decimals: int) -> tuple[int, int]:
        """(advertised, floor) in units per GPU-second of a token with `decimals`; ConfigError
        for a price that is not a whole number of units per second after rounding."""
        try:
            price = price_units_per_second(self.price_per_gpu_hour, decimals)
            floor = (price if self.min_price_per_gpu_hour is None
                     else price_units_per_second(self.min_price_per_gpu_hour, decimals))
        except PriceError as exc:
            raise ConfigError(f"provider price: {exc}") from None
        if floor > price:
            raise ConfigError("provider.min_price_per_gpu_hour is above price_per_gpu_hour")
        published = format_tokens(price * 3600, decimals)
        if Decimal(published) != Decimal(self.price_per_gpu_hour):  # specs/node.md, "Prices"
            log.info("price %s per GPU-hour is not a whole number of token units per second: "
                        "published as %s (%d units per GPU-second, rounded down)",
                        self.price_per_gpu_hour, published, price)
        return price, floor


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    wallet_key: bytes  # decrypted secp256k1 key (from the keystore); never written in clear
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: Sequence[str] = ()
    mdns: bool = False
    announce: Sequence[str] = ()  # public multiaddrs for offers (default: the dialable listen addrs)
    params: Params = DEFAULT_PARAMS
    provider: ProviderSettings | None = None
    # Renter: arbiter wallets it accepts in offers (config renter.arbiters); none by default
    arbiters: frozenset[bytes] = frozenset()
    name: str = "node"
    chain_poll_s: float = 0.5
    # Provider standing for the rank sort (node/standing.py): escrow events from this block
    # (the escrow's deployment block; 0 reads the whole chain), in chunks of this many blocks
    history_from_block: int = 0
    history_chunk_blocks: int = 10_000
    clock: Clock = SYSTEM_CLOCK  # the node's one clock (node/clock.py)
    on_preempt: Sequence[str] | None = None  # renter: command run when a preemption notice arrives
    # AutoNAT, relay v2 (serve while public, reserve while not), DCUtR: node/reachability.py
    reachability: ReachabilityConfig = field(default_factory=ReachabilityConfig)
    # finding peers beyond the bootstrap list (Kademlia FIND_NODE, bounded): node/discovery.py
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)


@dataclass
class _Opening:
    """What the renter's escrow port did with the winner's EscrowCall open."""

    tx: TxResult | None = None
    error: RentError | None = None
    agreed_at: float = 0.0


class RentError(Exception):
    """Renting failed for a reason a person can act on; str() is one line."""


class Node(SpotMixin, ChainWatchMixin, ResumeMixin):
    def __init__(self, config: NodeConfig, chain: AsyncChain) -> None:
        self.config = config
        self.chain = chain
        self.params = config.params
        self.clock = config.clock
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity = load_or_create_identity(self.data_dir / "identity.seed")
        self.key = PeerKey.from_signing_key(self.identity.signing_key)
        self.wallet_key = config.wallet_key
        self.binding = Binding.create(self.key, self.wallet_key, chain.chain.chain_id)
        self.host = GossipHost(self.identity, HostConfig(listen_addrs=tuple(config.listen),
                                                         bootstrap=tuple(config.bootstrap),
                                                         mdns=config.mdns,
                                                         reachability=config.reachability))
        if self.host.reachability is not None:
            self.host.reachability.on_change = self._reachability_changed
            # only a node that publishes offers needs to be dialled (a relay reservation);
            # a renter dials out
            self.host.reachability.wants_inbound = lambda: self.config.provider is not None
        self.escrow = WalletEscrow(chain, self.wallet_key)
        self.rentals: dict[bytes, Rental] = {}
        self.store: Store | None = None
        self.offers: OfferService | None = None
        self.standing: EscrowStanding | None = None  # provider wallets' escrow standing
        self.publisher: OfferPublisher | None = None
        self.capacity: Capacity | None = None
        self.desk: ProviderDesk | None = None
        self.rental_desk: RentalDesk | None = None
        self.runtime: Runtime | None = None  # provider: what a rental hands over
        self.exec_desk: ExecDesk | None = None  # provider: `gpumarket run/shell` into containers
        self._service_ended: dict[bytes, trio.Event] = {}  # provider: set at each StopService
        self._gpu_uuids: dict[bytes, str] = {}  # provider: uuid digest -> NVML UUID
        self._pending: dict[bytes, PendingAgreement] = {}  # accepted, escrow not yet seen
        self._opened_seen: dict[bytes, int] = {}  # pending ids the watcher saw Opened -> start (s)
        self._open_checked: dict[bytes, float] = {}  # pending id -> when the chain was last asked
        self._offer_dirty = trio.Event()  # the free GPUs may have changed: re-announce
        self._renter_unopened: dict[bytes, Any] = {}  # renter rows whose open may still be mined
        self._nursery: trio.Nursery | None = None
        self._probe: GpuProbe | None = None
        self._all_gpus: tuple = ()
        self.rng = random.Random()
        self.resumed: dict[str, list[str]] = {}  # what the last start did: outcome -> agreement ids
        self.accept_to_open_s: float | None = None  # renter: the last rent's Accept-to-Opened time
        self.hold_used_ms: list[int] = []  # provider: Accept to the renter's hello on the open escrow
        self.on_preempt = config.on_preempt

    @property
    def peer_id(self) -> ID:
        return self.host.peer_id

    @property
    def book(self):
        assert self.offers is not None
        return self.offers.book

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.addrs()]

    def announce_addrs(self) -> tuple[str, ...]:
        """Addresses put in our offers, each with /p2p/<our peer id> (node/addresses.py: the
        configured public ones, else the listen addresses with 0.0.0.0/:: replaced by the
        interfaces' addresses; never an unspecified one). Behind NAT with no configured
        address: only the relayed addresses (node/reachability.py) reach us."""
        reach = self.host.reachability
        if (not self.config.announce and reach is not None and reach.status is Reachable.PRIVATE
                and reach.circuit_addrs):
            found = list(reach.circuit_addrs)
        else:
            found = dialable_addrs(self.addrs(), self.config.announce, str(self.peer_id))
        return tuple(a for a in found if len(a) <= MAX_ADDR_LEN)[:MAX_OFFER_ADDRS]

    def _reachability_changed(self) -> None:
        """Reachability or our relay reservations changed: offer the new addresses."""
        if self.publisher is None or self._nursery is None:
            return
        addrs = self.announce_addrs()
        if addrs == self.publisher.config.addrs:
            return
        self.publisher.config = replace(self.publisher.config, addrs=addrs)
        if self.publisher.live is not None:
            self._nursery.start_soon(self._republish)

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus["Node"] = trio.TASK_STATUS_IGNORED) -> None:
        self.store = await Store.open(self.data_dir / "node.db")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.host.run)
                self.reputation = LocalReputation(self.store)
                await self.reputation.load()
                # The book keeps (and the node relays) only offers for the chain it serves.
                self.standing = EscrowStanding(
                    self.chain, self.params, self.chain.chain.token_address,
                    from_block=self.config.history_from_block,
                    chunk_blocks=self.config.history_chunk_blocks,
                    poll_s=max(self.config.chain_poll_s, STANDING_POLL_S))
                self.offers = OfferService(self.host, self.store, self.params, book=OfferBook(
                    self.params, score_of=self.reputation.score_of,
                    proven_of=self.standing.proven,
                    chain_ids=frozenset({self.chain.chain.chain_id})), now_ms=self.clock.now_ms)
                self.standing.book = self.offers.book
                nursery.start_soon(self.standing.run)
                await nursery.start(self.offers.run)
                if self.config.provider is not None:
                    await self._start_provider(nursery, self.config.provider)
                first_block = await self.chain.run(lambda: self.chain.chain.w3.eth.block_number)
                await self._resume()
                if self.runtime is not None:
                    # Containers of rentals resumed above were kept (start is idempotent);
                    # every other container of this node is removed.
                    done = await self.runtime.reconcile(set(self._live_provider_rentals()))
                    if done:
                        log.info("%s reconciled rental containers: %s", self.config.name, done)
                    nursery.start_soon(self._watch_runtime)
                if self.config.provider is not None:
                    self.desk.install()
                    self.rental_desk.install()
                    if self.exec_desk is not None:
                        self.exec_desk.install()
                    if self.rentals or self._pending:
                        await self._republish()
                nursery.start_soon(self._watch_chain, first_block)
                if self.config.provider is not None:
                    nursery.start_soon(self._keep_offer_current)
                nursery.start_soon(self._sync_on_join)
                self.peer_table = PeerTable(self.host, self.store, self.clock)
                nursery.start_soon(self.peer_table.run, bool(self.config.bootstrap))
                if self.config.discovery.enabled:
                    self.discovery = Discovery(self.host, self.peer_table.dialable,
                                               self.config.discovery)
                    nursery.start_soon(self.discovery.run)
                log.info("%s up: peer %s, wallet 0x%s", self.config.name, self.peer_id,
                         self.binding.wallet.hex())
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            if self.runtime is not None:
                await self._stop_all_runtimes()
            with trio.move_on_after(3) as scope:
                scope.shield = True
                if self._probe is not None:
                    self._probe.close()
                if self.offers is not None:
                    try:
                        await self.offers.flush()
                    except Exception:
                        log.exception("flushing the offer service failed")
                await self.store.close()

    async def withdraw_before_exit(self, timeout_s: float = 3.0) -> None:
        """Withdraw our offer while the connections are still up, so that renters stop seeing
        it now: the publisher's own withdrawal on cancellation races the host's shutdown."""
        if self.publisher is None:
            return
        with trio.move_on_after(timeout_s):
            try:
                await self.publisher.withdraw(rate_limited=False)
            except Exception:
                log.exception("withdrawing the offer before exit failed")
            await trio.sleep(0.2)  # the withdrawal's frames leave before the sockets close

    async def _start_provider(self, nursery: trio.Nursery, settings: ProviderSettings) -> None:
        addrs = self.announce_addrs()
        if not addrs:  # an offer nobody can dial would be searchable and never rentable
            raise NoDialableAddress(no_dialable_address_message(self.config.listen))
        chain = self.chain.chain
        decimals = await self.chain.run(chain.decimals, chain.token_address)
        price, floor = settings.prices(decimals)
        terms = OfferTerms(
            chain_id=chain.chain_id, token=chain.token_address,
            token_symbol=(await self.chain.run(self._token_symbol)), token_decimals=decimals,
            price_per_gpu_second=price, escrow=chain.escrow_address,
            min_duration_s=settings.min_duration_s, max_duration_s=settings.max_duration_s,
            heartbeat_interval_s=settings.heartbeat_interval_s, grace_s=settings.grace_s,
            arbiter=b"\x00" * 20, dispute_window_s=0,
        )
        self.publisher = OfferPublisher(
            self.offers, self.identity, self.binding,
            ProviderConfig(terms=terms, region=settings.region,
                           bandwidth_mbps=settings.bandwidth_mbps,
                           lifetime_ms=settings.offer_lifetime_ms,
                           publish_interval_s=settings.publish_interval_s,
                           data_dir=str(self.data_dir), addrs=addrs,
                           images=settings.images or (settings.docker.images if settings.docker else ())),
            nvml=settings.nvml,
        )
        await nursery.start(self.publisher.run)  # raises NoGpuError before publishing anything
        self._all_gpus = self.publisher.gpus  # the inventory; the offer lists the free part
        self.capacity = Capacity([g.uuid_digest for g in self._all_gpus],
                                 unopened_memory_ms=settings.unopened_memory_ms)
        await self._spot_start(nursery, settings.spot, decimals, price)
        if self.spot_gpus:
            await self._republish()  # the first offer went out before the split was known
        self._probe = GpuProbe(settings.nvml)
        self._probe.open()
        self.runtime = settings.make_runtime(self.peer_id.to_base58())
        if self.runtime is not None:
            self._gpu_uuids = nvml_uuids(self._probe._nvml)
            await self.runtime.prepare()  # RuntimeError_: the node does not start
            if isinstance(self.runtime, DockerRuntime):
                self.exec_desk = ExecDesk(self.host, self.runtime, self._exec_target)
        self.desk = ProviderDesk(
            self.host, self.key, self.wallet_key, self.params, self._current_offer, self.capacity,
            lambda: floor,
            self._on_agreed,
            policy=HoldPolicy(open_hold_ms=settings.open_hold_ms,
                              max_pending_per_peer=settings.max_pending_per_peer,
                              max_pending_per_wallet=settings.max_pending_per_wallet),
            funds=RenterFunds(self._read_funds, timeout_s=FUNDS_TIMEOUT_S),
            on_holds_changed=self._offer_changed,
            persist=self._persist_accepted, on_withdrawn=self._accept_withdrawn,
            clock=self.clock.now_ms,
        )
        self.rental_desk = RentalDesk(self.host, nursery, self._start_provider_session)

    async def _read_funds(self, wallet: bytes, token: bytes) -> tuple[int, int]:
        return await self.chain.read(self.chain.chain.funds, wallet, token,
                                     timeout_s=FUNDS_TIMEOUT_S)

    def _token_symbol(self) -> str:
        token = self.chain.chain.token
        symbol = token.functions.symbol().call() if token is not None else "ETH"
        return to_wire_text(symbol, 12)  # a contract's symbol may be anything; the wire's is not

    def _current_offer(self):
        entry = self.book.held(self.key.public)
        return None if entry is None else (entry.offer, entry.digest)

    # -- provider -----------------------------------------------------------------------------

    async def _persist_accepted(self, machine: ProviderNegotiation, peer: ID, effect: Persist) -> None:
        """The negotiation's persist port, run before the Accept is sent. The agreement row
        (terms, details, both bindings) holds what the proposal and the accept carry, so it is
        written once, for the accept, the last Persist before the Send: on disk before the
        consent leaves, so a restart finds every agreement a renter may open."""
        if effect.record != "accept":
            return  # the proposal's part of the row (terms, renter binding) is written with it
        terms, details = machine.terms, machine.details
        assert terms is not None and details is not None and effect.agreement_id == terms.agreement_id()
        renter_binding = machine.proposal.renter_binding
        await self._remember(effect.agreement_id, "provider", AgreementState.ACCEPTED, terms, details,
                             self.binding, renter_binding)
        self._pending[effect.agreement_id] = PendingAgreement(
            terms, details, escrow_domain(machine.offer), self.clock.now_ms(), renter_binding)

    async def _accept_withdrawn(self, agreement_id: bytes) -> None:
        """The renter cancelled after our Accept: its consent will not be used."""
        self._pending.pop(agreement_id, None)
        await self._set_state(agreement_id, AgreementState.EXPIRED)

    async def _on_agreed(self, machine: ProviderNegotiation, peer: ID) -> None:
        assert machine.terms is not None
        log.info("%s accepted agreement %s with %s", self.config.name,
                 machine.terms.agreement_id().hex()[:12], peer)

    async def _start_provider_session(self, agreement_id: bytes, peer: ID) -> ProviderSession | None:
        """A rental hello for an agreement we accepted. Answered from memory where possible: an
        unknown id or another peer than the renter costs nothing; an agreement the chain watcher
        saw `Opened` costs nothing; otherwise the chain is asked at most once per
        OPEN_RECHECK_S per agreement (the hello may beat the watcher's next poll)."""
        pending = self._pending.get(agreement_id)
        if pending is None:
            return None
        terms, details = pending.terms, pending.details
        if peer_id_from_public_key(details.renter_key) != peer.to_base58():
            raise HelloRefused("not_renter")
        started_s = self._opened_seen.get(agreement_id)
        if started_s is None:
            last = self._open_checked.get(agreement_id)
            if last is not None and trio.current_time() - last < OPEN_RECHECK_S:
                raise HelloRefused("not_open")
            self._open_checked[agreement_id] = trio.current_time()
            started_s = await self.escrow.started_s(terms)
            if started_s is None:
                log.info("renter asked to start %s before the escrow is open", agreement_id.hex()[:12])
                raise HelloRefused("not_open")
        if agreement_id not in self._pending:
            return None  # another hello for it got here first
        hold = self.capacity.unopened(self.clock.now_ms()).get(agreement_id)
        if hold is None:
            # Opened after its hold ended: serve it only if its GPUs are still free (never two
            # renters on one GPU); otherwise the renter gets no heartbeat and recovers it all.
            try:
                self.capacity.reserve(agreement_id, details.gpus, self.clock.now_ms() + self._open_hold_ms)
            except ValueError:
                raise HelloRefused("hold_expired") from None
        else:
            used = self.clock.now_ms() - (hold.until_ms - self._open_hold_ms)
            self.hold_used_ms.append(used)
            log.info("%s: agreement %s opened %d ms into its %d ms hold", self.config.name,
                     agreement_id.hex()[:12], used, self._open_hold_ms)
        del self._pending[agreement_id]
        self._forget_pending(agreement_id)
        self.capacity.commit(agreement_id)
        rental = Rental("provider", terms, details, started_s=started_s,
                        provider_binding=self.binding, renter_binding=pending.renter_binding)
        self.rentals[agreement_id] = rental
        provider_machine = ProviderRental(terms, details, pending.domain, self.key,
                                          started_s * 1000, self.params)
        session = ProviderSession(
            provider_machine, terms, details, self.escrow, self.store, self.clock.now_ms,
            lambda: self._metrics(details.gpus), lambda effect: self._service(rental, effect),
        )
        rental.session = session
        await self._set_state(agreement_id, AgreementState.OPEN)
        await session.carry_out(provider_machine.start())
        self._offer_changed()
        return session

    def _metrics(self, gpus: Sequence[bytes]) -> tuple[GpuMetrics, ...]:
        by_index = {g.uuid_digest: i for i, g in enumerate(self._all_gpus)}  # NVML order
        live = {m.index: m for m in self._probe.live_metrics()}
        out = []
        for uuid in gpus:
            m = live.get(by_index.get(uuid, -1))
            out.append(GpuMetrics(uuid, (m.utilization_pct or 0) if m else 0,
                                  (m.memory_used_mib or 0) if m else 0,
                                  (m.temperature_c or 0) if m else 0, (m.power_mw or 0) if m else 0))
        return tuple(out)

    async def _service(self, rental: Rental, effect: Any) -> None:
        name = type(effect).__name__
        rental.events.append(name)
        if name == "StartService":
            if self.runtime is not None:
                access = await self._start_runtime(rental)
                session = rental.session
                if access is None:
                    # The renter gets nothing usable: serve nothing and claim nothing.
                    await session.halt("access hook failed" if self.runtime.name == "hook"
                                       else f"{self.runtime.name} runtime failed")
                    self.capacity.release(rental.agreement_id)
                    await self._set_state(rental.agreement_id, AgreementState.ABORTED)
                    self._offer_changed()
                    return
                rental.access = access
                session.machine.service_started(self.clock.now_ms())
                await session.send_grant(AccessGrant(rental.agreement_id, access, self.clock.now_ms()).sign(self.key))
        elif name == "StopService":
            self._service_ended.setdefault(rental.agreement_id, trio.Event()).set()
            if self.runtime is not None:
                await self._stop_runtime(rental.agreement_id)
            self.capacity.release(rental.agreement_id)
            row = await self.store.get_agreement(rental.agreement_id)
            # An aborted rental (its access hook failed) stays aborted: it served nothing, and
            # the renter closing its escrow (which stops the machine) does not change that.
            if row is None or row.state != AgreementState.ABORTED:
                await self._set_state(rental.agreement_id, AgreementState.STOPPED)
            self._offer_changed()

    def rental_spec(self, rental: Rental) -> RentalSpec:
        """The rental as the runtime needs it; RuntimeError_ if a rented GPU is not in NVML."""
        gpus = tuple(rental.details.gpus)
        missing = [g.hex()[:12] for g in gpus if g not in self._gpu_uuids]
        if missing:
            raise RuntimeError_(f"rented GPUs not found in NVML: {missing}")
        return RentalSpec(
            agreement_id=rental.agreement_id,
            renter_peer_id=peer_id_from_public_key(rental.details.renter_key),
            renter_wallet=rental.terms.renter, gpu_digests=gpus,
            gpu_uuids=tuple(self._gpu_uuids[g] for g in gpus),
            share=len(gpus) / max(len(gpus), len(self._all_gpus)),
            max_seconds=rental.terms.max_seconds, access_key=rental.details.access_key,
            image=rental.details.image)

    async def _start_runtime(self, rental: Rental) -> str | None:
        """Start what the rental hands over; its access text (wire text: printable ASCII, at
        most 4096 bytes), or None if it could not be started."""
        try:
            access = await self.runtime.start(self.rental_spec(rental))
        except (RuntimeError_, trio.TooSlowError) as exc:
            log.warning("rental %s: %s", rental.agreement_id.hex()[:12], exc)
            return None
        text = to_wire_text(access, 4096).strip()
        return text or None

    async def _stop_runtime(self, agreement_id: bytes) -> None:
        """Tear down (shielded: a rental that ended must not keep its container because the
        node is being cancelled at that moment)."""
        with trio.move_on_after(RUNTIME_STOP_S) as scope:
            scope.shield = True
            try:
                await self.runtime.stop(agreement_id)
            except Exception as exc:  # the next start's reconcile removes it
                log.warning("rental %s: teardown failed: %r", agreement_id.hex()[:12], exc)

    def _exec_target(self, agreement_id: bytes) -> ExecTarget | None:
        """What the exec desk checks an OPEN against: this provider's rental of that id."""
        rental = self.rentals.get(agreement_id)
        if rental is None or rental.role != "provider" or rental.session is None:
            return None
        session = rental.session
        ended = self._service_ended.setdefault(agreement_id, trio.Event())
        return ExecTarget(
            renter_peer_id=peer_id_from_public_key(rental.details.renter_key),
            live=lambda: (not session.finished and not ended.is_set()
                          and session.machine.state == "serving" and rental.access is not None),
            ended=ended, container_id=lambda: self.runtime.container_id(agreement_id))

    def _live_provider_rentals(self) -> list[bytes]:
        return [aid for aid, r in self.rentals.items() if r.role == "provider"
                and r.session is not None and not r.session.finished]

    async def _stop_all_runtimes(self) -> None:
        """The node is stopping: no rental keeps its container (a restart's resume starts a
        new one; a killed node's containers are kept and resumed by reconcile)."""
        with trio.move_on_after(RUNTIME_STOP_S) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for aid in self._live_provider_rentals():
                    nursery.start_soon(self._stop_runtime, aid)

    async def _watch_runtime(self) -> None:
        """A rental whose container stopped (it exited, was killed, the daemon restarted) is no
        longer served: its machine stops service and claims what was acknowledged."""
        while True:
            await trio.sleep(RUNTIME_CHECK_S)
            for aid in self._live_provider_rentals():
                rental = self.rentals[aid]
                if rental.access is None:
                    continue  # not started yet (or the start is still running)
                try:
                    alive = await self.runtime.alive(aid)
                except Exception as exc:  # the daemon does not answer: check again later
                    log.warning("rental %s: runtime check failed: %r", aid.hex()[:12], exc)
                    continue
                if not alive and not rental.session.finished:
                    log.warning("rental %s: its container is gone: service ends", aid.hex()[:12])
                    await rental.session.service_lost()

    def _offer_changed(self) -> None:
        """The free GPUs may have changed (a hold placed or freed, a rental started or ended):
        _keep_offer_current re-announces, so no caller waits for the publisher's rate limit."""
        self._offer_dirty.set()

    async def _keep_offer_current(self) -> None:
        """Re-announce the offer with the free GPUs only: held and rented GPUs are left out,
        and held ones come back when their hold ends (woken at the next hold's end)."""
        while True:
            end = self.capacity.next_expiry()
            wait = float("inf") if end is None else max(0.0, (end - self.clock.now_ms()) / 1000) + 0.01
            with trio.move_on_after(wait):
                await self._offer_dirty.wait()
            self._offer_dirty = trio.Event()  # a change from here on wakes the next round
            await self._republish(only_if_changed=True)

    async def _republish(self, *, only_if_changed: bool = False) -> None:
        """The free GPUs changed: announce what is left, or withdraw when nothing is."""
        if self.publisher is None:
            return
        free = set(self.capacity.free(self.clock.now_ms()))
        gpus, spot = self._spot_offer(tuple(g for g in self._all_gpus if g.uuid_digest in free))
        live = self.publisher.live is not None
        if only_if_changed and ((live and gpus == self.publisher.gpus and spot == self.publisher.interruptible)
                                or (not live and not gpus)):
            return
        try:
            if gpus:
                self.publisher.gpus, self.publisher.interruptible = gpus, spot
                await self.publisher.publish()
            else:
                await self.publisher.withdraw()
        except Exception:
            log.exception("re-announcing the offer failed")

    # -- renter -------------------------------------------------------------------------------

    async def rent(self, entries: Sequence[Entry], *, gpu_count: int, duration_s: int,
                   max_price_per_gpu_second: int, access_key: str = "", notice_s: int = 0,
                   image: str = "") -> Rental:
        """Negotiate with every offer in `entries` at once, open the escrow for the first
        agreement, and start the rental session. Raises RentError."""
        if not entries:
            raise RentError("no offers to rent from")
        for entry in entries:
            why = self.not_rentable(entry)
            token = entry.offer.terms.token
            if why is None and self.chain.chain.known_decimals(token) is None:
                try:  # read once per token, then cached; not_rentable compares the offer's
                    await self.chain.run(self.chain.chain.decimals, token)
                    why = self.not_rentable(entry)
                except ChainError as exc:
                    why = str(exc)
            if why is not None:
                raise RentError(f"offer {entry.offer_id} cannot be rented from this node: {why}")
        if not is_wire_text(access_key) or len(access_key) > 1024:
            raise RentError("the access key must be printable ASCII (U+0020..U+007E, no line "
                            "breaks), at most 1024 characters")
        # The image is not checked against the offers here: each provider decides
        # (IMAGE_NOT_OFFERED), and the refusal names the images it offers.
        if not is_wire_text(image) or len(image) > MAX_IMAGE_LEN:
            raise RentError(f"the image must be printable ASCII, at most {MAX_IMAGE_LEN} characters")
        # Offers this renter must not take at all (an untrusted arbiter, a refused token): say
        # why before negotiating, so no provider holds GPUs for an agreement we would refuse.
        refusals = [(e, renter_refusal(e.offer, self.config.arbiters)) for e in entries]
        entries = [e for e, why in refusals if why is None]
        if not entries:
            raise RentError("refused every offer: " + "; ".join(sorted({why for _, why in refusals if why})))
        # Check the wallet before negotiating: a provider would otherwise hold GPUs for us.
        token = entries[0].offer.terms.token
        needed = max_price_per_gpu_second * gpu_count * duration_s
        have, allowed = await self.chain.run(self.chain.chain.funds, self.binding.wallet, token)
        if have < needed:
            symbol = entries[0].offer.terms.token_symbol
            raise RentError(f"not enough funds: the deposit can be up to {needed} {symbol} units and "
                            f"the wallet 0x{self.binding.wallet.hex()} holds {have}")
        if allowed < needed:
            # Before proposing: a provider checks the allowance before it sends Accept, and the
            # open after Accept is then one transaction, well inside the provider's open hold.
            try:
                await self.chain.run(self.chain.chain.approve, self.wallet_key, needed)
            except ChainError as exc:
                raise RentError(f"approving the escrow failed: {exc}") from None
        opening = _Opening()

        async def persist(winner: RenterNegotiation, effect: Persist) -> None:
            # The accept's consent is durable before the escrow is opened with it.
            await self._remember(effect.agreement_id, "renter", AgreementState.AGREED, winner.terms,
                                 winner.details, winner.offer.binding, self.binding)

        async def escrow(winner: RenterNegotiation, effect: EscrowCall) -> None:
            opening.agreed_at = time.monotonic()
            opening.tx, opening.error = await self._open_escrow(effect)

        group = await self._negotiate(entries, gpu_count=gpu_count, duration_s=duration_s,
                                      max_price_per_gpu_second=max_price_per_gpu_second,
                                      access_key=access_key, persist=persist, escrow=escrow,
                                      notice_s=notice_s, image=image)
        winner = group.winner
        if winner is None:
            reasons = sorted({f"{n.failure.reason_name.lower()} ({n.failure.detail})"
                              for n in group.negotiations.values() if n.failure})
            raise RentError("no provider agreed: " + "; ".join(reasons or ["no answer"]))
        if opening.error is not None:
            raise opening.error
        if opening.tx is None:
            raise RentError("the agreement's escrow open was never carried out")
        opened, agreed_at = opening.tx, opening.agreed_at
        terms, details = winner.terms, winner.details
        aid = terms.agreement_id()
        self.accept_to_open_s = time.monotonic() - agreed_at
        log.info("%s opened %s %.3f s after Accept", self.config.name, aid.hex()[:12],
                 self.accept_to_open_s)
        rental = Rental("renter", terms, details, opened=opened, started_s=opened.timestamp,
                        provider_binding=winner.offer.binding, renter_binding=self.binding)
        self.rentals[aid] = rental
        await self._set_state(aid, AgreementState.OPEN)
        provider_peer = ID.from_base58(peer_id_from_public_key(details.provider_key))
        await self._remember_peer(provider_peer)
        machine = RenterRental(terms, details, escrow_domain(winner.offer), self.key,
                               self.wallet_key, opened.timestamp * 1000, self.rng, self.params)
        session = RenterSession(machine, terms, details, self.escrow, self.store, self.clock.now_ms)
        session.on_report = lambda report: self._renter_report(rental, report)
        rental.session = session
        self._nursery.start_soon(session.run_timers)
        self._nursery.start_soon(session.run_connection, self.host, provider_peer)
        return rental

    async def _open_escrow(self, effect: EscrowCall) -> tuple[TxResult | None, RentError | None]:
        """The renter's escrow port: carry out the winner's EscrowCall open. Returns the mined
        open or why it failed (not raised: it runs inside the negotiation's nursery)."""
        if effect.method != "open":
            raise ValueError(f"a negotiation asked for escrow {effect.method!r}")
        terms, aid = effect.args["terms"], effect.agreement_id
        if self.clock.time() > terms.open_by:  # the escrow would revert: the provider's consent expired
            await self._set_state(aid, AgreementState.OPEN_FAILED)
            return None, RentError(f"the provider's consent expired at {terms.open_by} (open_by) "
                                   "before the escrow could be opened")
        try:
            return await self.chain.open(self.wallet_key, terms, effect.args["consent_sig"]), None
        except RpcUnavailableError as exc:
            # No answer is not a refusal: the transaction may have been sent and still be
            # mined. Watch for its Opened event as after a restart (RENTER_OPEN_WAIT_S).
            row = await self.store.get_agreement(aid)
            if row is not None:
                self._renter_unopened[aid] = row
            return None, RentError(f"opening the escrow failed: {exc}; if the transaction went "
                                   "out, the rental starts when it is mined")
        except ChainError as exc:
            await self._set_state(aid, AgreementState.OPEN_FAILED)
            return None, RentError(f"opening the escrow failed: {exc}")

    def not_rentable(self, entry: Entry) -> str | None:
        """Why this node cannot rent `entry` (None: it can). The escrow `open` checks the
        provider's consent in the domain of this node's escrow contract, on this node's chain:
        an offer naming another escrow would be negotiated (and its token approved) only for
        `open` to revert. Such offers are valid, kept and relayed (specs/node.md)."""
        chain = self.chain.chain
        if entry.chain_id != chain.chain_id:
            return f"it is for chain {entry.chain_id}, this node uses chain {chain.chain_id}"
        if entry.escrow != chain.escrow_address:
            return (f"it names escrow 0x{entry.escrow.hex()}, this node uses escrow "
                    f"0x{chain.escrow_address.hex()} on chain {chain.chain_id}")
        # Prices are read (and searched, and capped by --max-price) in the offer's decimals: an
        # offer claiming other decimals than its token's contract would mis-state its price.
        decimals = chain.known_decimals(entry.offer.terms.token)
        if decimals is not None and decimals != entry.offer.terms.token_decimals:
            return (f"it prices in units of {entry.offer.terms.token_decimals} decimals, its token's "
                    f"contract has {decimals}")
        return None

    def search(self, query: str = "", sort: str | None = "rank", limit: int | None = None,
               at_ms: int | None = None) -> list[Entry]:
        """Offers this node can rent that match `query`, by default in rank order (the book also
        holds valid offers for other escrows on this chain, which it relays but never lists,
        and offers whose decimals contradict their token's contract, once this node read them)."""
        return self.book.query(query, sort, limit=limit,
                               where=lambda e: self.not_rentable(e) is None,
                               now_ms=self.clock.now_ms() if at_ms is None else at_ms)

    async def _negotiate(self, entries: Sequence[Entry], **terms: Any) -> FirstAgreementWins:
        """Negotiate with every entry at once. A provider that answered OFFER_STALE re-announced
        meanwhile (its free GPUs changed): once its newer offer is in the book (waiting up to
        STALE_RETRY_WAIT_S), negotiate once more with those providers."""
        group = await negotiate_first(
            self.host, self.key, self.binding, [Candidate(e.offer, e.digest) for e in entries],
            params=self.params, rng=self.rng, clock=self.clock.now_ms, **terms)
        if group.winner is not None:
            return group
        stale = {n.offer.provider: n.offer_digest for n in group.negotiations.values()
                 if n.failure is not None and n.failure.reason_name == "OFFER_STALE"}
        if not stale:
            return group
        fresh: list[Entry] = []
        with trio.move_on_after(STALE_RETRY_WAIT_S):
            while True:
                fresh = [e for p, d in stale.items()
                         if (e := self.book.held(p)) is not None and e.digest != d]
                if len(fresh) == len(stale):
                    break
                await trio.sleep(0.05)
        if not fresh:
            return group
        return await negotiate_first(
            self.host, self.key, self.binding, [Candidate(e.offer, e.digest) for e in fresh],
            params=self.params, rng=self.rng, clock=self.clock.now_ms, **terms)

    async def stop_rental(self, agreement_id: bytes) -> None:
        rental = self.rentals[agreement_id]
        if not isinstance(rental.session, RenterSession):
            raise RentError("only the renter stops a rental early")
        await rental.session.stop()

    async def _sync_on_join(self) -> None:
        """A joining node fetches the current offers from its first peers instead of waiting
        up to an offer lifetime for re-announcements; later peers are asked once each."""
        synced: set = set()
        for _ in range(120):  # bounded: the first two minutes after start
            await trio.sleep(0.5)
            fresh = [p for p in self.offers.sync_candidates() if p not in synced]
            if fresh:
                synced.update(fresh)
                results = await self.offers.sync(fresh)
                log.info("%s synced the market from %d peer(s): %d offers accepted",
                         self.config.name, len(results), sum(r.accepted for r in results))

    async def _remember_peer(self, peer: ID) -> None:
        addrs = [str(a) for a in self.host.host.get_peerstore().addrs(peer)]
        if addrs:
            await self.store.upsert_peer(peer.to_base58(), addrs, self.clock.time())

    @property
    def _open_hold_ms(self) -> int:
        return self.desk.open_hold_ms if self.desk is not None else DEFAULT_OPEN_HOLD_MS

    def _forget_pending(self, aid: bytes) -> None:
        self._opened_seen.pop(aid, None)
        self._open_checked.pop(aid, None)

    # -- storage ------------------------------------------------------------------------------

    async def _remember(self, aid: bytes, role: str, state: AgreementState, terms: AgreementTerms,
                        details: AgreementDetails, provider_binding: Binding | None = None,
                        renter_binding: Binding | None = None) -> None:
        blob = encode_agreement(terms, details, provider_binding, renter_binding)
        row = await self.store.get_agreement(aid)
        check_transition(None if row is None else row.state, state)
        await self.store.put_agreement(aid, role, AgreementState(state).value, blob, self.clock.time())

    async def _set_state(self, aid: bytes, state: AgreementState) -> None:
        """Record the agreement's new lifecycle state (node/lifecycle.py checks the change)."""
        row = await self.store.get_agreement(aid)
        check_transition(None if row is None else row.state, state)
        await self.store.set_agreement_state(aid, AgreementState(state).value, self.clock.time())
