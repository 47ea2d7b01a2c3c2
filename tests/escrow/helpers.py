"""Helpers shared by the escrow contract tests (titanoboa on py-evm)."""

from __future__ import annotations

import functools
import os
import pathlib
from dataclasses import replace

import boa
from eth_utils import keccak

from protocol.agreement import AgreementTerms, EscrowDomain, sign_consent, sign_receipt
from protocol.eth import ZERO_ADDRESS, private_key_address

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "node" / "contracts"
HOSTILE = pathlib.Path(__file__).resolve().parent / "contracts"
ZERO = "0x" + "00" * 20
ARBITRATION_TIMEOUT = 14 * 24 * 3600

# Deterministic wallets: the keys are what sign consents and receipts.
KEYS = {name: keccak(f"gpumarket escrow test {name}".encode()) for name in
        ("provider", "renter", "arbiter", "outsider", "provider2", "renter2")}
ADDR = {name: private_key_address(key) for name, key in KEYS.items()}


def hexaddr(raw: bytes) -> str:
    return "0x" + raw.hex()


def raw(addr) -> bytes:
    return bytes.fromhex(str(addr)[2:])


@functools.cache
def deployer(path: str):
    """Compile once per test session; deploy as often as needed."""
    return boa.load_partial(path)


# Another escrow source to run these tests against (e.g. the pre-fix contract, to see the
# regression tests fail there); default: the committed contract.
ESCROW_SOURCE = os.environ.get("GPUMARKET_ESCROW_SOURCE") or str(CONTRACTS / "Escrow.vy")


def deploy_escrow():
    return deployer(ESCROW_SOURCE).deploy()


def deploy_token():
    return deployer(str(CONTRACTS / "TestToken.vy")).deploy("tUSDC", 6)


def deploy_hostile(name: str, *args):
    return deployer(str(HOSTILE / f"{name}.vy")).deploy(*args)


def domain_of(escrow) -> EscrowDomain:
    return EscrowDomain(boa.env.evm.patch.chain_id, raw(escrow.address))


MIN_GRACE = 300  # the contract's bounds (Escrow.vy constants)
MAX_GRACE = 7 * 24 * 3600
MIN_DISPUTE_WINDOW = 300
MAX_DISPUTE_WINDOW = 7 * 24 * 3600
OPEN_HOLD = 120  # make_terms' default open_by: this long after the current block time


def now() -> int:
    return boa.env.evm.patch.timestamp


def make_terms(*, token=ZERO_ADDRESS, price=10**12, max_seconds=3_600, grace=600,
               arbiter=ZERO_ADDRESS, window=0, provider="provider", renter="renter",
               salt: bytes = b"", open_by: int | None = None) -> AgreementTerms:
    return AgreementTerms(
        provider=ADDR[provider], renter=ADDR[renter], token=token if isinstance(token, bytes) else raw(token.address),
        price_per_second=price, max_seconds=max_seconds, heartbeat_interval=30, grace=grace,
        arbiter=arbiter, dispute_window=window, details_hash=keccak(b"details" + salt),
        open_by=now() + OPEN_HOLD if open_by is None else open_by,
    )


def with_arbiter(terms: AgreementTerms, window: int = 3_600) -> AgreementTerms:
    return replace(terms, arbiter=ADDR["arbiter"], dispute_window=window)


def consent(escrow, terms: AgreementTerms, key: bytes | None = None) -> bytes:
    return sign_consent(key or KEYS_BY_ADDR[terms.provider], domain_of(escrow), terms)


def receipt(escrow, terms: AgreementTerms, acked: int, key: bytes | None = None) -> bytes:
    return sign_receipt(key or KEYS_BY_ADDR[terms.renter], domain_of(escrow), terms.agreement_id(), acked)


KEYS_BY_ADDR = {ADDR[name]: key for name, key in KEYS.items()}


def fund(amount: int = 10**24) -> None:
    for a in ADDR.values():
        boa.env.set_balance(hexaddr(a), amount)


def open_agreement(escrow, terms: AgreementTerms, token=None) -> None:
    """Open `terms` as the renter (minting and approving first for a token deposit)."""
    sig = consent(escrow, terms)
    if terms.token == ZERO_ADDRESS:
        with boa.env.prank(hexaddr(terms.renter)):
            escrow.open(tup(terms), sig, value=terms.deposit)
    else:
        assert token is not None
        token.mint(hexaddr(terms.renter), terms.deposit)
        with boa.env.prank(hexaddr(terms.renter)):
            token.approve(escrow.address, terms.deposit)
            escrow.open(tup(terms), sig)


def claim(escrow, terms: AgreementTerms, acked: int, sig: bytes | None = None) -> None:
    sig = receipt(escrow, terms, acked) if sig is None else sig
    with boa.env.prank(hexaddr(terms.provider)):
        escrow.claim(tup(terms), acked, sig)


def balance(token, who) -> int:
    who = hexaddr(who) if isinstance(who, bytes) else who
    if token is None:
        return boa.env.get_balance(who)
    return token.balanceOf(who)


def state(escrow, terms: AgreementTerms) -> tuple[int, int, int, int]:
    return tuple(escrow.status(terms.agreement_id()))




def tup(terms: AgreementTerms) -> tuple:
    """The terms as boa wants them for the `Terms` struct (addresses as 0x strings)."""
    return tuple(hexaddr(v) if isinstance(v, bytes) and len(v) == 20 else v
                 for v in terms.as_tuple())


def unchecked(terms: AgreementTerms, **changes) -> AgreementTerms:
    """`terms` with fields changed past AgreementTerms' own checks (which refuse, e.g., an
    arbiter who is a party): what a hostile client could send, to test the contract's checks."""
    out = replace(terms)
    for name, value in changes.items():
        object.__setattr__(out, name, value)
    return out
