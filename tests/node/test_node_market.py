"""Whole nodes in one process on the embedded EVM: what the demo does not show."""

import random
import time
from decimal import Decimal

import pytest
import trio

from node.chain import AsyncChain, Chain
from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.host import Verdict
from node.node import Node, NodeConfig, ProviderSettings, RentError
from node.testing import recover_past_grace
from protocol.eth import private_key_address
from protocol.identity import PeerKey
from protocol.messages import Binding
from protocol.samples import make_offer
from tests.node.node_helpers import funded_market


async def test_node__failing_access_hook_serves_nothing_and_the_renter_gets_everything_back(tmp_path):
    chain, achain, keys = await funded_market(renter=1, token_units=10**9)
    renter_key, provider_key = keys[1], keys[2]
    spec = PROVIDERS[0]
    settings = ProviderSettings(price_per_gpu_hour=Decimal("0.45"), min_duration_s=5, max_duration_s=3600,
                                heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2,
                                nvml=fake_gpus(spec), access_hook=("false",))
    provider = Node(NodeConfig(tmp_path / "p", provider_key, params=DEMO_PARAMS, provider=settings,
                               name="provider", chain_poll_s=0.3), achain)
    renter = Node(NodeConfig(tmp_path / "r", renter_key, params=DEMO_PARAMS, name="renter",
                             chain_poll_s=0.3), achain)
    renter_before = chain.token_balance(private_key_address(renter_key))
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        await nursery.start(renter.run)
        await renter.host.connect(provider.addrs()[0])
        with trio.fail_after(15):
            while len(renter.book) < 1:
                await trio.sleep(0.2)
        entry = renter.book.query("", "price")[0]
        rental = await renter.rent([entry], gpu_count=1, duration_s=30,
                                   max_price_per_gpu_second=125, access_key="k")
        aid = rental.agreement_id
        with trio.fail_after(40):  # served nothing: the renter closes the escrow
            while (await achain.run(chain.status, aid)).state != "closed":
                await trio.sleep(0.2)
        # The grace (5 min at least) passes on the chain's clock: the deposit comes back.
        await achain.run(recover_past_grace, chain, renter_key, rental.terms)
        events = [e.name for e in chain.events() if e.agreement_id == aid]
        p_rental = provider.rentals[aid]
        assert p_rental.session.halted == "access hook failed"
        assert p_rental.session.log.heartbeats == 0 and rental.session.log.receipts == 0
        assert events == ["Opened", "Closed", "Recovered"]
        nursery.cancel_scope.cancel()
    assert chain.token_balance(private_key_address(renter_key)) == renter_before
    assert chain.token_balance(private_key_address(provider_key)) == 0


async def test_node__renter_rents_from_a_provider_it_only_heard_of_through_a_relay(tmp_path):
    chain, achain, keys = await funded_market(renter=1, token_units=10**9)

    def provider(name, key, spec):
        return Node(NodeConfig(tmp_path / name, key, params=DEMO_PARAMS, name=name, chain_poll_s=0.3,
                               provider=ProviderSettings(
                                   price_per_gpu_hour=Decimal("0.45"), min_duration_s=5, max_duration_s=3600,
                                   heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2,
                                   nvml=fake_gpus(spec))), achain)

    relay = provider("relay", keys[2], PROVIDERS[0])
    far = provider("far", keys[3], PROVIDERS[1])
    renter = Node(NodeConfig(tmp_path / "r", keys[1], params=DEMO_PARAMS, name="renter",
                             chain_poll_s=0.3), achain)
    async with trio.open_nursery() as nursery:
        for n in (relay, far, renter):
            await nursery.start(n.run)
        await far.host.connect(relay.addrs()[0])
        await renter.host.connect(relay.addrs()[0])  # the renter never dials `far` itself
        with trio.fail_after(20):
            while renter.book.held(far.key.public) is None:
                await renter.offers.sync()
                await trio.sleep(0.3)
        assert far.peer_id not in renter.host.host.get_network().connections
        entry = renter.book.held(far.key.public)
        assert entry.offer.addrs and entry.offer.addrs[0].endswith(str(far.peer_id))
        rental = await renter.rent([entry], gpu_count=1, duration_s=30, max_price_per_gpu_second=125)
        with trio.fail_after(20):
            while rental.session.log.receipts < 2:
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


async def test_node__keeps_only_its_chain_and_lists_and_rents_only_its_escrow(tmp_path):
    """An offer for another chain is ignored (wrong_chain): not held, so neither listed nor
    served by sync. An offer naming another escrow on this chain is valid and held (relayed),
    but search does not list it and rent refuses it before negotiating or approving anything."""
    chain = Chain.embedded()
    keys = chain.dev_keys()
    chain.deploy_local_market(keys[0])
    renter_wallet = private_key_address(keys[1])
    chain.fund(renter_wallet, token_units=10**12, minter_key=keys[0])
    renter = Node(NodeConfig(tmp_path / "r", keys[1], params=DEMO_PARAMS, name="renter",
                             chain_poll_s=0.3), AsyncChain(chain))
    rng = random.Random(12)

    def offer(chain_id: int, escrow: bytes, price: int) -> bytes:
        peer = PeerKey(rng.randbytes(32))
        binding = Binding.create(peer, rng.randbytes(32), chain_id)
        return make_offer(peer, binding, rng, int(time.time() * 1000), escrow=escrow,
                          token=chain.token_address, price_per_gpu_second=price).encode()

    async with trio.open_nursery() as nursery:
        await nursery.start(renter.run)
        ours = offer(chain.chain_id, chain.escrow_address, 200)
        other_escrow = offer(chain.chain_id, b"\x42" * 20, 100)  # cheaper, another escrow
        other_chain = offer(chain.chain_id + 1, chain.escrow_address, 50)  # cheapest, another chain
        assert renter.offers.ingest(ours, "gossip", None) is Verdict.ACCEPT
        assert renter.offers.ingest(other_escrow, "gossip", None) is Verdict.ACCEPT
        assert renter.offers.ingest(other_chain, "gossip", None) is Verdict.IGNORE
        assert renter.offers.counters["offers.gossip.ignore.wrong_chain"] == 1
        assert len(renter.book) == 2 and other_chain not in renter.book.snapshot()
        assert other_escrow in renter.book.snapshot()  # held: served by sync, relayed

        hits = renter.search("", "price")
        assert [h.data for h in hits] == [ours]
        assert [h.data for h in renter.search("", "price", limit=1)] == [ours]
        foreign = next(e for e in renter.book if e.data == other_escrow)
        assert "0x" + (b"\x42" * 20).hex() in renter.not_rentable(foreign)
        allowance = chain.token.functions.allowance(
            chain.w3.to_checksum_address(renter_wallet), chain.escrow.address).call()
        with trio.fail_after(5), pytest.raises(RentError) as err:
            await renter.rent([foreign], gpu_count=1, duration_s=600, max_price_per_gpu_second=100)
        assert "names escrow 0x4242" in str(err.value) and foreign.offer_id in str(err.value)
        assert chain.token.functions.allowance(
            chain.w3.to_checksum_address(renter_wallet), chain.escrow.address).call() == allowance
        assert await renter.store.agreements_in_state("agreed") == []
        nursery.cancel_scope.cancel()
