"""node.chain against a real anvil process on loopback (skipped when anvil is not installed)."""

from __future__ import annotations

import pytest
from eth_utils import keccak

from node.chain import (
    AnvilProcess, ChainClient, InsufficientAllowance, NoContractCode, TransactionReverted,
    Wallet, WrongChainId, find_anvil,
)
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


async def test_erc20_lifecycle_on_anvil(anvil):
    deployer, provider, renter = wallets(anvil)
    boot = ChainClient.connect_http(anvil.url, chain_id=anvil.chain_id, escrow_address=None, local=True)
    escrow = await boot.deploy_escrow(deployer)
    token_addr = await boot.deploy_test_token(deployer)
    client = ChainClient.connect_http(anvil.url, chain_id=anvil.chain_id, escrow_address=escrow,
                                      token_address=token_addr, local=True)
    token = bytes.fromhex(token_addr[2:])
    t = AgreementTerms(provider=provider.address, renter=renter.address, token=token,
                       price_per_second=1_000, max_seconds=3_600, heartbeat_interval=30,
                       grace=600, arbiter=b"\0" * 20, dispute_window=0,
                       details_hash=keccak(b"anvil"))
    await client.mint_test_token(deployer, renter.address, t.deposit)
    consent = sign_consent(provider.key, client.domain(), t)
    with pytest.raises(InsufficientAllowance):
        await client.open(renter, t, consent)
    await client.approve(renter, token, t.deposit)
    rcpt = await client.open(renter, t, consent)
    assert rcpt["gasUsed"] < 110_000
    with pytest.raises(TransactionReverted, match="acked_seconds exceeds max_seconds"):
        await client.claim(provider, t, 3_601, sign_receipt(renter.key, client.domain(), t.agreement_id(), 3_601))
    await client.claim(provider, t, 60, sign_receipt(renter.key, client.domain(), t.agreement_id(), 60))
    assert await client.token_balance(token, provider.address) == 60_000
    assert await client.token_balance(token, renter.address) == t.deposit - 60_000
    names = [e.name for e in await client._run(client.events_sync, 0, client.block_number_sync())]
    assert names == ["Opened", "Claimed"]


async def test_recover_after_time_advance_on_anvil(anvil):
    deployer, provider, renter = wallets(anvil)
    client = ChainClient.connect_http(anvil.url, chain_id=anvil.chain_id, escrow_address=None, local=True)
    await client.deploy_escrow(deployer)
    t = AgreementTerms(provider=provider.address, renter=renter.address, token=b"\0" * 20,
                       price_per_second=10**9, max_seconds=100, heartbeat_interval=30,
                       grace=10, arbiter=b"\0" * 20, dispute_window=0,
                       details_hash=keccak(b"anvil recover"))
    await client.open(renter, t, sign_consent(provider.key, client.domain(), t))
    with pytest.raises(TransactionReverted, match="claim period not over"):
        await client.recover(deployer, t)
    await client.advance_time(111)
    await client.recover(deployer, t)
    assert (await client.status(t.agreement_id())).state == "final"


def test_connect_checks_chain_id_and_code(anvil):
    with pytest.raises(WrongChainId, match="31337"):
        ChainClient.connect_http(anvil.url, chain_id=1, escrow_address=None)
    with pytest.raises(NoContractCode):
        ChainClient.connect_http(anvil.url, chain_id=anvil.chain_id, escrow_address="0x" + "42" * 20)
