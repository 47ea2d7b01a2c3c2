"""The escrow at one address on every EVM chain (specs/escrow.md, "Deployment").

The escrow is deployed through the widely used deterministic deployment proxy (Arachnid's
CREATE2 factory at 0x4e59b448...956c): the proxy's own deployment is a presigned transaction
with no chain id (pre-EIP-155) from a one-time signer whose key nobody holds, so the proxy has
the same address wherever that transaction is sent. The proxy deploys the escrow's init code
with CREATE2 and a fixed salt, so the escrow's address follows from its init code alone
(`escrow_address()`): every node computes it, nobody registers it.

A chain without the proxy gets it by funding the signer with exactly the transaction's cost and
broadcasting the transaction (anvil ships the proxy already; the embedded chain does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from protocol.eth import keccak as keccak256

# The deterministic deployment proxy (github.com/Arachnid/deterministic-deployment-proxy): its
# presigned deployment transaction (nonce 0, gas price 100 gwei, gas 100000, v = 27) and what
# follows from it. tests/chain/test_deterministic.py checks that these agree: the signer
# recovered from the transaction, the address its nonce-0 creation gets, the code it deploys.
PROXY_DEPLOYMENT_TX = bytes.fromhex(
    "f8a58085174876e800830186a08080b853604580600e600039806000f350fe7fffffffffffffffffffffffffff"
    "ffffffffffffffffffffffffffffffffffffe03601600081602082378035828234f58015156039578182fd5b80"
    "82525050506014600cf31ba02222222222222222222222222222222222222222222222222222222222222222a0"
    "2222222222222222222222222222222222222222222222222222222222222222")
PROXY_SIGNER = bytes.fromhex("3fab184622dc19b6109349b94811493bf2a45362")
PROXY_ADDRESS = bytes.fromhex("4e59b44847b379578588920ca78fbf26c0b4956c")
PROXY_DEPLOYMENT_COST_WEI = 100 * 10**9 * 100_000  # gas price x gas limit of the transaction

# The escrow's CREATE2 salt: fixed, so the address depends on the init code alone.
ESCROW_SALT = keccak256(b"gpumarket escrow")


def create2_address(deployer: bytes, salt: bytes, init_code: bytes) -> bytes:
    """EIP-1014: keccak256(0xff ++ deployer ++ salt ++ keccak256(init_code))[12:]."""
    return keccak256(b"\xff" + deployer + salt + keccak256(init_code))[12:]


def escrow_init_code() -> bytes:
    from .contracts import load

    return bytes.fromhex(load("Escrow")["bytecode"].removeprefix("0x"))


@cache
def escrow_address() -> bytes:
    """Where the escrow of this package's version lives on every chain."""
    return create2_address(PROXY_ADDRESS, ESCROW_SALT, escrow_init_code())


@dataclass(frozen=True)
class Deployment:
    address: bytes
    deployed: bool  # False: it was there already (nothing sent)
    gas_used: int  # the escrow's deployment (0 when it was there)
    proxy_deployed: bool  # the proxy had to be deployed first


def ensure_proxy(chain, funder_key: bytes | None = None) -> bool:
    """Deploy the proxy where it is missing; True if it was deployed now. The signer is funded
    with the transaction's cost from `funder_key` (or a dev account of a local chain)."""
    from eth_account import Account

    from .chain import ChainError, _cs

    w3 = chain.w3
    if w3.eth.get_code(_cs(PROXY_ADDRESS)):
        return False
    need = PROXY_DEPLOYMENT_COST_WEI - int(w3.eth.get_balance(_cs(PROXY_SIGNER)))
    if need > 0:
        if funder_key is not None:
            sender = Account.from_key(funder_key).address
            tx = {"from": sender, "to": _cs(PROXY_SIGNER), "value": need, "gas": 21000,
                  "nonce": w3.eth.get_transaction_count(sender, "pending"), "chainId": chain.chain_id,
                  **chain._fees()}
            tx_hash = w3.eth.send_raw_transaction(Account.sign_transaction(tx, funder_key).raw_transaction)
        else:
            accounts = chain.dev_accounts()
            if not accounts:
                raise ChainError("the deployment proxy is missing and there is no key to fund its "
                                 f"signer 0x{PROXY_SIGNER.hex()} with {need} wei")
            tx_hash = w3.eth.send_transaction({"from": accounts[0], "to": _cs(PROXY_SIGNER), "value": need})
        chain._wait(tx_hash, "fund the deployment proxy's signer")
    try:
        tx_hash = w3.eth.send_raw_transaction(PROXY_DEPLOYMENT_TX)
    except Exception as exc:
        raise ChainError(f"chain {chain.chain_id} refused the deployment proxy's presigned "
                         f"transaction ({exc}); a chain that accepts only EIP-155 transactions "
                         "needs the proxy deployed by its operators") from None
    chain._wait(tx_hash, "deploy the deployment proxy")
    if not w3.eth.get_code(_cs(PROXY_ADDRESS)):
        raise ChainError("the deployment proxy's transaction was mined but no code is at "
                         f"0x{PROXY_ADDRESS.hex()}")
    return True


def deploy_escrow(chain, key: bytes) -> Deployment:
    """The escrow at `escrow_address()`: deployed where it is missing, idempotent."""
    from eth_account import Account

    from .chain import ChainError, InsufficientFundsError, _cs

    w3 = chain.w3
    address = escrow_address()
    proxy_now = ensure_proxy(chain, key)
    if w3.eth.get_code(_cs(address)):
        return Deployment(address, False, 0, proxy_now)
    sender = Account.from_key(key).address
    tx = {"from": sender, "to": _cs(PROXY_ADDRESS), "data": ESCROW_SALT + escrow_init_code(),
          "value": 0, "chainId": chain.chain_id}
    gas = int(w3.eth.estimate_gas(tx) * 1.2)
    fees = chain._fees()
    price = fees.get("maxFeePerGas", fees.get("gasPrice", 0))
    have = int(w3.eth.get_balance(sender))
    if have < gas * price:
        raise InsufficientFundsError(f"deploying the escrow needs up to {gas * price} wei of gas; "
                                     f"the wallet {sender} holds {have}")
    tx.update(fees, gas=gas, nonce=w3.eth.get_transaction_count(sender, "pending"))
    tx_hash = w3.eth.send_raw_transaction(Account.sign_transaction(tx, key).raw_transaction)
    receipt = chain._wait(tx_hash, "deploy the escrow")
    if not w3.eth.get_code(_cs(address)):
        raise ChainError(f"the escrow's deployment was mined but no code is at 0x{address.hex()}")
    return Deployment(address, True, int(receipt.gasUsed), proxy_now)


__all__ = ["PROXY_ADDRESS", "PROXY_DEPLOYMENT_TX", "PROXY_SIGNER", "ESCROW_SALT", "Deployment",
           "create2_address", "deploy_escrow", "ensure_proxy", "escrow_address", "escrow_init_code"]
