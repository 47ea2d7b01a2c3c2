"""Offer and withdrawal validation: each tagged check, with its verdict and reason code."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import IGNORE, REJECT, RemoteProtocolError
from protocol.identity import PeerKey
from protocol.messages import Binding, OfferWithdrawal, digest
from protocol.params import Params
from protocol.samples import make_offer, make_provider
from protocol.validation import BindingCache, validate_offer, validate_withdrawal

NOW = 1_700_000_000_000
PARAMS = Params()
PEER, WALLET, BINDING = make_provider(random.Random(11))


def offer(**kw):
    return make_offer(PEER, BINDING, random.Random(2), kw.pop("now", NOW), **kw)


def resign(o, **changes):
    return dataclasses.replace(o, **changes).sign(PEER)


def verdict(data, now=NOW, **kw):
    with pytest.raises(RemoteProtocolError) as err:
        validate_offer(data, now, PARAMS, BindingCache(10), **kw)
    return err.value.verdict, err.value.code


def test_validate_offer__accepts_a_good_offer():
    o = offer(gpu_count=2)
    got, d = validate_offer(o.encode(), NOW, PARAMS, BindingCache(10))
    assert got == o and d == digest(o.encode())


def test_validate_offer__reject_bad_signature():
    o = offer()
    forged = dataclasses.replace(o, seq=o.seq + 1)  # not re-signed
    assert verdict(forged.encode()) == (REJECT, "bad_signature")


def test_validate_offer__reject_signature_by_another_key():
    other = PeerKey(b"\x44" * 32)
    o = dataclasses.replace(offer(), seq=9).sign(other)
    assert verdict(o.encode()) == (REJECT, "bad_signature")


def test_validate_offer__reject_binding_for_another_peer():
    rng = random.Random(5)
    other = PeerKey(rng.randbytes(32))
    o = resign(offer(), binding=Binding.create(other, WALLET, BINDING.chain_id))
    assert verdict(o.encode()) == (REJECT, "binding_peer_mismatch")


def test_validate_offer__reject_binding_for_another_chain():
    o = offer()
    o = resign(o, terms=dataclasses.replace(o.terms, chain_id=o.terms.chain_id + 1))
    assert verdict(o.encode()) == (REJECT, "binding_chain_mismatch")


def test_validate_offer__reject_forged_wallet_binding():
    o = offer()
    bad = dataclasses.replace(o.binding, wallet=b"\x12" * 20)
    # the peer re-signs the wallet claim, but the wallet never signed this peer key
    bad = dataclasses.replace(bad, peer_sig=PEER.sign(Binding.DOMAIN, Binding._peer_payload(
        bad.peer_key, bad.wallet, bad.chain_id)))
    assert verdict(resign(o, binding=bad).encode()) == (REJECT, "binding_wallet_mismatch")


@pytest.mark.parametrize("change, code", [
    (lambda o: {"gpus": ()}, "no_gpus"),
    (lambda o: {"gpus": (o.gpus[0], o.gpus[0])}, "duplicate_gpu"),
    (lambda o: {"gpus": (dataclasses.replace(o.gpus[0], vram_mib=0),)}, "bad_gpu"),
    (lambda o: {"expires_ms": o.created_ms}, "bad_lifetime"),
    (lambda o: {"expires_ms": o.created_ms + 10 * 3_600_000}, "bad_lifetime"),
    (lambda o: {"terms": dataclasses.replace(o.terms, price_per_gpu_second=0)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, min_duration_s=10**6, max_duration_s=10)},
     "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, heartbeat_interval_s=1)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, grace_s=1)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, escrow=b"\x00" * 20)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, dispute_window_s=60)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, price_per_gpu_second=2**250)}, "bad_terms"),
    (lambda o: {"host": dataclasses.replace(o.host, cpu_cores=0)}, "bad_host"),
    # the escrow's bounds (issue 12): grace in [300 s, 7 days], dispute window likewise, and an
    # arbiter who is the provider's own wallet
    (lambda o: {"terms": dataclasses.replace(o.terms, grace_s=299)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, grace_s=604_801)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, grace_s=2**32 - 1)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, arbiter=b"\xab" * 20, dispute_window_s=299)},
     "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, arbiter=b"\xab" * 20,
                                             dispute_window_s=604_801)}, "bad_terms"),
    (lambda o: {"terms": dataclasses.replace(o.terms, arbiter=o.binding.wallet,
                                             dispute_window_s=3_600)}, "bad_terms"),
])
def test_validate_offer__reject_impossible_values(change, code):
    o = offer(gpu_count=1)
    assert verdict(resign(o, **change(o)).encode()) == (REJECT, code)


def test_validate_offer__ignore_expired_beyond_skew():
    o = offer()
    assert verdict(o.encode(), now=o.expires_ms + PARAMS.clock_skew_ms + 1) == (IGNORE, "expired")
    validate_offer(o.encode(), o.expires_ms + PARAMS.clock_skew_ms, PARAMS, BindingCache(1))


def test_validate_offer__ignore_from_future_beyond_skew():
    o = offer()
    assert verdict(o.encode(), now=NOW - PARAMS.clock_skew_ms - 1) == (IGNORE, "from_future")
    validate_offer(o.encode(), NOW - PARAMS.clock_skew_ms, PARAMS, BindingCache(1))


def test_validate_offer__ignore_stale_and_duplicate_reject_equivocation():
    o = offer(seq=5)
    data = o.encode()
    assert verdict(data, known_seq=6, known_digest=b"x" * 32) == (IGNORE, "stale_seq")
    assert verdict(data, known_seq=5, known_digest=digest(data)) == (IGNORE, "duplicate")
    assert verdict(data, known_seq=5, known_digest=b"y" * 32) == (REJECT, "equivocation")
    assert verdict(data, withdrawn_seq=5) == (IGNORE, "withdrawn")


def test_validate_offer__ignore_other_chains_when_restricted():
    data = offer().encode()
    assert verdict(data, chain_ids=frozenset({1})) == (IGNORE, "wrong_chain")


def test_validate_offer__binding_checked_once_then_cached():
    cache = BindingCache(10)
    validate_offer(offer(seq=1).encode(), NOW, PARAMS, cache)
    validate_offer(offer(seq=2).encode(), NOW, PARAMS, cache)
    assert len(cache) == 1


def test_binding_cache__bounded():
    cache = BindingCache(3)
    rng = random.Random(9)
    for _ in range(5):
        cache.verify(Binding.create(PeerKey(rng.randbytes(32)), rng.randbytes(32), 5))
    assert len(cache) == 3


def test_validate_withdrawal__checks():
    w = OfferWithdrawal(PEER.public, 4, NOW).sign(PEER)
    assert validate_withdrawal(w.encode(), NOW, PARAMS) == w
    with pytest.raises(RemoteProtocolError) as err:
        validate_withdrawal(w.encode(), NOW, PARAMS, withdrawn_seq=4)
    assert (err.value.verdict, err.value.code) == (IGNORE, "duplicate")
    forged = dataclasses.replace(w, seq=5)
    with pytest.raises(RemoteProtocolError) as err:
        validate_withdrawal(forged.encode(), NOW, PARAMS)
    assert (err.value.verdict, err.value.code) == (REJECT, "bad_signature")
    with pytest.raises(RemoteProtocolError) as err:
        validate_withdrawal(w.encode(), NOW + 3 * 3_600_000, PARAMS)
    assert err.value.code == "expired"


GOOD = offer(gpu_count=2).encode()


@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
@settings(max_examples=400, deadline=None)
def test_validate_offer__any_single_byte_change_rejected(pos, flip):
    data = GOOD[:pos] + bytes([GOOD[pos] ^ flip]) + GOOD[pos + 1:]
    with pytest.raises(RemoteProtocolError):
        validate_offer(data, NOW, PARAMS, BindingCache(10))


def test_validate_offer__reject_addresses_of_another_host():
    from protocol.identity import peer_id_from_public_key

    mine = f"/ip4/203.0.113.7/tcp/4001/p2p/{peer_id_from_public_key(PEER.public)}"
    good = resign(offer(), addrs=(mine,))
    validate_offer(good.encode(), NOW, PARAMS, BindingCache(10))
    other = PeerKey(b"\x45" * 32)
    steering = f"/ip4/198.51.100.9/tcp/80/p2p/{peer_id_from_public_key(other.public)}"
    assert verdict(resign(offer(), addrs=(mine, steering)).encode()) == (REJECT, "bad_addrs")
    assert verdict(resign(offer(), addrs=("not a multiaddr",)).encode()) == (REJECT, "bad_addrs")


@pytest.mark.parametrize("grace, window", [(300, 300), (604_800, 604_800), (600, 3_600)])
def test_validate_offer__grace_and_dispute_window_bounds_are_inclusive(grace, window):
    o = offer(gpu_count=1)
    terms = dataclasses.replace(o.terms, grace_s=grace, arbiter=b"\xab" * 20, dispute_window_s=window)
    validate_offer(resign(o, terms=terms).encode(), NOW, PARAMS, BindingCache(1))


def test_validate_offer__bounds_come_from_params():
    o = offer(gpu_count=1)
    data = resign(o, terms=dataclasses.replace(o.terms, grace_s=60)).encode()
    assert verdict(data) == (REJECT, "bad_terms")
    validate_offer(data, NOW, PARAMS.replace(min_grace_s=30), BindingCache(1))
