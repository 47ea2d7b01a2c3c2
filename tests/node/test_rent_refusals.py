"""A renter refuses offers it must not take before negotiating (issue 12): an arbiter not on its
own allowlist (`renter.arbiters`, empty by default), a known refused token. And the config key.

The chain is stubbed at the edge: the refusal happens before any chain or network call, and the
stub answers only the wallet-balance read that comes right after it."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import trio

from node.config import ConfigError, default_config_text, load_config
from node.node import Node, NodeConfig, RentError
from protocol.messages import digest
from protocol.samples import make_offer, make_provider

NOW = 1_767_225_600_000
P_KEY, P_WALLET, P_BINDING = make_provider(random.Random("provider"))
ARBITER = b"\xab" * 20


class StubChain:
    """Answers the renter's balance check with 0 (so a rent that passes the refusals stops at
    'not enough funds', before any negotiation)."""

    def __init__(self, chain_id: int) -> None:
        # the sample offers' escrow (protocol.samples.make_offer), so they are rentable here
        self.chain = SimpleNamespace(chain_id=chain_id, escrow_address=b"\xee" * 20, funds=None,
                                     known_decimals=lambda token: 6)  # the samples' USDC
        self.calls: list[str] = []

    async def run(self, fn, *args):
        self.calls.append("balance")
        return 0, 0  # (balance, allowance)


def entry(offer):
    d = digest(offer.encode())
    return SimpleNamespace(offer=offer, digest=d, offer_id=d.hex()[:12],
                           chain_id=offer.terms.chain_id, escrow=offer.terms.escrow)


def offer_with(**terms):
    base = make_offer(P_KEY, P_BINDING, random.Random("offer"), NOW, gpu_count=1)
    return dataclasses.replace(base, terms=dataclasses.replace(base.terms, **terms)).sign(P_KEY)


def rent(tmp_path, offers, arbiters=frozenset()):
    chain = StubChain(P_BINDING.chain_id)
    node = Node(NodeConfig(data_dir=tmp_path, wallet_key=b"\x42" * 32, arbiters=arbiters), chain)

    async def go():
        await node.rent([entry(o) for o in offers], gpu_count=1, duration_s=600,
                        max_price_per_gpu_second=10**6)

    with pytest.raises(RentError) as err:
        trio.run(go)
    return str(err.value), chain.calls


def test_rent__offer_with_an_arbiter_is_refused_by_default(tmp_path):
    why, calls = rent(tmp_path, [offer_with(arbiter=ARBITER, dispute_window_s=3600)])
    assert "refused every offer" in why and "trusts no arbiter" in why and ARBITER.hex() in why
    assert calls == []  # refused before the wallet check, let alone a negotiation


def test_rent__arbiter_not_on_the_allowlist_is_refused(tmp_path):
    why, calls = rent(tmp_path, [offer_with(arbiter=ARBITER, dispute_window_s=3600)],
                      frozenset({b"\xcd" * 20}))
    assert "not in renter.arbiters" in why and calls == []


def test_rent__allowlisted_arbiter_and_no_arbiter_pass_the_refusals(tmp_path):
    why, calls = rent(tmp_path, [offer_with(arbiter=ARBITER, dispute_window_s=3600)],
                      frozenset({ARBITER}))
    assert "not enough funds" in why and calls == ["balance"]
    why, calls = rent(tmp_path, [offer_with()])
    assert "not enough funds" in why and calls == ["balance"]


def test_rent__refused_offers_are_dropped_and_the_rest_kept(tmp_path):
    why, calls = rent(tmp_path, [offer_with(arbiter=ARBITER, dispute_window_s=3600), offer_with()])
    assert "not enough funds" in why and calls == ["balance"]


def test_rent__known_rebasing_token_is_refused(tmp_path):
    from protocol.tokens import REFUSED_TOKENS

    (chain_id, token), _ = next(iter(REFUSED_TOKENS.items()))
    offer = offer_with(chain_id=chain_id, token=token)
    chain = StubChain(chain_id)
    node = Node(NodeConfig(data_dir=tmp_path, wallet_key=b"\x42" * 32), chain)

    async def go():
        await node.rent([entry(offer)], gpu_count=1, duration_s=600, max_price_per_gpu_second=1)

    with pytest.raises(RentError, match="rebasing"):
        trio.run(go)
    assert chain.calls == []


def test_config__renter_arbiters(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(default_config_text(tmp_path))
    assert load_config(path).renter.arbiters == ()  # default: trust no arbiter
    path.write_text(default_config_text(tmp_path).replace(
        "arbiters = []", f'arbiters = ["0x{ARBITER.hex()}"]'))
    assert load_config(path).renter.arbiters == (ARBITER,)
    path.write_text(default_config_text(tmp_path).replace("arbiters = []", 'arbiters = ["0x12"]'))
    with pytest.raises(ConfigError, match="renter.arbiters"):
        load_config(path)
