"""The chain client against the real escrow contract on an in-process EVM (py-evm)."""

import pytest
import trio
from eth_utils import keccak

from node.chain import (
    AsyncChain,
    Chain,
    ChainError,
    InsufficientFundsError,
    NoContractError,
    RevertedError,
    WalletEscrow,
)
from protocol.agreement import AgreementTerms, sign_consent, sign_receipt
from protocol.effects import EscrowCall
from protocol.eth import ZERO_ADDRESS, private_key_address

PROVIDER, RENTER, STRANGER = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32


@pytest.fixture(scope="module")
def chain():
    c = Chain.embedded()
    keys = c.dev_keys()
    c.deploy_local_market(keys[0])
    for k in (PROVIDER, RENTER):
        c.fund(private_key_address(k), native_wei=10**18, token_units=10**12, minter_key=keys[0])
    c.fund(private_key_address(STRANGER), native_wei=10**17)
    return c


def terms(chain, tag: bytes, *, token=None, price=1000, max_seconds=3600, grace=600,
          open_by=None) -> AgreementTerms:
    return AgreementTerms(private_key_address(PROVIDER), private_key_address(RENTER),
                          chain.token_address if token is None else token, price, max_seconds,
                          30, grace, ZERO_ADDRESS, 0, keccak(tag),
                          chain.now_s() + 120 if open_by is None else open_by)


def test_chain__open_then_claim_pays_both_sides(chain):
    t = terms(chain, b"claim")
    p0, r0 = chain.token_balance(t.provider), chain.token_balance(t.renter)
    opened = chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    assert [name for name, _ in opened.events] == ["Opened"]
    assert chain.opened_at(t) == opened.timestamp
    aid = t.agreement_id()
    chain.claim(PROVIDER, t, 600, sign_receipt(RENTER, chain.domain, aid, 600))
    assert chain.token_balance(t.provider) - p0 == 600 * 1000
    assert r0 - chain.token_balance(t.renter) == 600 * 1000
    assert chain.status(aid).state == "final"
    names = [e.name for e in chain.events(opened.block)]
    assert names[:2] == ["Opened", "Claimed"]


def test_chain__close_then_recover_refunds_everything(chain):
    t = terms(chain, b"recover", grace=300)
    r0 = chain.token_balance(t.renter)
    chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    chain.close(RENTER, t)
    with pytest.raises(RevertedError) as err:
        chain.recover(RENTER, t)
    assert err.value.reason == "claim period not over"
    chain.time_travel(301)
    chain.recover(STRANGER, t)  # anyone may recover on the renter's behalf
    assert chain.token_balance(t.renter) == r0


def test_chain__native_coin_deposit(chain):
    t = terms(chain, b"native", token=ZERO_ADDRESS, price=10**9)
    before = chain.native_balance(t.provider)
    chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    result = chain.claim(PROVIDER, t, 10, sign_receipt(RENTER, chain.domain, t.agreement_id(), 10))
    fee = result.gas_used * chain.w3.eth.get_transaction(result.tx_hash).gasPrice
    assert chain.native_balance(t.provider) == before + 10 * 10**9 - fee


def test_chain__errors_a_person_can_act_on(chain):
    t = terms(chain, b"errors", price=10**12)  # deposit far above the renter's tokens
    with pytest.raises(InsufficientFundsError) as err:
        chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    assert "deposit" in str(err.value)
    t = terms(chain, b"errors2")
    with pytest.raises(RevertedError) as err:
        chain.open(RENTER, t, sign_consent(RENTER, chain.domain, t))  # consent by the wrong key
    assert err.value.reason == "consent not signed by provider"
    with pytest.raises(ChainError):
        chain.open(PROVIDER, t, b"")  # not the renter's wallet
    with pytest.raises(NoContractError):
        chain.use_escrow(b"\x42" * 20)


def test_chain__wrong_receipt_is_refused_with_the_contract_reason(chain):
    t = terms(chain, b"receipt")
    chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    other = terms(chain, b"other").agreement_id()
    with pytest.raises(RevertedError) as err:
        chain.claim(PROVIDER, t, 5, sign_receipt(RENTER, chain.domain, other, 5))
    assert err.value.reason == "receipt not signed by renter"


async def test_chain__async_wrapper_serialises_calls_from_trio(chain):
    ac = AsyncChain(chain)
    ts = [terms(chain, b"async %d" % i) for i in range(4)]
    async with trio.open_nursery() as nursery:
        for t in ts:
            nursery.start_soon(ac.open, RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    assert all(chain.status(t.agreement_id()).state == "open" for t in ts)
    escrow = WalletEscrow(ac, PROVIDER)
    t = ts[0]
    assert await escrow.started_s(t) is not None
    sig = sign_receipt(RENTER, chain.domain, t.agreement_id(), 7)
    await escrow.execute(EscrowCall("claim", t.agreement_id(), {"acked_seconds": 7, "receipt_sig": sig}), t)
    assert chain.status(t.agreement_id()).state == "final"


def test_revert_reason__anvil_tuple_text_gives_the_bare_reason():
    from node.chain import _revert_reason

    anvil = ("('execution reverted: claim period not over', '0x08c379a0000000000000000000000000"
             "0000000000000000000000000000000000000020')")
    assert _revert_reason(Exception(anvil)) == "claim period not over"
    assert _revert_reason(Exception("execution reverted: claim period not over")) == "claim period not over"


def test_chain__open_after_open_by_is_refused_before_sending(chain):
    t = terms(chain, b"late", open_by=chain.now_s() + 10)
    chain.time_travel(11)
    nonce = chain.w3.eth.get_transaction_count(chain.w3.to_checksum_address(t.renter))
    with pytest.raises(ChainError, match="consent expired"):
        chain.open(RENTER, t, sign_consent(PROVIDER, chain.domain, t))
    # nothing was sent (no approve, no open): the renter paid no gas for a sure revert
    assert chain.w3.eth.get_transaction_count(chain.w3.to_checksum_address(t.renter)) == nonce
    assert chain.status(t.agreement_id()).state == "none"
