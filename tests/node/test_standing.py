"""Provider standing from the escrow's events (node/standing.py, protocol/standing.py) against a
real anvil running the real escrow, and what it does to a fresh renter's `rank` sort under a
flood of cheaper, valid Sybil offers (issue 11: a fresh renter rented 0 of 10 times)."""

from __future__ import annotations

import random

import pytest
import trio
from eth_utils import keccak

from node.anvil import AnvilProcess, find_anvil
from node.chain import AsyncChain, Chain
from node.standing import EscrowStanding
from node.wallet import Wallet
from protocol.agreement import AgreementTerms, sign_consent, sign_receipt
from protocol.identity import PeerKey
from protocol.messages import Binding
from protocol.offerbook import OfferBook
from protocol.params import Params
from protocol.query import TIER_PROVEN, rank_tier
from protocol.samples import GPU_MODELS, make_offer, make_provider
from protocol.standing import EscrowEvent, EscrowLedger, Standing

pytestmark = pytest.mark.skipif(
    find_anvil() is None,
    reason="anvil not installed: npm install --prefix .anvil @foundry-rs/anvil-linux-amd64@1.7.1 "
           "or set GPUMARKET_ANVIL to the binary")

ZERO = b"\0" * 20
NOW_MS = 1_800_000_000_000


def _wallet(name: str, anvil) -> Wallet:
    w = Wallet.from_key(keccak(b"standing " + name.encode()))
    anvil.fund(w.address, 10**21)
    return w


def _rent(chain: Chain, provider: Wallet, renter: Wallet, minter: Wallet, *, acked: int = 60,
          arbiter: Wallet | None = None, tag: bytes = b"") -> tuple[AgreementTerms, int]:
    """One agreement opened by `renter` and claimed by `provider` for `acked` seconds; returns
    the terms and the gas both transactions used."""
    t = AgreementTerms(provider=provider.address, renter=renter.address,
                       token=chain.token_address, price_per_second=1_000, max_seconds=3_600,
                       heartbeat_interval=30, grace=600,
                       arbiter=arbiter.address if arbiter else ZERO,
                       dispute_window=300 if arbiter else 0,
                       details_hash=keccak(b"standing" + tag + renter.address),
                       open_by=chain.now_s() + 120)
    chain.fund(renter.address, token_units=t.deposit, minter_key=minter.key)
    opened = chain.open(renter.key, t, sign_consent(provider.key, chain.domain, t))
    claimed = chain.claim(provider.key, t, acked,
                          sign_receipt(renter.key, chain.domain, t.agreement_id(), acked))
    return t, opened.gas_used + claimed.gas_used


@pytest.fixture(scope="module")
def market():
    """One anvil with: P paid by two renters (proven); S paid by one renter in the market's
    token and by another in a token S minted itself (not proven); L paid by two renters but
    cut by an arbiter once (not proven); O only opened, never settled."""
    with AnvilProcess() as anvil:
        w = {n: _wallet(n, anvil) for n in ("deployer", "P", "S", "L", "O", "r1", "r2", "r3", "arb")}
        base = Chain.connect(anvil.url, chain_id=anvil.chain_id)
        escrow, token = base.deploy_local_market(w["deployer"].key)
        chain = Chain.connect(anvil.url, escrow=escrow, token=token)
        start = chain.w3.eth.block_number
        gas = []
        gas.append(_rent(chain, w["P"], w["r1"], w["deployer"])[1])
        gas.append(_rent(chain, w["P"], w["r2"], w["deployer"])[1])
        _rent(chain, w["S"], w["r1"], w["deployer"], tag=b"s")
        junk_token = base.deploy("TestToken", w["S"].key, "JUNK", 6)  # the attacker's own token
        junk = Chain.connect(anvil.url, escrow=escrow, token=junk_token)
        _rent(junk, w["S"], w["r3"], w["S"], tag=b"junk")
        _rent(chain, w["L"], w["r1"], w["deployer"], tag=b"l")
        t, _ = _rent(chain, w["L"], w["r2"], w["deployer"], arbiter=w["arb"], tag=b"l2")
        chain.dispute(w["r2"].key, t)
        chain.arbitrate(w["arb"].key, t, 10_000)  # claimed 60,000: the arbiter cut it
        t = AgreementTerms(provider=w["O"].address, renter=w["r3"].address, token=token,
                           price_per_second=1_000, max_seconds=3_600, heartbeat_interval=30,
                           grace=600, arbiter=ZERO, dispute_window=0,
                           details_hash=keccak(b"only opened"), open_by=chain.now_s() + 120)
        chain.fund(w["r3"].address, token_units=t.deposit, minter_key=w["deployer"].key)
        chain.open(w["r3"].key, t, sign_consent(w["O"].key, chain.domain, t))
        yield anvil, chain, w, start, gas


def _follow(chain: Chain, params: Params, from_block: int, chunk: int,
            book: OfferBook | None = None) -> EscrowStanding:
    standing = EscrowStanding(AsyncChain(chain), params, chain.token_address,
                              from_block=from_block, chunk_blocks=chunk)
    standing.book = book

    async def main():
        await standing.catch_up()

    trio.run(main)
    return standing


def test_standing__escrow_events_from_anvil_give_each_wallet_its_paid_history(market):
    _, chain, w, start, gas = market
    params = Params()
    standing = _follow(chain, params, start, chunk=3)  # several eth_getLogs chunks
    assert standing.next_block == chain.w3.eth.block_number + 1
    assert standing.standing(w["P"].address) == Standing(settled=2, renters=2, lost=0, paid=120_000)
    assert standing.proven(w["P"].address)
    # S: one payout in the market's token; the one in its own token does not count
    assert standing.standing(w["S"].address) == Standing(settled=1, renters=1, lost=0, paid=60_000)
    assert not standing.proven(w["S"].address)
    # L: two renters, but an arbiter cut one claim: one lost dispute per 2 paid agreements
    assert standing.standing(w["L"].address) == Standing(settled=2, renters=2, lost=1, paid=70_000)
    assert not standing.proven(w["L"].address)
    assert standing.standing(w["O"].address) == Standing()  # opened, never paid
    assert standing.ledger.open_agreements == 1
    assert standing.ledger.ignored == 1  # the junk-token claim
    # What one fake rental costs a Sybil: an open (with the token's approve) and a claim
    print(f"gas per settled agreement (approve + open + claim): {gas}")
    assert all(g > 100_000 for g in gas)


def test_standing__a_scan_that_starts_after_the_opens_does_not_count_their_payouts(market):
    _, chain, w, start, _ = market
    # Starting mid-history: payouts of agreements opened before the scan are not attributed
    # (the Claimed event does not name the provider); nothing crashes, they are counted ignored.
    standing = _follow(chain, Params(), start + 8, chunk=10_000)
    assert standing.ledger.ignored >= 1
    assert not standing.proven(w["P"].address)


def _offer(peer: PeerKey, binding: Binding, chain: Chain, price: int, rng: random.Random) -> bytes:
    return make_offer(peer, binding, rng, NOW_MS, seq=1, model=GPU_MODELS[0], gpu_count=1,
                      price_per_gpu_second=price, escrow=chain.escrow_address,
                      token=chain.token_address).encode()


def test_standing__fresh_renter_ranks_the_paid_provider_above_a_cheaper_sybil_flood(market):
    """A fresh renter's book (nothing established, no reputation of its own) holds one honest
    offer whose wallet two renters paid on the escrow, and 300 cheaper valid Sybil offers: 280
    from fresh keys and wallets, 20 from keys bound to S (paid once, and once in its own token)
    or L (paid by two renters, a dispute lost). Before the standing signal the honest offer was
    below every Sybil; now it ranks first, and it alone is in the proven tier."""
    _, chain, w, start, _ = market
    params = Params()
    rng = random.Random(7)
    book = OfferBook(params, chain_ids=frozenset({chain.chain_id}))
    standing = _follow(chain, params, start, chunk=10_000, book=book)
    book.proven_of = standing.proven
    honest_peer = PeerKey(rng.randbytes(32))
    honest = _offer(honest_peer, Binding.create(honest_peer, w["P"].key, chain.chain_id), chain,
                    900, rng)
    book.ingest_offer(honest, NOW_MS)
    for n in range(300):
        if n < 20:  # Sybil keys bound to wallets with some history, not proven
            peer = PeerKey(rng.randbytes(32))
            owner = w["S"] if n % 2 else w["L"]
            binding = Binding.create(peer, owner.key, chain.chain_id)
        else:
            peer, _, binding = make_provider(rng, chain.chain_id)
        book.ingest_offer(_offer(peer, binding, chain, rng.randint(1, 899), rng), NOW_MS + n)
    now = NOW_MS + 1_000
    top = book.query("gpu=RTX_4090", "rank", 32, now_ms=now)
    assert top[0].provider == honest_peer.public
    assert [e.provider for e in book.query("gpu=RTX_4090", "price", 32)].count(
        honest_peer.public) == 0  # by price alone the flood buries it
    cutoff = now - params.book_established_ms
    tiers = [rank_tier(e.score, e.since_ms, cutoff, e.proven) for e in top]
    assert tiers.count(TIER_PROVEN) == 1


def test_standing__the_book_follows_standing_that_arrives_after_the_offers(market):
    """The scan reaches the payouts after the offers are in the book (a node that just
    started): restand() moves the offer into the proven tier; a second key of the same wallet
    does not get a second place there."""
    _, chain, w, start, _ = market
    params = Params()
    rng = random.Random(8)
    book = OfferBook(params, chain_ids=frozenset({chain.chain_id}))
    standing = EscrowStanding(AsyncChain(chain), params, chain.token_address, from_block=start)
    book.proven_of = standing.proven
    standing.book = book
    keys = [PeerKey(rng.randbytes(32)) for _ in range(2)]
    for i, k in enumerate(keys):
        book.ingest_offer(_offer(k, Binding.create(k, w["P"].key, chain.chain_id), chain,
                                 500 + i, rng), NOW_MS + i)
    for _ in range(50):
        peer, _, binding = make_provider(rng, chain.chain_id)
        book.ingest_offer(_offer(peer, binding, chain, 100, rng), NOW_MS)
    assert not any(e.proven for e in book)

    async def main():
        await standing.catch_up()

    trio.run(main)
    assert [e.provider for e in book if e.proven] == [keys[0].public]  # first seen of its wallet
    top = book.query("", "rank", 3, now_ms=NOW_MS + 10)
    assert top[0].provider == keys[0].public
    assert top[1].provider != keys[1].public  # the second key ranks among the new, by price


def test_standing__ledger_bounds_hold_under_a_flood_of_opens():
    """Opened events cost gas each, but the ledger's memory must not depend on that."""
    token = b"\x70" * 20
    ledger = EscrowLedger(token, max_open=100, max_providers=10)
    for i in range(1_000):
        aid = i.to_bytes(32, "big")
        ledger.apply(EscrowEvent("Opened", aid, {"token": token, "provider": bytes([i % 50]) * 20,
                                                 "renter": bytes([200 + i % 3]) * 20}))
    assert ledger.open_agreements == 100 and ledger.dropped_open == 900
    for i in range(900, 1_000):  # the 100 still open get paid: 50 providers, table holds 10
        ledger.apply(EscrowEvent("Claimed", i.to_bytes(32, "big"),
                                 {"provider_amount": 5, "renter_amount": 0, "settled": True,
                                  "acked_seconds": 5}))
    assert len(ledger) == 10
    assert ledger.open_agreements == 0
