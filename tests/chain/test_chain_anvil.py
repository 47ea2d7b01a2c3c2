"""The chain client against a real anvil process on 127.0.0.1 (skipped when anvil is absent;
.ci/run installs it from the npm registry)."""

import pytest
from eth_utils import keccak

from node.anvil import AnvilProcess, find_anvil
from node.chain import Chain, RevertedError, WrongChainError
from node.wallet import Wallet
from protocol.agreement import AgreementTerms, sign_consent, sign_receipt

pytestmark = pytest.mark.skipif(
    find_anvil() is None,
    reason="anvil not installed: npm install --prefix .anvil @foundry-rs/anvil-linux-amd64@1.7.1 "
           "or set GPUMARKET_ANVIL to the binary")


@pytest.fixture
def anvil():
    with AnvilProcess() as proc:
        yield proc
    assert proc.proc is None


def wallets(anvil, n=3):
    out = [Wallet.from_key(keccak(b"anvil wallet %d" % i)) for i in range(n)]
    for w in out:
        anvil.fund(w.address, 10**21)
    return out


def test_anvil__erc20_lifecycle_pays_both_sides(anvil):
    deployer, provider, renter = wallets(anvil)
    chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
    escrow, token = chain.deploy_local_market(deployer.key)
    chain = Chain.connect(anvil.url, chain_id=anvil.chain_id, escrow=escrow, token=token)
    t = AgreementTerms(provider=provider.address, renter=renter.address, token=token,
                       price_per_second=1_000, max_seconds=3_600, heartbeat_interval=30,
                       grace=600, arbiter=b"\0" * 20, dispute_window=0,
                       details_hash=keccak(b"anvil"), open_by=chain.now_s() + 120)
    chain.fund(renter.address, token_units=t.deposit, minter_key=deployer.key)
    opened = chain.open(renter.key, t, sign_consent(provider.key, chain.domain, t))  # approves first
    assert [name for name, _ in opened.events] == ["Opened"]
    with pytest.raises(RevertedError, match="acked_seconds exceeds max_seconds"):
        chain.claim(provider.key, t, 3_601, sign_receipt(renter.key, chain.domain, t.agreement_id(), 3_601))
    chain.claim(provider.key, t, 60, sign_receipt(renter.key, chain.domain, t.agreement_id(), 60))
    assert chain.token_balance(provider.address) == 60_000
    assert chain.token_balance(renter.address) == t.deposit - 60_000
    assert [e.name for e in chain.events(opened.block)] == ["Opened", "Claimed"]


def test_anvil__recover_after_the_claim_window(anvil):
    deployer, provider, renter = wallets(anvil)
    chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
    chain.use_escrow(chain.deploy("Escrow", deployer.key))
    t = AgreementTerms(provider=provider.address, renter=renter.address, token=b"\0" * 20,
                       price_per_second=10**9, max_seconds=100, heartbeat_interval=30,
                       grace=300, arbiter=b"\0" * 20, dispute_window=0,
                       details_hash=keccak(b"anvil recover"), open_by=chain.now_s() + 120)
    chain.open(renter.key, t, sign_consent(provider.key, chain.domain, t))
    with pytest.raises(RevertedError, match="claim period not over"):
        chain.recover(deployer.key, t)
    chain.time_travel(100 + 300 + 1)
    chain.recover(deployer.key, t)
    assert chain.status(t.agreement_id()).state == "final"


def test_anvil__connect_checks_chain_id_and_code(anvil):
    with pytest.raises(WrongChainError, match="31337"):
        Chain.connect(anvil.url, chain_id=1)
    from node.chain import NoContractError

    with pytest.raises(NoContractError):
        Chain.connect(anvil.url, chain_id=anvil.chain_id, escrow=b"\x42" * 20)
