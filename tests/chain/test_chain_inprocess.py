"""node.chain on the in-process py-evm chain, driven from trio."""

from __future__ import annotations

import json
from contextlib import aclosing

import pytest
import trio
from eth_utils import keccak

from node.chain import (
    ChainClient, ChainError, InsufficientAllowance, InsufficientFunds, NoContractCode,
    RpcUnavailable, TransactionReverted, Wallet, WrongChainId,
)
from protocol.agreement import AgreementTerms, sign_consent, sign_receipt
from protocol.eth import ZERO_ADDRESS


def make_terms(provider, renter, token=ZERO_ADDRESS, arbiter=ZERO_ADDRESS, window=0, salt=b"",
               price=1_000):
    return AgreementTerms(
        provider=provider.address, renter=renter.address, token=token,
        price_per_second=price, max_seconds=3_600, heartbeat_interval=30, grace=600,
        arbiter=arbiter, dispute_window=window, details_hash=keccak(b"chain" + salt))


@pytest.fixture
async def env():
    client, wallets = ChainClient.in_process()
    deployer, provider, renter, arbiter = wallets[:4]
    await client.deploy_escrow(deployer)
    token = bytes.fromhex((await client.deploy_test_token(deployer))[2:])
    return client, deployer, provider, renter, arbiter, token


async def test_native_lifecycle_and_confirmed_events(env):
    client, deployer, provider, renter, arbiter, _ = env
    start = await trio.to_thread.run_sync(client.block_number_sync)
    t = make_terms(provider, renter, price=10**12)
    await client.open(renter, t, sign_consent(provider.key, client.domain(), t))
    st = await client.status(t.agreement_id())
    assert st.state == "open"
    p0 = await client.token_balance(ZERO_ADDRESS, provider.address)
    await client.claim(provider, t, 600, sign_receipt(renter.key, client.domain(), t.agreement_id(), 600))
    assert (await client.status(t.agreement_id())).state == "final"
    gained = await client.token_balance(ZERO_ADDRESS, provider.address) - p0
    assert 600 * 10**12 - 10**15 < gained < 600 * 10**12  # paid, minus the claim's gas

    seen = []
    with trio.move_on_after(5):
        async with aclosing(client.watch_events(from_block=start, confirmations=0,
                                                poll_interval=0.01)) as events:
            async for ev in events:
                seen.append(ev)
                if ev.name == "Claimed":
                    break
    assert [e.name for e in seen] == ["Opened", "Claimed"]
    assert seen[0].args["agreement_id"] == t.agreement_id()
    assert seen[1].args["provider_amount"] == 600 * 10**12 and seen[1].args["settled"] is True


async def test_confirmation_depth_holds_back_recent_events(env):
    client, deployer, provider, renter, arbiter, _ = env
    start = await trio.to_thread.run_sync(client.block_number_sync)
    t = make_terms(provider, renter)
    await client.open(renter, t, sign_consent(provider.key, client.domain(), t))
    got = []

    async def watch():
        async with aclosing(client.watch_events(from_block=start + 1, confirmations=3,
                                                poll_interval=0.01)) as events:
            async for ev in events:
                got.append(ev)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.3)
        assert got == []  # the open is the head block: not yet 3 deep
        for i in range(3):
            await client.mint_test_token(deployer, deployer.address, 1)
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [e.name for e in got] == ["Opened"]


async def test_erc20_lifecycle_with_arbiter(env):
    client, deployer, provider, renter, arbiter, token = env
    t = make_terms(provider, renter, token=token, arbiter=arbiter.address, window=100)
    await client.mint_test_token(deployer, renter.address, t.deposit)
    consent = sign_consent(provider.key, client.domain(), t)
    with pytest.raises(InsufficientAllowance, match="approve first"):
        await client.open(renter, t, consent)
    await client.approve(renter, token, t.deposit)
    await client.open(renter, t, consent)
    await client.claim(provider, t, 1_000, sign_receipt(renter.key, client.domain(), t.agreement_id(), 1_000))
    assert (await client.status(t.agreement_id())).state == "claimed"
    await client.dispute(renter, t)
    with pytest.raises(TransactionReverted, match="only the arbiter can arbitrate"):
        await client.arbitrate(provider, t, 0)
    await client.arbitrate(arbiter, t, 400_000)
    assert await client.token_balance(token, provider.address) == 400_000
    assert await client.token_balance(token, renter.address) == t.deposit - 400_000


async def test_close_recover_finalize_withdraw_paths(env):
    client, deployer, provider, renter, arbiter, token = env
    t = make_terms(provider, renter, salt=b"recover")
    await client.open(renter, t, sign_consent(provider.key, client.domain(), t))
    await client.close(renter, t)
    with pytest.raises(TransactionReverted, match="claim period not over"):
        await client.recover(deployer, t)
    await client.advance_time(601)
    await client.recover(deployer, t)
    assert (await client.status(t.agreement_id())).state == "final"

    u = make_terms(provider, renter, arbiter=arbiter.address, window=50, salt=b"finalize")
    await client.open(renter, u, sign_consent(provider.key, client.domain(), u))
    await client.claim(provider, u, 5, sign_receipt(renter.key, client.domain(), u.agreement_id(), 5))
    with pytest.raises(TransactionReverted, match="dispute window not over"):
        await client.finalize(deployer, u)
    await client.advance_time(51)
    await client.finalize(deployer, u)
    assert (await client.status(u.agreement_id())).state == "final"
    assert await client.credit(ZERO_ADDRESS, renter.address) == 0
    with pytest.raises(TransactionReverted, match="nothing to withdraw"):
        await client.withdraw(renter, ZERO_ADDRESS)


async def test_actionable_errors(env, tmp_path):
    client, deployer, provider, renter, arbiter, token = env
    t = make_terms(provider, renter, token=token)
    consent = sign_consent(provider.key, client.domain(), t)
    with pytest.raises(InsufficientFunds, match="token units"):
        await client.open(renter, t, consent)
    broke = Wallet.from_key(keccak(b"no coins"))
    bt = make_terms(provider, broke)
    with pytest.raises(InsufficientFunds):
        await client.open(broke, bt, sign_consent(provider.key, client.domain(), bt))
    with pytest.raises(TransactionReverted, match="consent not signed by provider") as info:
        nt = make_terms(provider, renter, salt=b"bad consent")
        await client.open(renter, nt, sign_consent(renter.key, client.domain(), nt))
    assert "\n" not in str(info.value)
    with pytest.raises(WrongChainId):
        client.check(1)
    ghost = ChainClient(client.w3, escrow_address="0x" + "42" * 20)
    with pytest.raises(NoContractCode):
        ghost.check(client.chain_id)
    with pytest.raises(RpcUnavailable):
        ChainClient.connect_http("http://127.0.0.1:9", chain_id=1, escrow_address=None, timeout=1)
    assert issubclass(RpcUnavailable, ChainError)


async def test_concurrent_transactions_keep_nonces_in_order(env):
    client, deployer, provider, renter, arbiter, token = env
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(client.mint_test_token, deployer, renter.address, 1)
    assert await client.token_balance(token, renter.address) == 10


def test_keystore_roundtrip(tmp_path):
    w = Wallet.from_key(keccak(b"keystore"))
    path = tmp_path / "wallet.json"
    w.write_keystore(path, "correct horse")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert w.key.hex() not in path.read_text()
    assert Wallet.from_keystore(path, "correct horse") == w
    with pytest.raises(ChainError, match="cannot decrypt"):
        Wallet.from_keystore(path, "wrong")
    assert w.key.hex() not in repr(w)
    json.loads(path.read_text())


def test_test_token_refused_on_non_local_chain():
    client, wallets = ChainClient.in_process()
    client.local = False
    with pytest.raises(ChainError, match="non-local"):
        client.deploy_test_token_sync(wallets[0])
