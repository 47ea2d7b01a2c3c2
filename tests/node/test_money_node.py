"""Exact money end to end: a provider's configured price (whole tokens per GPU-hour) is
published in its token's own units, with the decimals read from the token contract, and a
renter's search, quote, --max-price and the escrow deposit all agree with it to the unit, for a
6-decimal token, an 18-decimal token and the native coin."""

import dataclasses
import random
import time
from decimal import Decimal

import pytest
import trio

from node.chain import AsyncChain, Chain
from node.control import ControlServer
from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.host import Verdict
from node.node import Node, NodeConfig, ProviderSettings, RentError
from protocol.eth import private_key_address
from protocol.identity import PeerKey
from protocol.messages import Binding
from protocol.money import format_tokens
from protocol.samples import make_offer

SECONDS = 30
CASES = [
    # symbol, decimals (None: the native coin), configured price, units per GPU-second
    ("tUSDC", 6, "0.45", 125),
    # 450000000000003600 / 3600: a float would lose the last digits (and 6 decimals hard-coded
    # would publish 125 units, 10**12 times too cheap)
    ("tDAI", 18, "0.450000000000003600", 125_000_000_000_001),
    ("ETH", None, "0.450000000000003600", 125_000_000_000_001),
]


@pytest.mark.parametrize("symbol, decimals, price, units", CASES, ids=["6-decimals", "18-decimals", "native"])
async def test_money__published_price_search_quote_and_deposit_agree_to_the_unit(
        tmp_path, symbol, decimals, price, units):
    chain = Chain.embedded()
    keys = chain.dev_keys()
    escrow, token = chain.deploy_local_market(keys[0], symbol=symbol, decimals=decimals)
    renter_key, provider_key = keys[1], keys[2]
    if decimals is not None:
        chain.fund(private_key_address(renter_key), token_units=10 ** (decimals + 3), minter_key=keys[0])
    await trio.sleep(chain.lead_s())
    achain = AsyncChain(chain)
    settings = ProviderSettings(price_per_gpu_hour=Decimal(price), min_duration_s=5, max_duration_s=3600,
                                heartbeat_interval_s=1, grace_s=300, publish_interval_s=0.2,
                                nvml=fake_gpus(PROVIDERS[0]))
    provider = Node(NodeConfig(tmp_path / "p", provider_key, params=DEMO_PARAMS, provider=settings,
                               name="provider", chain_poll_s=0.3), achain)
    renter = Node(NodeConfig(tmp_path / "r", renter_key, params=DEMO_PARAMS, name="renter",
                             chain_poll_s=0.3), achain)
    control = ControlServer(renter, tmp_path / "r")
    hourly = format_tokens(units * 3600, 18 if decimals is None else decimals)
    assert Decimal(hourly) == Decimal(price)  # these prices are whole units per second
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        await nursery.start(renter.run)
        await renter.host.connect(provider.addrs()[0])
        with trio.fail_after(15):
            while len(renter.book) < 1:
                await trio.sleep(0.2)
        offer = renter.book.query("")[0].offer
        assert offer.terms.token == token and offer.terms.token_symbol == symbol
        assert offer.terms.token_decimals == (18 if decimals is None else decimals)
        assert offer.terms.price_per_gpu_second == units

        rows = await control.op_search(f"price<={hourly}")
        assert [(r["price_per_gpu_hour"], r["token"]) for r in rows] == [(hourly, symbol)]
        assert await control.op_search(f"price<{hourly}") == []
        one_unit_less = format_tokens(units * 3600 - 1, offer.terms.token_decimals)
        assert await control.op_search(f"price<={one_unit_less}") == []

        quote = await control.op_quote(rows[0]["offer_id"], seconds=SECONDS)
        assert quote["deposit"] == units * SECONDS
        assert Decimal(quote["deposit_tokens"]) == Decimal(price) * SECONDS / 3600

        await control.op_rent(rows[0]["offer_id"], seconds=SECONDS, max_price_per_gpu_hour=hourly)
        (rental,) = renter.rentals.values()
        assert rental.terms.price_per_second == units and rental.terms.deposit == units * SECONDS
        opened = [e for e in chain.events() if e.name == "Opened"]
        assert [e.args["deposit"] for e in opened] == [units * SECONDS]
        assert chain.balance(escrow, token) == units * SECONDS
        nursery.cancel_scope.cancel()


async def test_money__an_offer_whose_decimals_contradict_its_token_is_not_listed_or_rented(tmp_path):
    """A provider claiming 18 decimals for a 6-decimal token would look 10**12 times cheaper in
    search and under --max-price; the renter compares with the token contract's decimals()."""
    chain = Chain.embedded()
    keys = chain.dev_keys()
    chain.deploy_local_market(keys[0], symbol="tUSDC", decimals=6)
    renter = Node(NodeConfig(tmp_path / "r", keys[1], params=DEMO_PARAMS, name="renter"),
                  AsyncChain(chain))
    rng = random.Random(7)
    peer = PeerKey(rng.randbytes(32))
    honest = make_offer(peer, Binding.create(peer, rng.randbytes(32), chain.chain_id), rng,
                        int(time.time() * 1000), escrow=chain.escrow_address,
                        token=chain.token_address, price_per_gpu_second=125)
    liar = dataclasses.replace(honest, terms=dataclasses.replace(honest.terms, token_decimals=18))
    liar = liar.sign(peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(renter.run)
        assert renter.offers.ingest(liar.encode(), "gossip", None) is Verdict.ACCEPT  # valid, held
        (entry,) = renter.book.query("")
        with trio.fail_after(5), pytest.raises(RentError, match="units of 18 decimals, its token's contract has 6"):
            await renter.rent([entry], gpu_count=1, duration_s=SECONDS, max_price_per_gpu_second=125)
        assert renter.search("") == []  # the decimals are now known: the offer is not listed
        assert await renter.store.agreements_in_state("agreed") == []
        nursery.cancel_scope.cancel()
