"""Token behaviours the escrow supports, and tokens a renter refuses outright.

The escrow (specs/escrow.md, "Tokens") counts a deposit by its own balance rising by exactly the
deposit and a payout by its balance falling by exactly the amount, whatever the token returns.
So it supports standard ERC-20s, tokens that return nothing (USDT), pausing and blocklisting
tokens (a refused payout becomes a credit). It does not support:

- fee-on-transfer tokens: refused by the contract at open (less than the deposit arrives);
- rebasing tokens (balances change without transfers): a downward rebase leaves the escrow
  short of the deposits it holds, an upward one leaves the surplus stranded. The contract
  cannot tell a rebase from a deposit, so the renter refuses the known ones here.

REFUSED_TOKENS is a short, explicit list of well-known tokens of these kinds (by chain id and
address), not a registry: a renter trades only in tokens it chose (its offers' token), and this
list catches the known mistakes before any negotiation.
"""

from __future__ import annotations

REBASING = "rebasing token (balances change without transfers): not supported by the escrow"
FEE_ON_TRANSFER = "fee-on-transfer token: the escrow refuses the deposit"

REFUSED_TOKENS: dict[tuple[int, bytes], str] = {
    # Ethereum mainnet (chain id 1)
    (1, bytes.fromhex("ae7ab96520de3a18e5e111b5eaab095312d7fe84")): REBASING,  # Lido stETH
    (1, bytes.fromhex("d46ba6d942050d489dbd938a2c909a5d5039a161")): REBASING,  # Ampleforth AMPL
    (1, bytes.fromhex("45804880de22913dafe09f4980848ece6ecbaf78")): FEE_ON_TRANSFER,  # Paxos Gold PAXG
}


def refused_token(chain_id: int, token: bytes) -> str | None:
    """Why the escrow cannot hold `token` on `chain_id`, when it is a known refused token."""
    return REFUSED_TOKENS.get((chain_id, token))
