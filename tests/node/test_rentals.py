"""Heartbeats and receipts over a real libp2p stream on 127.0.0.1, with real SQLite stores.

The chain is replaced here by a recorder of escrow calls: these tests are about the stream
(schedule, store-before-send, reconnect); the full rental against the real contract on an EVM is
tested with the chain client."""

import random

import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.rentals import ProviderSession, RentalDesk, RenterSession
from node.store import Store
from protocol.messages import AccessGrant
from protocol.params import Params
from protocol.rental import ProviderRental, RenterRental
from tests.rental_fixtures import make_agreement

CONFIG = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))
PARAMS = Params(heartbeat_late_tolerance_ms=500)


class RecordingEscrow:
    def __init__(self, started_s):
        self.started = started_s
        self.calls = []

    async def started_s(self, terms):
        return self.started

    async def execute(self, call, terms):
        self.calls.append(call)


def hosts_for(agreement):
    # The stream layer does not check libp2p ids against agreement keys; the node does. Use
    # the agreement's own keys anyway, as a node would.
    provider = GossipHost(NodeIdentity.from_seed(agreement.provider._signing_key.encode()), CONFIG)
    renter = GossipHost(NodeIdentity.from_seed(agreement.renter._signing_key.encode()), CONFIG)
    return provider, renter


async def run_rental(tmp_path, *, max_seconds, drop_at_s=None, access=None):
    a = make_agreement(7, max_seconds=max_seconds, interval=1, grace=300)
    started_ms = int(trio.current_time() * 0) + __import__("time").time_ns() // 1_000_000
    escrow = RecordingEscrow(started_ms // 1000)
    provider_host, renter_host = hosts_for(a)
    p_store = await Store.open(tmp_path / "provider.db")
    r_store = await Store.open(tmp_path / "renter.db")
    for store, role in ((p_store, "provider"), (r_store, "renter")):
        await store.put_agreement(a.agreement_id, role, "open", a.details.encode(), started_ms / 1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(provider_host.run)
        await nursery.start(renter_host.run)
        services = []

        async def service(effect):
            services.append(type(effect).__name__)

        async def start_session(agreement_id, peer):
            if agreement_id != a.agreement_id:
                return None
            machine = ProviderRental(a.terms, a.details, a.domain, a.provider, started_ms, PARAMS)
            session = ProviderSession(machine, a.terms, a.details, escrow, p_store,
                                      lambda: __import__("time").time_ns() // 1_000_000, None, service)
            if access is not None:  # attached streams get it first (as the node's hook does)
                await session.send_grant(AccessGrant(a.agreement_id, access, started_ms).sign(a.provider))
            await session.carry_out(machine.start())
            return session

        desk = RentalDesk(provider_host, nursery, start_session)
        desk.install()
        await renter_host.connect(provider_host.addrs()[0])
        machine = RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key,
                               started_ms, random.Random(1), PARAMS)
        renter = RenterSession(machine, a.terms, a.details, escrow, r_store,
                               lambda: __import__("time").time_ns() // 1_000_000)
        nursery.start_soon(renter.run_timers)
        nursery.start_soon(renter.run_connection, renter_host, provider_host.peer_id)
        if drop_at_s is not None:
            await trio.sleep(drop_at_s)
            session = desk.sessions[a.agreement_id]
            await session.stream.reset()  # the connection breaks mid-rental
        with trio.fail_after(max_seconds + 10):
            while not any(c.method == "claim" for c in escrow.calls):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return a, escrow, desk, renter, p_store, r_store, services


async def test_rentals__heartbeats_and_receipts_flow_and_the_provider_claims(tmp_path):
    a, escrow, desk, renter, p_store, r_store, services = await run_rental(tmp_path, max_seconds=4)
    claim = next(c for c in escrow.calls if c.method == "claim")
    # 4 s of service at 1 s intervals: the renter acknowledged (nearly) all of it
    assert 3 <= claim.args["acked_seconds"] <= 4
    assert services[0] == "StartService" and "StopService" in services
    # every heartbeat and receipt was committed to SQLite on the side that handled it
    p_hb = await p_store.heartbeats(a.agreement_id)
    r_hb = await r_store.heartbeats(a.agreement_id)
    assert len(p_hb) >= 4 and len(r_hb) >= 4
    latest = await p_store.latest_receipt(a.agreement_id)
    assert latest.acked_seconds == claim.args["acked_seconds"]
    await p_store.close()
    await r_store.close()


async def test_rentals__the_longest_access_grant_crosses_the_stream(tmp_path):
    access = "ssh -p 2222 gpu@203.0.113.7 " + "x" * (4096 - 28)  # the field's limit: 4096
    assert len(access) == 4096
    a, escrow, desk, renter, p_store, r_store, services = await run_rental(
        tmp_path, max_seconds=3, access=access)
    assert renter.access == access
    assert len(AccessGrant(a.agreement_id, access, 2**53 - 1).sign(a.provider).encode()) > 4096
    await p_store.close()
    await r_store.close()


async def test_rentals__renter_reconnects_after_the_stream_breaks(tmp_path):
    a, escrow, desk, renter, p_store, r_store, services = await run_rental(
        tmp_path, max_seconds=6, drop_at_s=2.5)
    claim = next(c for c in escrow.calls if c.method == "claim")
    assert renter.log.reconnects >= 1
    # the gap costs the provider at most about one interval of pay
    assert 4 <= claim.args["acked_seconds"] <= 6
    await p_store.close()
    await r_store.close()


async def test_rentals__unknown_agreement_and_silent_streams_are_refused(tmp_path):
    provider_host = GossipHost(NodeIdentity.from_seed(b"\x01" * 32), CONFIG)
    other = GossipHost(NodeIdentity.from_seed(b"\x02" * 32), CONFIG)
    from libp2p.custom_types import TProtocol

    from node.rentals import RENTAL_PROTOCOL
    from node.reqresp import write_frame

    async with trio.open_nursery() as nursery:
        await nursery.start(provider_host.run)
        await nursery.start(other.run)

        async def start_session(agreement_id, peer):
            return None

        desk = RentalDesk(provider_host, nursery, start_session)
        desk.install()
        await other.connect(provider_host.addrs()[0])
        s1 = await other.host.new_stream(provider_host.peer_id, [TProtocol(RENTAL_PROTOCOL)])
        await write_frame(s1, b"\x09" * 32)
        s2 = await other.host.new_stream(provider_host.peer_id, [TProtocol(RENTAL_PROTOCOL)])
        await write_frame(s2, b"short")
        with trio.fail_after(5):
            while desk.rejected.get("unknown_agreement", 0) < 1 or desk.rejected.get("bad_hello", 0) < 1:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_rentals__escrow_events_reach_the_machine_through_the_session():
    # The node's chain watcher hands the escrow's events to the session (escrow_event):
    # Closed makes the provider stop serving and claim (here, with no receipt yet: it reports
    # that there is nothing to claim); a settlement ends the renter's rental
    # without a recover; an event that is not the role's changes nothing.
    a = make_agreement(7, max_seconds=3600, interval=1, grace=300)
    now = [1_700_000_000_000]
    escrow = RecordingEscrow(now[0] // 1000)
    services = []

    async def service(effect):
        services.append(type(effect).__name__)

    provider = ProviderSession(ProviderRental(a.terms, a.details, a.domain, a.provider, now[0], PARAMS),
                               a.terms, a.details, escrow, None, lambda: now[0], None, service)
    await provider.carry_out(provider.machine.start())
    await provider.escrow_event("Finalized")  # not a provider's event
    assert not provider.finished and "StopService" not in services
    now[0] += 5_000
    await provider.escrow_event("Closed")
    assert provider.finished and "StopService" in services
    assert [r.event for r in provider.log.reports] == ["nothing_to_claim"]

    renter = RenterSession(RenterRental(a.terms, a.details, a.domain, a.renter, a.renter_wallet_key,
                                        now[0], random.Random(1), PARAMS),
                           a.terms, a.details, escrow, None, lambda: now[0])
    await renter.escrow_event("Closed")  # not a renter's event
    assert not renter.finished
    await renter.escrow_event("Claimed")
    assert renter.finished and renter.done.is_set()
    assert escrow.calls == []  # no recover
