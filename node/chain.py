"""The chain client: the escrow contract (and a test stablecoin on local chains) over web3.py 8.

Sync `Web3` only: AsyncWeb3 runs on asyncio and fails under trio. `AsyncChain` calls the sync
client through `trio.to_thread.run_sync` with a `CapacityLimiter(1)`: py-evm (the embedded chain)
is not thread-safe, and one thread also serialises nonces, so every account's transactions are
numbered without gaps or reuse.

Chains: `Chain.embedded()` runs py-evm in-process (web3's EthereumTesterProvider: one process
only, the default for the demo and fast tests); `Chain.connect(url, ...)` talks to any EVM JSON-RPC
endpoint (anvil on loopback, or a public testnet) after checking the chain id and that the escrow
address holds code.

Errors a person can act on are `ChainError` subclasses with a one-line message.

Hung endpoints: an RPC endpoint that accepts the connection and never answers must not hang the
node. Every HTTP request has its own timeout (`Chain.connect(timeout_s=...)`, a few attempts:
`RPC_ATTEMPTS`), so a worker thread always ends; and `AsyncChain.run` abandons a call that runs
past its own timeout (trio's `abandon_on_cancel`) and raises `RpcUnavailableError`. The abandoned
thread keeps the one-thread limiter until its HTTP request times out, so calls made meanwhile
wait for it within their own timeouts: threads never pile up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import trio
from eth_account import Account
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.exceptions import BadFunctionCallOutput, ContractLogicError, TimeExhausted, Web3RPCError
from web3.providers.rpc.utils import ExceptionRetryConfiguration

from node.contracts import load
from protocol.agreement import AgreementTerms, EscrowDomain
from protocol.effects import EscrowCall
from protocol.eth import ZERO_ADDRESS, private_key_address
from protocol.money import MAX_TOKEN_DECIMALS, NATIVE_DECIMALS
from protocol.standing import EscrowEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_NAMES = {0: "none", 1: "open", 2: "closed", 3: "claimed", 4: "disputed", 5: "final"}
EVENT_NAMES = ("Opened", "Closed", "Claimed", "Disputed", "Arbitrated", "Finalized", "Recovered",
               "Credited", "Withdrawn")
GAS_HEADROOM = 1.25  # estimate * this: state can change between estimate and inclusion
PRIORITY_FEE_WEI = 1_000_000_000  # 1 gwei tip where the chain has EIP-1559 fees
RPC_ATTEMPTS = 3  # tries per read-only JSON-RPC request (web3's retry list) before it fails


class ChainError(Exception):
    """Something about the chain a person can act on; str() is one line."""


class WrongChainError(ChainError):
    """The endpoint serves another chain than the configured one."""


class NoContractError(ChainError):
    """No contract code at the configured escrow (or token) address."""


class InsufficientFundsError(ChainError):
    """The wallet cannot pay the deposit or the gas."""


class InsufficientAllowanceError(ChainError):
    """The escrow may not move enough of the renter's tokens (approve first)."""


class RevertedError(ChainError):
    """The contract refused the call; `reason` is its revert string."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"escrow.{method} reverted: {reason}")
        self.method = method
        self.reason = reason


class RpcUnavailableError(ChainError):
    """The RPC endpoint does not answer."""


@dataclass(frozen=True)
class EscrowStatus:
    state: str
    end_s: int
    acked_seconds: int
    since_s: int


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    block: int
    timestamp: int  # block time, seconds
    gas_used: int
    events: tuple[tuple[str, dict[str, Any]], ...]


@dataclass(frozen=True)
class ChainEvent:
    name: str
    agreement_id: bytes | None
    args: dict[str, Any]
    block: int
    tx_hash: str


def _cs(address: bytes) -> str:
    return Web3.to_checksum_address(address)


def _revert_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("execution reverted: ", "revert: ", "reverted: "):
        if marker in text:
            reason = text.split(marker, 1)[1]
            # anvil's error reads "('execution reverted: REASON', '0x08c379a0...')"
            return reason.split("', ", 1)[0].strip("'\" )")
    return text


class Chain:
    """Synchronous access to one chain and one escrow deployment. Use from one thread."""

    def __init__(self, w3: Web3, *, escrow: bytes | None = None, token: bytes | None = None,
                 tester: Any = None) -> None:
        self.w3 = w3
        self.tester = tester  # eth_tester.EthereumTester on the embedded chain, else None
        try:
            self.chain_id = w3.eth.chain_id
        except Exception as exc:
            raise RpcUnavailableError(f"the RPC endpoint does not answer: {_why(exc)}") from None
        self._escrow_abi = load("Escrow")["abi"]
        self._token_abi = load("TestToken")["abi"]
        self.escrow = None
        self.token = None
        self._topics: dict[bytes, Any] | None = None  # escrow event topic0 -> event (decoder)
        self._decimals: dict[bytes, int] = {ZERO_ADDRESS: NATIVE_DECIMALS}  # token -> decimals()
        if escrow is not None:
            self.use_escrow(escrow)
        if token is not None:
            self.use_token(token)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def embedded(cls) -> "Chain":
        """A fresh in-process EVM (py-evm) with prefunded dev accounts."""
        provider = EthereumTesterProvider()
        return cls(Web3(provider), tester=provider.ethereum_tester)

    @classmethod
    def connect(cls, url: str, *, chain_id: int | None = None, escrow: bytes | None = None,
                token: bytes | None = None, timeout_s: float = 10.0) -> "Chain":
        """An EVM JSON-RPC endpoint; checks the chain id and the contracts' code.

        `timeout_s` bounds each HTTP request (connecting, and each wait for response bytes);
        web3 retries read-only requests, so one of them gives up after at most
        `RPC_ATTEMPTS * timeout_s` plus under a second of back-off."""
        w3 = Web3(HTTPProvider(
            url, request_kwargs={"timeout": timeout_s}, cache_allowed_requests=True,
            exception_retry_configuration=ExceptionRetryConfiguration(
                errors=(requests.ConnectionError, requests.HTTPError, requests.Timeout),
                retries=RPC_ATTEMPTS, backoff_factor=0.125)))
        chain = cls(w3)
        if chain_id is not None and chain.chain_id != chain_id:
            raise WrongChainError(
                f"{url} serves chain {chain.chain_id}, but the configuration says {chain_id}")
        if escrow is not None:
            chain.use_escrow(escrow)
        if token is not None:
            chain.use_token(token)
        return chain

    def use_escrow(self, address: bytes) -> None:
        if not self.w3.eth.get_code(_cs(address)):
            raise NoContractError(
                f"no escrow contract at 0x{address.hex()} on chain {self.chain_id}")
        self.escrow = self.w3.eth.contract(address=_cs(address), abi=self._escrow_abi)
        self._topics = None

    def use_token(self, address: bytes) -> None:
        if not self.w3.eth.get_code(_cs(address)):
            raise NoContractError(f"no token contract at 0x{address.hex()} on chain {self.chain_id}")
        self.token = self.w3.eth.contract(address=_cs(address), abi=self._token_abi)

    @property
    def escrow_address(self) -> bytes:
        self._need_escrow()
        return bytes.fromhex(self.escrow.address[2:])

    @property
    def token_address(self) -> bytes:
        return bytes.fromhex(self.token.address[2:]) if self.token is not None else ZERO_ADDRESS

    @property
    def domain(self) -> EscrowDomain:
        return EscrowDomain(self.chain_id, self.escrow_address)

    # -- local chains: accounts, deployment, funding ------------------------------------------

    def dev_keys(self) -> list[bytes]:
        """Private keys of the embedded chain's prefunded dev accounts (tests and demos)."""
        if self.tester is None:
            raise ChainError("dev keys exist only on the embedded chain")
        return [k.to_bytes() if hasattr(k, "to_bytes") else bytes(k)
                for k in self.tester.backend.account_keys]

    def lead_s(self) -> float:
        """How far the latest block's time runs ahead of this machine's clock, plus one second.
        eth-tester stamps a burst of blocks one second apart, ahead of the wall clock; rentals
        time themselves by both, so callers sleep this long after a burst of setup blocks."""
        return max(0.0, self.now_s() + 1 - time.time())

    def dev_accounts(self) -> list[str]:
        """Prefunded, unlocked accounts of a local chain (eth-tester or anvil)."""
        return list(self.w3.eth.accounts)

    def deploy(self, name: str, key: bytes, *args: Any) -> bytes:
        art = load(name)
        contract = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        receipt = self._send(key, contract.constructor(*args), method=f"deploy {name}")
        return bytes.fromhex(receipt.contractAddress[2:])

    def deploy_local_market(self, key: bytes, *, symbol: str = "tUSDC", decimals: int | None = 6,
                            deterministic: bool = False) -> tuple[bytes, bytes]:
        """Deploy the escrow and a test token (`symbol`, `decimals`; decimals=None: no token,
        offers are priced in the native coin); use them. Returns their addresses (the token's
        is ZERO_ADDRESS for the native coin). `deterministic`: the escrow at its computed
        address through the deployment proxy (node/deterministic.py; reused when there)."""
        if deterministic:
            from .deterministic import deploy_escrow

            escrow = deploy_escrow(self, key).address
        else:
            escrow = self.deploy("Escrow", key)
        self.use_escrow(escrow)
        if decimals is None:
            self.token = None
            return escrow, ZERO_ADDRESS
        token = self.deploy("TestToken", key, symbol, decimals)
        self.use_token(token)
        return escrow, token

    def fund(self, address: bytes, *, native_wei: int = 0, token_units: int = 0,
             minter_key: bytes | None = None) -> None:
        """Local chains only: native coin from a dev account, test tokens by minting."""
        if native_wei:
            source = self.dev_accounts()[0]
            tx = self.w3.eth.send_transaction({"from": source, "to": _cs(address), "value": native_wei})
            self._wait(tx, "fund")
        if token_units:
            if minter_key is None:
                raise ChainError("minting test tokens needs a funded key")
            self._send(minter_key, self._need_token().functions.mint(_cs(address), token_units),
                       method="mint")

    def time_travel(self, seconds: int) -> None:
        """Local chains only: move block time forward and mine a block (tests)."""
        if self.tester is not None:
            self.tester.time_travel(self.now_s() + seconds)
            self.tester.mine_blocks(1)
            return
        try:  # anvil (and hardhat) dev RPC
            self.w3.provider.make_request("evm_increaseTime", [seconds])
            self.w3.provider.make_request("evm_mine", [])
        except Exception as exc:
            raise ChainError(f"this chain does not support time travel: {exc}") from None

    # -- reads --------------------------------------------------------------------------------

    def now_s(self) -> int:
        return int(self.w3.eth.get_block("latest").timestamp)

    def decimals(self, token: bytes) -> int:
        """The token's `decimals()` (the native coin: 18), read once per token and cached: prices
        and deposits are integers in the token's smallest unit, shown as units / 10**decimals."""
        known = self._decimals.get(token)
        if known is None:
            contract = self.w3.eth.contract(address=_cs(token), abi=self._token_abi)
            try:
                known = int(contract.functions.decimals().call())
            except (ContractLogicError, Web3RPCError, BadFunctionCallOutput, ValueError) as exc:
                raise ChainError(f"token 0x{token.hex()} has no readable decimals(): {_why(exc)}") from None
            if not 0 <= known <= MAX_TOKEN_DECIMALS:
                raise ChainError(f"token 0x{token.hex()} reports {known} decimals (at most "
                                 f"{MAX_TOKEN_DECIMALS} are supported)")
            self._decimals[token] = known
        return known

    def known_decimals(self, token: bytes) -> int | None:
        """The token's decimals if `decimals` has read them (no chain call), else None."""
        return self._decimals.get(token)

    def native_balance(self, address: bytes) -> int:
        return int(self.w3.eth.get_balance(_cs(address)))

    def token_balance(self, address: bytes) -> int:
        return int(self._need_token().functions.balanceOf(_cs(address)).call())

    def balance(self, address: bytes, token: bytes) -> int:
        if token == ZERO_ADDRESS:
            return self.native_balance(address)
        contract = self.w3.eth.contract(address=_cs(token), abi=self._token_abi)
        return int(contract.functions.balanceOf(_cs(address)).call())

    def allowance(self, owner: bytes, token: bytes) -> int:
        """What the escrow may move of `owner`'s ERC-20 tokens (unbounded for the native coin,
        which the deposit carries as the call's value)."""
        if token == ZERO_ADDRESS:
            return 2**256 - 1
        contract = self.w3.eth.contract(address=_cs(token), abi=self._token_abi)
        return int(contract.functions.allowance(_cs(owner), self._need_escrow().address).call())

    def funds(self, owner: bytes, token: bytes) -> tuple[int, int]:
        """(balance, allowance to the escrow): what a provider checks before Accept."""
        return self.balance(owner, token), self.allowance(owner, token)

    def credits(self, address: bytes, token: bytes) -> int:
        return int(self._need_escrow().functions.credits(_cs(token), _cs(address)).call())

    def status(self, agreement_id: bytes) -> EscrowStatus:
        state, end, acked, since = self._need_escrow().functions.status(agreement_id).call()
        return EscrowStatus(STATE_NAMES.get(state, str(state)), end, acked, since)

    def opened_at(self, terms: AgreementTerms) -> int | None:
        """Block time of the agreement's opening, or None when it is not open or closed."""
        status = self.status(terms.agreement_id())
        if status.state != "open":
            return None
        return status.end_s - terms.max_seconds

    def events(self, from_block: int = 0, to_block: int | None = None,
               confirmations: int = 0) -> list[ChainEvent]:
        """The escrow's events, oldest first, up to `confirmations` blocks below the head."""
        head = self.w3.eth.block_number
        last = min(head - confirmations, head if to_block is None else to_block)
        if last < from_block:
            return []
        out: list[ChainEvent] = []
        escrow = self._need_escrow()
        for name in EVENT_NAMES:
            for ev in getattr(escrow.events, name)().get_logs(from_block=from_block, to_block=last):
                args = dict(ev.args)
                out.append(ChainEvent(name, args.get("agreement_id"), args, ev.blockNumber,
                                      ev.transactionHash.to_0x_hex()))
        out.sort(key=lambda e: (e.block, e.tx_hash))
        return out

    def escrow_events(self, from_block: int, to_block: int) -> list[EscrowEvent]:
        """The escrow's events in blocks [from_block, to_block], in chain order (block, log
        index), from one eth_getLogs request, decoded for protocol.standing (addresses as 20
        bytes). Events of other contracts, and unknown topics, are skipped."""
        escrow = self._need_escrow()
        if self._topics is None:
            self._topics = {bytes(HexBytes(getattr(escrow.events, name).topic)):
                            getattr(escrow.events, name) for name in EVENT_NAMES}
        logs = self.w3.eth.get_logs({"address": escrow.address, "fromBlock": from_block,
                                     "toBlock": to_block})
        out: list[EscrowEvent] = []
        for lg in sorted(logs, key=lambda lg: (lg["blockNumber"], lg["logIndex"])):
            topics = lg.get("topics") or ()
            event = self._topics.get(bytes(HexBytes(topics[0]))) if topics else None
            if event is None or lg["address"] != escrow.address:
                continue
            decoded = event.process_log(lg)
            args = {k: (bytes.fromhex(v[2:]) if isinstance(v, str) and v.startswith("0x") else v)
                    for k, v in decoded.args.items()}
            out.append(EscrowEvent(decoded.event, bytes(args.pop("agreement_id", b"")), args))
        return out

    # -- the escrow's lifecycle ---------------------------------------------------------------

    def approve(self, key: bytes, amount: int) -> TxResult:
        return self._tx(key, self._need_token().functions.approve(self.escrow.address, amount), "approve")

    def open(self, key: bytes, terms: AgreementTerms, consent_sig: bytes) -> TxResult:
        """The renter funds the agreement; ERC-20 deposits are approved first if needed."""
        renter = private_key_address(key)
        if renter != terms.renter:
            raise ChainError("this wallet is not the agreement's renter")
        chain_now = self.now_s()
        if chain_now > terms.open_by:  # the escrow would revert: refuse before sending anything
            raise ChainError(f"the provider's consent expired: open_by {terms.open_by} is before "
                             f"the chain's time {chain_now}")
        deposit = terms.deposit
        value = 0
        if terms.token == ZERO_ADDRESS:
            value = deposit
            have = self.native_balance(renter)
            if have < deposit:
                raise InsufficientFundsError(
                    f"the deposit is {deposit} wei but the wallet holds {have}")
        else:
            token = self.w3.eth.contract(address=_cs(terms.token), abi=self._token_abi)
            have = int(token.functions.balanceOf(_cs(renter)).call())
            if have < deposit:
                raise InsufficientFundsError(
                    f"the deposit is {deposit} token units but the wallet holds {have}")
            allowed = int(token.functions.allowance(_cs(renter), self.escrow.address).call())
            if allowed < deposit:
                self._tx(key, token.functions.approve(self.escrow.address, deposit), "approve")
        return self._tx(key, self._need_escrow().functions.open(terms.as_tuple(), consent_sig),
                        "open", value=value)

    def claim(self, key: bytes, terms: AgreementTerms, acked_seconds: int, receipt_sig: bytes) -> TxResult:
        return self._tx(key, self._need_escrow().functions.claim(terms.as_tuple(), acked_seconds,
                                                                 receipt_sig), "claim")

    def close(self, key: bytes, terms: AgreementTerms) -> TxResult:
        return self._tx(key, self._need_escrow().functions.close(terms.as_tuple()), "close")

    def recover(self, key: bytes, terms: AgreementTerms) -> TxResult:
        return self._tx(key, self._need_escrow().functions.recover(terms.as_tuple()), "recover")

    def dispute(self, key: bytes, terms: AgreementTerms) -> TxResult:
        return self._tx(key, self._need_escrow().functions.dispute(terms.as_tuple()), "dispute")

    def arbitrate(self, key: bytes, terms: AgreementTerms, provider_amount: int) -> TxResult:
        return self._tx(key, self._need_escrow().functions.arbitrate(terms.as_tuple(), provider_amount),
                        "arbitrate")

    def finalize(self, key: bytes, terms: AgreementTerms) -> TxResult:
        return self._tx(key, self._need_escrow().functions.finalize(terms.as_tuple()), "finalize")

    def withdraw(self, key: bytes, token: bytes) -> TxResult:
        return self._tx(key, self._need_escrow().functions.withdraw(_cs(token)), "withdraw")

    # -- transactions -------------------------------------------------------------------------

    def _need_escrow(self) -> Any:
        if self.escrow is None:
            raise NoContractError("no escrow contract configured")
        return self.escrow

    def _need_token(self) -> Any:
        if self.token is None:
            raise NoContractError("no token contract configured")
        return self.token

    def _tx(self, key: bytes, fn: Any, method: str, value: int = 0) -> TxResult:
        receipt = self._send(key, fn, method=method, value=value)
        block = self.w3.eth.get_block(receipt.blockNumber)
        events: list[tuple[str, dict[str, Any]]] = []
        if self.escrow is not None and receipt.to and receipt.to.lower() == self.escrow.address.lower():
            from web3.logs import DISCARD

            for name in EVENT_NAMES:
                for ev in getattr(self.escrow.events, name)().process_receipt(receipt, errors=DISCARD):
                    events.append((name, dict(ev.args)))
        return TxResult(receipt.transactionHash.to_0x_hex(), receipt.blockNumber,
                        int(block.timestamp), receipt.gasUsed, tuple(events))

    def _fees(self) -> dict[str, int]:
        base = self.w3.eth.get_block("latest").get("baseFeePerGas")
        if base is None:
            return {"gasPrice": int(self.w3.eth.gas_price)}
        return {"maxFeePerGas": 2 * int(base) + PRIORITY_FEE_WEI,
                "maxPriorityFeePerGas": PRIORITY_FEE_WEI}

    def _send(self, key: bytes, fn: Any, *, method: str, value: int = 0) -> Any:
        sender = _cs(private_key_address(key))
        params: dict[str, Any] = {"from": sender, "value": value, "chainId": self.chain_id}
        try:
            gas = fn.estimate_gas(params)
        except (ContractLogicError, Web3RPCError, ValueError) as exc:
            raise RevertedError(method, _revert_reason(exc)) from None
        except Exception as exc:  # eth-tester raises TransactionFailed, which is none of the above
            if type(exc).__name__ in ("TransactionFailed", "ValidationError"):
                raise RevertedError(method, _revert_reason(exc)) from None
            raise
        fees = self._fees()
        params.update(fees, gas=int(gas * GAS_HEADROOM),
                      nonce=self.w3.eth.get_transaction_count(sender, "pending"))
        price = fees.get("maxFeePerGas", fees.get("gasPrice", 0))
        have = int(self.w3.eth.get_balance(sender))
        if have < value + params["gas"] * price:
            raise InsufficientFundsError(
                f"{method} needs up to {value + params['gas'] * price} wei (value and gas); "
                f"the wallet {sender} holds {have}")
        tx = fn.build_transaction(params)
        signed = Account.sign_transaction(tx, key)
        try:
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            if type(exc).__name__ == "TransactionFailed":
                raise RevertedError(method, _revert_reason(exc)) from None
            raise
        return self._wait(tx_hash, method)

    def _wait(self, tx_hash: Any, method: str) -> Any:
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.05)
        except TimeExhausted:
            raise RpcUnavailableError(f"{method}: no receipt within 60 s") from None
        if receipt.status != 1:
            raise RevertedError(method, "transaction reverted on inclusion")
        return receipt


def _why(exc: Exception) -> str:
    """One line for a failed request: requests' messages repeat the whole URL and pool state."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within the request timeout ({type(exc).__name__})"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect ({type(exc).__name__})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class AsyncChain:
    """The chain client for trio code: every call runs on one worker thread, in order.

    Each call fails with `RpcUnavailableError` once it has run (or waited for the thread) for
    `timeout_s`, even while the worker thread is stuck in a request: the thread is abandoned and
    ends when its HTTP request times out (see the module docstring)."""

    def __init__(self, chain: Chain, *, timeout_s: float = 90.0) -> None:
        self.chain = chain
        self.timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        name = getattr(fn, "__name__", "call")
        try:
            with trio.fail_after(self.timeout_s):
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            raise RpcUnavailableError(
                f"chain call {name} got no answer within {self.timeout_s:g} s: the RPC endpoint "
                f"is not answering (check [chain] rpc)") from None
        except (requests.RequestException, TimeExhausted) as exc:
            raise RpcUnavailableError(f"chain call {name} failed: the RPC endpoint gave "
                                      f"{_why(exc)}") from None

    async def read(self, fn: Callable[..., T], *args: Any, timeout_s: float) -> T:
        """A read that must not hold its caller longer than `timeout_s`: on timeout the caller
        gets TooSlowError at once and the thread is left to finish (it keeps the chain's
        single worker slot until then, so calls stay serialised)."""
        with trio.fail_after(timeout_s):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                 abandon_on_cancel=True)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.chain, name)
        if not callable(target):
            return target

        async def call(*args: Any) -> Any:
            return await self.run(target, *args)

        return call


RETRY_NOT_YET_S = 60
NOT_YET_REASONS = frozenset({"claim period not over", "dispute window not over"})


class WalletEscrow:
    """The rental layer's view of the escrow (node.rentals.EscrowPort) for one wallet."""

    def __init__(self, chain: AsyncChain, key: bytes) -> None:
        self.chain = chain
        self.key = key

    async def started_s(self, terms: AgreementTerms) -> int | None:
        return await self.chain.run(self.chain.chain.opened_at, terms)

    async def execute(self, call: EscrowCall, terms: AgreementTerms) -> TxResult:
        """Carry out a claim/close/recover. A recover refused only because the chain's clock
        has not passed the deadline yet (block time may lag or lead this node's clock) is
        retried once a second, up to `RETRY_NOT_YET_S` times."""
        for attempt in range(RETRY_NOT_YET_S + 1):
            try:
                return await self._execute(call, terms)
            except RevertedError as exc:
                if exc.reason not in NOT_YET_REASONS or attempt == RETRY_NOT_YET_S:
                    raise
            await trio.sleep(1)
        raise AssertionError("unreachable")

    async def _execute(self, call: EscrowCall, terms: AgreementTerms) -> TxResult:
        c = self.chain.chain
        if call.method == "claim":
            return await self.chain.run(c.claim, self.key, terms, call.args["acked_seconds"],
                                        call.args["receipt_sig"])
        if call.method == "close":
            return await self.chain.run(c.close, self.key, terms)
        if call.method == "recover":
            return await self.chain.run(c.recover, self.key, terms)
        raise ChainError(f"unsupported escrow call {call.method!r}")
