"""Several interruptible sets on one provider (issue 18): two nodes on loopback and the embedded
EVM. The offer carries each set with its own notice and price; a renter rents from each; a
curtailment sends each rental a notice with its own agreement's notice, and every set leaves
the offer while curtailed."""

import time
from decimal import Decimal

import pytest
import trio

from node.config import ConfigError, InterruptibleSet
from node.fake_nvml import FakeGpu, FakeNvml
from node.node import Node, NodeConfig, ProviderSettings
from node.power import PricePoint
from node.spot import SpotSettings, split_sets
from protocol.params import Params
from protocol.rental import State
from tests.node.node_helpers import funded_market

PARAMS = Params(clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
                negotiation_step_timeout_ms=5_000)
SETS = (InterruptibleSet(1, 5, Decimal("0.72")), InterruptibleSet(2, 30, Decimal("1.8")))


def settings(sets=SETS):
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-spot-sets-{i}",
                             memory_total_mib=24564, compute_capability=(8, 9)) for i in range(4)])
    spot = SpotSettings(sets=sets, power_source="", curtail_above_per_mwh=Decimal(300),
                        resume_below_per_mwh=Decimal(150))
    return ProviderSettings(price_per_gpu_hour=Decimal("3.6"), min_duration_s=5, max_duration_s=3600,
                            heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2,
                            nvml=nvml, spot=spot)


def test_spot_sets__split_from_the_end_in_order_with_prices_in_units():
    inventory = [bytes([i]) * 32 for i in range(4)]
    a, b = split_sets(SETS, inventory, 6, 1000)
    assert (a.gpus, a.notice_s, a.price_units) == ((inventory[3],), 5, 200)
    assert (b.gpus, b.notice_s, b.price_units) == (tuple(inventory[1:3]), 30, 500)
    with pytest.raises(ConfigError, match="the sets need 5 GPUs, this node has 4"):
        split_sets(SETS + (InterruptibleSet(2, 60, Decimal("1")),), inventory, 6, 1000)
    with pytest.raises(ConfigError, match=r"provider.interruptible\[1\].price_per_gpu_hour must be below"):
        split_sets((SETS[0], InterruptibleSet(1, 60, Decimal("3.6"))), inventory, 6, 1000)


def test_spot_sets__settings_refuse_a_shared_notice_both_shapes_and_more_than_eight():
    with pytest.raises(ValueError, match="one notice_s"):
        SpotSettings(sets=(SETS[0], InterruptibleSet(2, 5, Decimal("1"))))
    with pytest.raises(ValueError, match="use one or the other"):
        SpotSettings(interruptible_gpus=1, price_per_gpu_hour=Decimal("1"), sets=SETS)
    with pytest.raises(ValueError, match="at most 8"):
        SpotSettings(sets=tuple(InterruptibleSet(1, n, Decimal("1")) for n in range(1, 10)))


async def test_spot_sets__two_sets_offered_rented_and_preempted_each_with_its_own_notice(tmp_path):
    chain, achain, keys = await funded_market(renter=2)
    provider = Node(NodeConfig(tmp_path / "p", keys[1], params=PARAMS, provider=settings(),
                               name="provider", chain_poll_s=0.2), achain)
    renter = Node(NodeConfig(tmp_path / "r", keys[2], params=PARAMS, name="renter", chain_poll_s=0.2),
                  achain)
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        await nursery.start(renter.run)
        await renter.host.connect(provider.addrs()[0])

        def held():
            return renter.book.held(provider.key.public)

        async def offer_with(pred, timeout_s=15):
            with trio.fail_after(timeout_s):  # a hang guard
                while held() is None or not pred(held().offer):
                    await trio.sleep(0.1)
            return held()

        entry = await offer_with(lambda o: len(o.interruptible) == 2)
        offer = entry.offer
        inv = [g.uuid_digest for g in provider._all_gpus]
        assert [(s.gpus, s.notice_s, s.price_per_gpu_second) for s in offer.interruptible] == [
            ((inv[3],), 5, 200), (tuple(inv[1:3]), 30, 500)]
        assert offer.on_demand_gpus() == (inv[0],) and offer.terms.price_per_gpu_second == 1000
        # The query language: class=interruptible with a notice picks the set; price is its price.
        assert renter.search("class=interruptible notice>=30", "price") != []
        assert renter.search("class=interruptible notice>=31", "price") == []

        short = await renter.rent([entry], gpu_count=1, duration_s=300, max_price_per_gpu_second=200,
                                  notice_s=5)
        assert short.details.notice_s == 5 and short.details.gpus == (inv[3],)
        entry = await offer_with(lambda o: len(o.interruptible) == 1 and o.interruptible[0].notice_s == 30)
        # At once: the provider's reading kept from the first negotiation (allowance 60000,
        # before the first open spent it and the renter approved 300000) may be milliseconds
        # old; a refusal waits for a reading begun after the proposal arrived
        # (node/negotiate.py RenterFunds, read_since).
        long = await renter.rent([entry], gpu_count=2, duration_s=300, max_price_per_gpu_second=500,
                                 notice_s=30)
        assert long.details.notice_s == 30 and set(long.details.gpus) == set(inv[1:3])
        assert long.terms.price_per_second == 2 * 500 and short.terms.price_per_second == 200

        with trio.fail_after(20):
            while short.session.log.receipts < 2 or long.session.log.receipts < 2:
                await trio.sleep(0.1)
        await provider._curtail(PricePoint(time.time(), Decimal(500)))
        notices = {aid: provider.rentals[aid].session.machine.notice
                   for aid in (short.agreement_id, long.agreement_id)}
        assert notices[short.agreement_id].notice_ms == 5_000
        assert notices[long.agreement_id].notice_ms == 30_000
        with trio.fail_after(5):
            while short.session.machine.notice is None or long.session.machine.notice is None:
                await trio.sleep(0.1)
        # The on-demand GPU stays offered, no set while curtailed.
        await offer_with(lambda o: not o.interruptible and [g.uuid_digest for g in o.gpus] == [inv[0]])
        # The 5 s set stops first; the 30 s one is still serving then.
        with trio.fail_after(20):
            while short.session.machine.state not in (State.PREEMPTED, State.DONE):
                await trio.sleep(0.1)
        assert provider.rentals[long.agreement_id].session.machine.state is State.NOTICE
        await provider._resume_spot(PricePoint(time.time(), Decimal(50)))
        # Back: the 5 s set's GPU is free again; the 30 s set's GPUs are still rented.
        await offer_with(lambda o: [s.notice_s for s in o.interruptible] == [5])
        nursery.cancel_scope.cancel()
