"""The effect executor (node/effects.py) and the negotiation's effects honoured in order: the
provider's agreement is durable before its consent leaves."""

import time
from decimal import Decimal
from functools import partial

import pytest
import trio

from node.effects import EffectExecutor, MissingPort
from node.fake_nvml import FakeGpu, FakeNvml
from node.negotiate import Candidate, negotiate_first
from node.node import ProviderSettings
from protocol.effects import EscrowCall, Persist, Report, Send
from protocol.messages import NegotiationReject
from protocol.negotiation import State
from protocol.params import Params
from tests.node.node_helpers import funded_market, start_node

PARAMS = Params(clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
                negotiation_step_timeout_ms=3_000)


def _reject() -> NegotiationReject:
    return NegotiationReject(negotiation_id=b"\x01" * 16, round=1, reason=1, detail="",
                             sent_ms=1, signature=b"\x00" * 64)


async def test_effects__run_in_order_each_finished_before_the_next():
    seen = []

    async def slow_persist(e):
        await trio.sleep(0.05)  # a Send must wait for it
        seen.append(("persist", e.record))

    async def send(e):
        seen.append(("send", e.to))

    async def report(e):
        seen.append(("report", e.event))

    ex = EffectExecutor(persist=slow_persist, send=send, report=report)
    msg = _reject()
    await ex.run([Persist("proposal", b"a" * 32, msg), Persist("accept", b"a" * 32, msg),
                  Send(b"k", msg), Report("agreed")])
    assert seen == [("persist", "proposal"), ("persist", "accept"), ("send", b"k"), ("report", "agreed")]


async def test_effects__a_failed_persist_stops_the_rest_and_a_missing_port_is_an_error():
    sent = []

    async def broken(e):
        raise OSError("disk full")

    async def send(e):
        sent.append(e)

    msg = _reject()
    with pytest.raises(OSError):
        await EffectExecutor(persist=broken, send=send).run([Persist("accept", b"a" * 32, msg),
                                                             Send(b"k", msg)])
    assert sent == []  # the consent never left
    with pytest.raises(MissingPort, match="EscrowCall"):
        await EffectExecutor(send=send).run([EscrowCall("open", b"a" * 32)])
    await EffectExecutor(send=send, leave=(EscrowCall,)).run([EscrowCall("open", b"a" * 32)])


def _settings():
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid=f"GPU-effects-{i}",
                             memory_total_mib=24564, compute_capability=(8, 9)) for i in range(2)])
    return ProviderSettings(price_per_gpu_hour=Decimal("3.6"), min_duration_s=5, max_duration_s=3600,
                            heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2, nvml=nvml,
                            open_hold_ms=10_000)


_start = partial(start_node, params=PARAMS)


async def _entry(renter, provider):
    with trio.fail_after(10):
        while (entry := renter.book.held(provider.key.public)) is None \
                or len(entry.offer.gpus) != len(provider.capacity.free(int(time.time() * 1000))) \
                or entry.digest != provider.book.held(provider.key.public).digest:
            await renter.offers.sync()
            await trio.sleep(0.05)
    return entry


async def test_effects__the_provider_persists_the_agreement_before_the_consent_leaves(tmp_path):
    """Killed between its Persist and its Send, a provider restarted on the same store finds the
    agreement (holding its GPUs until open_by) and the renter never got the consent; when the
    Accept does leave, the provider's store already holds the agreement."""
    chain, achain, keys = await funded_market(renter=2)
    p_dir = tmp_path / "provider"
    async with trio.open_nursery() as nursery:
        provider, p_scope = await _start(nursery, achain, p_dir, keys[1], _settings())
        bootstrap = (provider.addrs()[0],)
        renter, _ = await _start(nursery, achain, tmp_path / "renter", keys[2], bootstrap=bootstrap)
        await achain.approve(keys[2], 10**9)
        entry = await _entry(renter, provider)

        persisted = []
        persist = provider.desk.persist

        async def persist_then_die(machine, peer, effect):
            await persist(machine, peer, effect)
            if effect.record == "accept":
                persisted.append(effect.agreement_id)
                p_scope.cancel()  # the provider is killed here, after Persist, before Send
                await trio.sleep(5)
                raise RuntimeError("killed")  # (in case the handler outlives the node's scope)

        provider.desk.persist = persist_then_die
        group = await negotiate_first(renter.host, renter.key, renter.binding,
                                      [Candidate(entry.offer, entry.digest)], gpu_count=1,
                                      duration_s=60, max_price_per_gpu_second=1_000,
                                      access_key="", params=PARAMS, rng=renter.rng)
        (machine,) = group.negotiations.values()
        assert group.winner is None and machine.state is State.FAILED
        assert machine.terms is None  # no Accept, no consent: nothing the renter could open
        (aid,) = persisted
        await trio.sleep(0.2)

        listen = bootstrap[0].split("/p2p/")[0]
        provider, p_scope = await _start(nursery, achain, p_dir, keys[1], _settings(), listen=listen)
        assert provider.resumed == {"awaiting_open": [aid.hex()]}  # the agreement is there
        assert (await provider.store.get_agreement(aid)).state == "accepted"
        assert len(provider.capacity.free(int(time.time() * 1000))) == 1  # held until open_by

        # The normal case: at the moment the renter reads the Accept, the provider has it on disk.
        at_accept = []

        async def check_provider_store(winner, effect):
            row = await provider.store.get_agreement(effect.agreement_id)
            at_accept.append(None if row is None else (row.role, row.state))

        await renter.host.connect(provider.addrs()[0])
        entry = await _entry(renter, provider)
        group = await negotiate_first(renter.host, renter.key, renter.binding,
                                      [Candidate(entry.offer, entry.digest)], gpu_count=1,
                                      duration_s=60, max_price_per_gpu_second=1_000,
                                      access_key="", params=PARAMS, rng=renter.rng,
                                      persist=check_provider_store)
        assert group.winner is not None and at_accept == [("provider", "accepted")]
        nursery.cancel_scope.cancel()
