"""Node restart, in one process on the embedded chain: agreements accepted in negotiation whose
escrow was never opened are held for the rest of the open hold across a restart, then expire
and their GPUs are offered again."""

import time

import trio

from node.chain import AsyncChain, Chain
from node.fake_nvml import FakeGpu, FakeNvml
from node.negotiate import Candidate, negotiate_first
from node.node import Node, NodeConfig, ProviderSettings
from protocol.params import Params

PARAMS = Params(clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
                negotiation_step_timeout_ms=5_000)
HOLD_MS = 1_500


def settings():
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-restart-{i}",
                             memory_total_mib=24564, compute_capability=(8, 9)) for i in range(2)])
    return ProviderSettings(price_per_gpu_second=1_000, min_duration_s=5, max_duration_s=3600,
                            heartbeat_interval_s=1, grace_s=3, publish_interval_s=0.2, nvml=nvml,
                            open_hold_ms=HOLD_MS)


async def start(nursery, chain, path, key, provider=None, bootstrap=()):
    scope = trio.CancelScope()
    node = Node(NodeConfig(data_dir=path, wallet_key=key, params=PARAMS, provider=provider,
                           bootstrap=bootstrap, name=path.name, chain_poll_s=0.1), chain)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(run)
    return node, scope


async def test_restart__accepted_unopened_agreement_is_held_then_expires(tmp_path):
    chain = Chain.embedded()
    keys = [k.to_bytes() for k in chain.tester.backend.account_keys]
    chain.deploy_local_market(keys[0])
    achain = AsyncChain(chain)
    provider_settings = settings()
    async with trio.open_nursery() as nursery:
        provider, p_scope = await start(nursery, achain, tmp_path / "provider", keys[1], provider_settings)
        renter, r_scope = await start(nursery, achain, tmp_path / "renter", keys[2],
                                      bootstrap=(provider.addrs()[0],))
        with trio.fail_after(10):
            while len(renter.book) == 0:
                await renter.offers.sync()
                await trio.sleep(0.1)
        entry = renter.book.query("", "price")[0]
        group = await negotiate_first(renter.host, renter.key, renter.binding,
                                      [Candidate(entry.offer, entry.digest)], gpu_count=1,
                                      duration_s=60, max_price_per_gpu_second=1_000,
                                      access_key="", params=PARAMS, rng=renter.rng)
        aid = group.winner.terms.agreement_id()
        with trio.fail_after(5):
            while aid not in provider._pending:
                await trio.sleep(0.01)
        r_scope.cancel()
        p_scope.cancel()  # the renter never opens the escrow
        await trio.sleep(0.2)

        provider, p_scope = await start(nursery, achain, tmp_path / "provider", keys[1], provider_settings)
        assert provider.resumed == {"awaiting_open": [aid.hex()]}
        held = set(group.winner.details.gpus)
        assert held and not held & set(provider.capacity.free(int(time.time() * 1000)))
        with trio.fail_after(HOLD_MS / 1000 + 3):  # the chain watcher expires it after the hold
            while (await provider.store.get_agreement(aid)).state != "expired":
                await trio.sleep(0.1)
        assert aid not in provider._pending
        assert len(provider.capacity.free(int(time.time() * 1000))) == 2
        p_scope.cancel()
        await trio.sleep(0.2)

        provider, p_scope = await start(nursery, achain, tmp_path / "provider", keys[1], provider_settings)
        assert provider.resumed == {}  # expired is settled for good
        nursery.cancel_scope.cancel()
