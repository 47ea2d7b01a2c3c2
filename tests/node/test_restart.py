"""Node restart, in one process on the embedded chain (a node is "killed" by cancelling its
scope: what it left on disk is what a restart reads). Agreements accepted in negotiation whose
escrow was not opened are held for the rest of the open hold, then expire; a renter restarted
while its open transaction was in flight resumes the rental when it is mined; a rental the
renter closed while the provider was down is claimed when the provider starts."""

import time
from decimal import Decimal
from functools import partial

import trio

from node.fake_nvml import FakeGpu, FakeNvml
from node.negotiate import Candidate, negotiate_first
from node.node import ProviderSettings
from protocol.eth import private_key_address
from protocol.params import Params
from tests.node.node_helpers import funded_market, start_node

PARAMS = Params(clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
                negotiation_step_timeout_ms=5_000)
HOLD_MS = 10_000  # the consent's open_by is accept time + this: the late open must fit in it


def settings():
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-restart-{i}",
                             memory_total_mib=24564, compute_capability=(8, 9)) for i in range(2)])
    return ProviderSettings(price_per_gpu_hour=Decimal("3.6"), min_duration_s=5, max_duration_s=3600,
                            heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2, nvml=nvml,
                            open_hold_ms=HOLD_MS)


start = partial(start_node, params=PARAMS)


async def negotiate(renter, provider):
    with trio.fail_after(5):  # the provider re-announces its offer without the GPUs it holds
        while (entry := renter.book.held(provider.key.public)) is None \
                or len(entry.offer.gpus) != len(provider.capacity.free(int(time.time() * 1000))) \
                or entry.digest != provider.book.held(provider.key.public).digest:
            await trio.sleep(0.05)
    group = await negotiate_first(renter.host, renter.key, renter.binding,
                                  [Candidate(entry.offer, entry.digest)], gpu_count=1,
                                  duration_s=60, max_price_per_gpu_second=1_000,
                                  access_key="", params=PARAMS, rng=renter.rng)
    aid = group.winner.terms.agreement_id()
    with trio.fail_after(5):  # the provider records it once the stream closes
        while aid not in provider._pending:
            await trio.sleep(0.01)
    return group.winner


async def test_restart__unopened_agreements__held_across_restart_late_open_resumes_rest_expire(tmp_path):
    chain, achain, keys = await funded_market(renter=2)
    provider_settings = settings()
    p_dir, r_dir = tmp_path / "provider", tmp_path / "renter"
    async with trio.open_nursery() as nursery:
        provider, p_scope = await start(nursery, achain, p_dir, keys[1], provider_settings)
        bootstrap = (provider.addrs()[0],)
        renter, r_scope = await start(nursery, achain, r_dir, keys[2], bootstrap=bootstrap)
        with trio.fail_after(10):
            while len(renter.book) == 0:
                await renter.offers.sync()
                await trio.sleep(0.1)
        await achain.approve(keys[2], 10**9)  # as rent() does: providers check it before Accept
        never = await negotiate(renter, provider)  # the renter never opens this one
        late = await negotiate(renter, provider)  # ... and is killed while opening this one
        a_never, a_late = never.terms.agreement_id(), late.terms.agreement_id()
        await renter._remember(a_late, "renter", "agreed", late.terms, late.details)  # as rent() does
        r_scope.cancel()
        p_scope.cancel()
        await trio.sleep(0.2)

        listen = bootstrap[0].split("/p2p/")[0]  # the port the renter knows
        provider, p_scope = await start(nursery, achain, p_dir, keys[1], provider_settings,
                                        listen=listen)
        assert provider.resumed == {"awaiting_open": [a_never.hex(), a_late.hex()]}
        assert provider.capacity.free(int(time.time() * 1000)) == ()  # both GPUs still held
        renter, r_scope = await start(nursery, achain, r_dir, keys[2], bootstrap=bootstrap)
        assert renter.resumed == {"awaiting_open": [a_late.hex()]}
        await achain.open(keys[2], late.terms, late.consent_sig)  # the open is mined only now
        with trio.fail_after(10):  # the renter's watcher sees Opened and starts the rental
            while a_late not in renter.rentals or renter.rentals[a_late].session.log.receipts < 1:
                await trio.sleep(0.1)
        with trio.fail_after(HOLD_MS / 1000 + 3):  # the provider's watcher expires the other
            while (await provider.store.get_agreement(a_never)).state != "expired":
                await trio.sleep(0.1)
        assert a_never not in provider._pending
        assert len(provider.capacity.free(int(time.time() * 1000))) == 1
        assert (await provider.store.get_agreement(a_late)).state == "open"
        assert (await renter.store.get_agreement(a_late)).state == "open"
        p_scope.cancel()
        await trio.sleep(0.2)

        provider, p_scope = await start(nursery, achain, p_dir, keys[1], provider_settings,
                                        listen=listen)
        assert provider.resumed == {"resumed": [a_late.hex()]}  # the expired one stays expired
        nursery.cancel_scope.cancel()


async def test_restart__renter_closed_while_provider_was_down__provider_claims_on_start(tmp_path):
    chain, achain, keys = await funded_market(renter=2)
    fast = PARAMS.replace(clock_skew_ms=5_000, renter_heartbeat_timeout_intervals=2,
                          provider_stop_after_missed_receipts=3)
    provider_settings = settings()  # grace 300 s: the claim window after close
    async with trio.open_nursery() as nursery:
        provider, p_scope = await start(nursery, achain, tmp_path / "provider", keys[1],
                                        provider_settings, params=fast)
        renter, r_scope = await start(nursery, achain, tmp_path / "renter", keys[2],
                                      bootstrap=(provider.addrs()[0],), params=fast)
        with trio.fail_after(10):
            while len(renter.book) == 0:
                await renter.offers.sync()
                await trio.sleep(0.1)
        rental = await renter.rent(renter.book.query("", "price")[:1], gpu_count=1, duration_s=60,
                                   max_price_per_gpu_second=1_000)
        aid = rental.agreement_id
        with trio.fail_after(20):
            # The provider must have stored a receipt worth something before it goes down (the
            # renter counting its own sent receipts raced the provider's store under load).
            while True:
                stored = await provider._latest_receipt(aid)
                if stored is not None and stored.acked_seconds >= 1:
                    break
                await trio.sleep(0.1)
        p_scope.cancel()  # the provider goes down; the renter stops paying and closes
        with trio.fail_after(15):
            while chain.status(aid).state != "closed":
                await trio.sleep(0.2)
        provider, p_scope = await start(nursery, achain, tmp_path / "provider", keys[1],
                                        provider_settings, params=fast)
        assert provider.resumed == {"claimed": [aid.hex()]}
        latest = await provider._latest_receipt(aid)
        assert latest.acked_seconds >= 1
        assert [e.name for e in chain.events() if e.agreement_id == aid] == ["Opened", "Closed", "Claimed"]
        assert chain.token_balance(private_key_address(keys[1])) == 1_000 * latest.acked_seconds
        assert (await provider.store.get_agreement(aid)).state == "settled"
        nursery.cancel_scope.cancel()
