"""Restarts during a preemption notice (issue 18), in one process on the embedded chain: real
libp2p hosts on loopback, real SQLite stores, the real escrow on the embedded EVM. A node is
"killed" by cancelling its scope: what it left on disk is what the restart reads.

- The provider is restarted while a notice is outstanding that its renter never received (the
  renter was down when it went out): the restarted provider resumes the notice from its store
  (same signed notice, same stop), re-sends it when the renter's stream attaches, and stops the
  service at the promised stop; the renter pays exactly the acknowledged seconds, none after
  the stop.
- The renter is restarted while it holds a notice: it resumes the notice from its store and
  still stops paying at the notice's stop."""

import time
from decimal import Decimal
from functools import partial

import trio

from node.fake_nvml import FakeGpu, FakeNvml
from node.node import ProviderSettings
from node.spot import SpotSettings
from protocol.eth import private_key_address
from protocol.messages import PreemptionReason
from protocol.params import Params
from protocol.rental import State
from tests.node.node_helpers import funded_market, start_node

PARAMS = Params(clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
                negotiation_step_timeout_ms=5_000)
NOTICE_S = 10
SPOT_PRICE = 500  # units per second: 1.8 tokens (6 decimals) per GPU-hour
INTERVAL_S = 2  # the renter closes after (2 + 3) intervals of silence: 10 s to come back


def settings():
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-spot-restart-{i}",
                             memory_total_mib=24564, compute_capability=(8, 9)) for i in range(2)])
    spot = SpotSettings(interruptible_gpus=1, notice_s=NOTICE_S, price_per_gpu_hour=Decimal("1.8"))
    return ProviderSettings(price_per_gpu_hour=Decimal("3.6"), min_duration_s=5, max_duration_s=3600,
                            heartbeat_interval_s=INTERVAL_S, grace_s=300, publish_interval_s=0.2,
                            nvml=nvml, spot=spot)


start = partial(start_node, params=PARAMS)


async def wait_for(predicate, timeout_s, what):
    with trio.fail_after(timeout_s):  # a hang guard, not a timing assertion
        while not await predicate():
            await trio.sleep(0.1)


async def rent_interruptible(renter, provider):
    async def has_spot_offer():
        await renter.offers.sync()
        entry = renter.book.held(provider.key.public)
        return entry is not None and bool(entry.offer.interruptible)

    await wait_for(has_spot_offer, 15, "the interruptible offer")
    entry = renter.book.held(provider.key.public)
    assert entry.offer.interruptible[0].price_per_gpu_second == SPOT_PRICE
    rental = await renter.rent([entry], gpu_count=1, duration_s=300,
                               max_price_per_gpu_second=SPOT_PRICE, notice_s=NOTICE_S)
    assert rental.details.notice_s == NOTICE_S
    return rental


async def settled_exactly(chain, aid, renter_wallet, renter_before, provider_wallet, stop_ms,
                          started_s, renter_acked):
    """The provider's claim pays price * acked, the rest came back to the renter, and nothing
    was paid for time after the notice's stop."""
    claimed = next(e for e in chain.events() if e.name == "Claimed" and e.agreement_id == aid)
    acked = claimed.args["acked_seconds"]
    assert acked == renter_acked
    assert claimed.args["provider_amount"] == SPOT_PRICE * acked
    assert chain.token_balance(renter_wallet) == renter_before - SPOT_PRICE * acked
    assert chain.token_balance(provider_wallet) == SPOT_PRICE * acked
    served_s = (stop_ms - started_s * 1000) / 1000
    assert 1 <= acked <= served_s  # the renter's clock: never beyond the stop
    return acked


async def test_spot_restart__provider_restarted_during_a_notice__resumes_it_resends_it_stops_on_time(tmp_path):
    chain, achain, keys = await funded_market(renter=2)
    provider_key, renter_key = keys[1], keys[2]
    provider_wallet, renter_wallet = private_key_address(provider_key), private_key_address(renter_key)
    p_dir, r_dir = tmp_path / "provider", tmp_path / "renter"
    p_settings = settings()
    renter_before = chain.token_balance(renter_wallet)
    async with trio.open_nursery() as nursery:
        provider, p_scope = await start(nursery, achain, p_dir, provider_key, p_settings)
        bootstrap = (provider.addrs()[0],)
        listen = bootstrap[0].split("/p2p/")[0]  # the port the renter knows
        renter, r_scope = await start(nursery, achain, r_dir, renter_key, bootstrap=bootstrap)
        rental = await rent_interruptible(renter, provider)
        aid = rental.agreement_id

        async def provider_holds_a_receipt():
            stored = await provider._latest_receipt(aid)
            return stored is not None and stored.acked_seconds >= 2

        await wait_for(provider_holds_a_receipt, 20, "a receipt")
        r_scope.cancel()  # the renter goes down: it will not see the notice when it goes out
        await trio.sleep(0.3)

        assert await provider.preempt_interruptible(PreemptionReason.PROVIDER_USE, "own use") == [aid]
        notice = provider.rentals[aid].session.machine.notice
        assert notice.stop_ms - notice.sent_ms == NOTICE_S * 1000
        await trio.sleep(0.2)
        assert rental.session.machine.notice is None  # the renter, down, never got it
        p_scope.cancel()  # ... and the provider goes down with the notice outstanding
        await trio.sleep(0.3)

        provider, p_scope = await start(nursery, achain, p_dir, provider_key, p_settings, listen=listen)
        assert provider.resumed == {"resumed": [aid.hex()]}
        p_rental = provider.rentals[aid]
        p_machine = p_rental.session.machine
        assert p_machine.state is State.NOTICE
        assert p_machine.notice.encode() == notice.encode()  # the same signed notice, the same stop
        assert "PreemptionNotice" in p_rental.events  # the runtime is told again (SIGTERM)
        assert provider.clock.now_ms() < notice.stop_ms

        renter, r_scope = await start(nursery, achain, r_dir, renter_key, bootstrap=bootstrap)
        assert renter.resumed == {"resumed": [aid.hex()]}
        r_machine = renter.rentals[aid].session.machine
        # Its store held no notice (it was down when the notice went out): the one it gets now
        # is the restarted provider's re-send, on the rental stream the renter attaches.

        async def renter_has_the_notice():
            return r_machine.notice is not None

        await wait_for(renter_has_the_notice, 8, "the re-sent notice")
        assert r_machine.notice.encode() == notice.encode()
        assert provider.clock.now_ms() < notice.stop_ms  # re-sent before the stop

        async def claimed():
            return any(e.name == "Claimed" and e.agreement_id == aid for e in chain.events())

        await wait_for(claimed, NOTICE_S + 20, "the claim")
        # Service stopped at the promised stop (not before), and not a heartbeat later.
        assert notice.stop_ms <= p_machine.stopped_ms <= notice.stop_ms + INTERVAL_S * 1000
        assert "StopService" in p_rental.events
        await settled_exactly(chain, aid, renter_wallet, renter_before, provider_wallet,
                              notice.stop_ms, rental.started_s, r_machine.acked_seconds)
        nursery.cancel_scope.cancel()


async def test_spot_restart__renter_restarted_while_noticed__still_stops_paying_at_the_stop(tmp_path):
    chain, achain, keys = await funded_market(renter=2)
    provider_key, renter_key = keys[1], keys[2]
    provider_wallet, renter_wallet = private_key_address(provider_key), private_key_address(renter_key)
    r_dir = tmp_path / "renter"
    renter_before = chain.token_balance(renter_wallet)
    async with trio.open_nursery() as nursery:
        provider, _ = await start(nursery, achain, tmp_path / "provider", provider_key, settings())
        bootstrap = (provider.addrs()[0],)
        renter, r_scope = await start(nursery, achain, r_dir, renter_key, bootstrap=bootstrap)
        rental = await rent_interruptible(renter, provider)
        aid = rental.agreement_id

        async def receipts():
            return rental.session.log.receipts >= 2

        await wait_for(receipts, 20, "receipts")
        assert await provider.preempt_interruptible(PreemptionReason.POWER_PRICE, "price") == [aid]
        notice = provider.rentals[aid].session.machine.notice

        async def noticed():
            return rental.session.machine.state is State.NOTICED

        await wait_for(noticed, 5, "the notice at the renter")
        r_scope.cancel()  # the renter goes down holding the notice
        await trio.sleep(0.3)
        renter, r_scope = await start(nursery, achain, r_dir, renter_key, bootstrap=bootstrap)
        assert renter.resumed == {"resumed": [aid.hex()]}
        r_machine = renter.rentals[aid].session.machine
        assert r_machine.state in (State.NOTICED, State.SILENT, State.ACTIVE)
        assert r_machine.notice.encode() == notice.encode()  # from its own store
        assert r_machine.service_end_ms == notice.stop_ms
        assert time.time() * 1000 < notice.stop_ms

        async def claimed():
            return any(e.name == "Claimed" and e.agreement_id == aid for e in chain.events())

        await wait_for(claimed, NOTICE_S + 20, "the claim")
        await settled_exactly(chain, aid, renter_wallet, renter_before, provider_wallet,
                              notice.stop_ms, rental.started_s, r_machine.acked_seconds)
        # Heartbeats after the stop (the final one) earn nothing: the renter's acked time is
        # the service up to the stop, within the heartbeats it saw.
        p_machine = provider.rentals[aid].session.machine
        assert notice.stop_ms <= p_machine.stopped_ms
        nursery.cancel_scope.cancel()
