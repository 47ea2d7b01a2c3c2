"""Chain client for the gpumarket escrow: deploy, transact, read status, watch events.

web3.py 8's sync `Web3` does the work; trio code calls the async methods, which run the sync
calls in worker threads (`trio.to_thread.run_sync`; AsyncWeb3 does not run under trio). All
access of one client goes through one `CapacityLimiter(1)` (py-evm is not thread-safe, and one
lane keeps the per-account nonce order simple); a `threading.Lock` per signing account guards
its nonce.

Backends: in-process py-evm (`ChainClient.in_process()`, the default for tests and local
runs), an anvil process on loopback (`AnvilProcess`), or any HTTP JSON-RPC endpoint with a
configured chain id and contract address (`ChainClient.connect_http`). Wallet keys come from an
encrypted eth-account keystore (`Wallet.from_keystore`), never from plain text in config.

Every failure a caller can act on is a `ChainError` subclass with a one-line message.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio
from eth_account import Account
from eth_utils import to_checksum_address
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.exceptions import ContractLogicError, Web3RPCError

from node.contracts import load as load_contract
from protocol.agreement import AgreementTerms, EscrowDomain
from protocol.eth import ZERO_ADDRESS

try:  # only present with the eth-tester backend
    from eth_tester.exceptions import TransactionFailed
except ImportError:  # pragma: no cover
    class TransactionFailed(Exception):  # type: ignore[no-redef]
        pass

STATE_NAMES = {0: "none", 1: "open", 2: "closed", 3: "claimed", 4: "disputed", 5: "final"}
EVENT_NAMES = ("Opened", "Closed", "Claimed", "Disputed", "Arbitrated", "Finalized",
               "Recovered", "Credited", "Withdrawn")
ANVIL_PACKAGE = "@foundry-rs/anvil-linux-amd64"


# ----------------------------------------------------------------------------- errors

class ChainError(Exception):
    """Base of every actionable chain failure; str() is one line."""


class RpcUnavailable(ChainError):
    pass


class WrongChainId(ChainError):
    pass


class NoContractCode(ChainError):
    pass


class InsufficientFunds(ChainError):
    pass


class InsufficientAllowance(ChainError):
    pass


class TransactionReverted(ChainError):
    def __init__(self, action: str, reason: str) -> None:
        self.action = action
        self.reason = reason
        super().__init__(f"{action} reverted: {reason}")


def _revert_reason(exc: BaseException) -> str:
    """Extract the revert reason from ContractLogicError or eth-tester's TransactionFailed."""
    text = getattr(exc, "message", None) or (exc.args[0] if exc.args else "") or repr(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = str(text)
    for prefix in ("execution reverted: ", "execution reverted:", "execution reverted"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return text.strip() or "no reason given"


# ----------------------------------------------------------------------------- wallet

@dataclass(frozen=True)
class Wallet:
    """A signing account. Build it from an encrypted keystore; `from_key` is for tests."""

    address: bytes
    key: bytes

    def __repr__(self) -> str:  # never print the key
        return f"Wallet(0x{self.address.hex()})"

    @classmethod
    def from_key(cls, key: bytes) -> "Wallet":
        acct = Account.from_key(key)
        return cls(bytes.fromhex(acct.address[2:]), bytes(key))

    @classmethod
    def from_keystore(cls, path: str | os.PathLike, password: str) -> "Wallet":
        try:
            data = json.loads(pathlib.Path(path).read_text())
            key = Account.decrypt(data, password)
        except FileNotFoundError:
            raise ChainError(f"keystore {path} not found") from None
        except ValueError as exc:  # wrong password (MAC mismatch) or malformed file
            raise ChainError(f"cannot decrypt keystore {path}: {exc}") from None
        return cls.from_key(bytes(key))

    def write_keystore(self, path: str | os.PathLike, password: str) -> None:
        """Encrypt this wallet's key to `path` (mode 0600)."""
        data = Account.encrypt(self.key, password)
        p = pathlib.Path(path)
        p.write_text(json.dumps(data))
        p.chmod(0o600)

    @property
    def checksum(self) -> str:
        return to_checksum_address(self.address)


@dataclass(frozen=True)
class AgreementStatus:
    state: str
    end: int
    acked_seconds: int
    since: int


@dataclass(frozen=True)
class EscrowEvent:
    name: str
    args: dict[str, Any]
    block_number: int
    tx_hash: str
    log_index: int


def _addr(raw: bytes | str) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return to_checksum_address(bytes(raw))
    return to_checksum_address(raw)


# ----------------------------------------------------------------------------- client

class ChainClient:
    """One chain, one escrow deployment (optional until deployed), many signing wallets."""

    def __init__(self, w3: Web3, *, escrow_address: str | None = None,
                 token_address: str | None = None, local: bool = False,
                 poll_latency: float = 0.1, receipt_timeout: float = 120.0) -> None:
        self.w3 = w3
        self.local = local
        self.poll_latency = poll_latency
        self.receipt_timeout = receipt_timeout
        self._limiter = trio.CapacityLimiter(1)
        self._nonce_locks: dict[bytes, threading.Lock] = {}
        self._nonces: dict[bytes, int] = {}
        self._locks_lock = threading.Lock()
        self._escrow_abi = load_contract("Escrow")["abi"]
        self._token_abi = load_contract("TestToken")["abi"]
        self.escrow = None
        self.token = None
        self._chain_id: int | None = None
        if escrow_address:
            self.escrow = w3.eth.contract(address=_addr(escrow_address), abi=self._escrow_abi)
        if token_address:
            self.token = w3.eth.contract(address=_addr(token_address), abi=self._token_abi)

    # --------------------------------------------------------------- constructors
    @classmethod
    def in_process(cls) -> tuple["ChainClient", list[Wallet]]:
        """A fresh py-evm chain; returns the client and its pre-funded test wallets."""
        provider = EthereumTesterProvider()
        keys = provider.ethereum_tester.backend.account_keys
        wallets = [Wallet.from_key(k.to_bytes()) for k in keys]
        return cls(Web3(provider), local=True), wallets

    @classmethod
    def connect_http(cls, url: str, *, chain_id: int, escrow_address: str | None,
                     token_address: str | None = None, local: bool = False,
                     timeout: float = 10.0) -> "ChainClient":
        """Connect to a JSON-RPC endpoint and check chain id and contract code (sync)."""
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout},
                               cache_allowed_requests=True))
        client = cls(w3, escrow_address=escrow_address, token_address=token_address,
                     local=local, poll_latency=0.05 if local else 1.0)
        client.check(chain_id)
        return client

    # --------------------------------------------------------------- plumbing
    async def _run(self, fn: Callable, *args, **kwargs):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                             limiter=self._limiter)

    def _rpc(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, OSError) as exc:
            raise RpcUnavailable(f"RPC endpoint not answering: {exc.__class__.__name__}: {exc}") from None
        except Exception as exc:
            # requests' ConnectionError/Timeout subclass OSError already; web3 wraps others.
            if exc.__class__.__name__ in ("ConnectionError", "Timeout", "ReadTimeout",
                                          "ConnectTimeout", "MaxRetryError"):
                raise RpcUnavailable(f"RPC endpoint not answering: {exc}") from None
            raise

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self._rpc(lambda: self.w3.eth.chain_id)
        return self._chain_id

    def domain(self) -> EscrowDomain:
        self._need_escrow()
        return EscrowDomain(self.chain_id, bytes.fromhex(self.escrow.address[2:]))

    def _need_escrow(self):
        if self.escrow is None:
            raise NoContractCode("no escrow address configured: deploy or configure one")
        return self.escrow

    def check(self, expected_chain_id: int | None = None) -> None:
        """Fail early: endpoint reachable, right chain, code at the configured addresses."""
        actual = self.chain_id
        if expected_chain_id is not None and actual != expected_chain_id:
            raise WrongChainId(f"endpoint is on chain id {actual}, configured {expected_chain_id}")
        for what, c in (("escrow", self.escrow), ("token", self.token)):
            if c is not None and not self._rpc(self.w3.eth.get_code, c.address):
                raise NoContractCode(f"no contract code at the configured {what} address "
                                     f"{c.address} on chain {actual}")

    def _nonce_lock(self, account: bytes) -> threading.Lock:
        with self._locks_lock:
            return self._nonce_locks.setdefault(account, threading.Lock())

    def _fees(self) -> dict:
        block = self._rpc(self.w3.eth.get_block, "latest")
        base = block.get("baseFeePerGas")
        if base is None:
            return {"gasPrice": self._rpc(lambda: self.w3.eth.gas_price)}
        try:
            tip = self._rpc(lambda: self.w3.eth.max_priority_fee)
        except (Web3RPCError, ValueError, NotImplementedError):
            tip = 10**9
        return {"maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip, "type": 2}

    def _transact(self, wallet: Wallet, action: str, fn=None, *, value: int = 0,
                  deploy_bytecode: str | None = None, abi: list | None = None) -> dict:
        """Build, pre-check, sign, send and wait for one transaction; returns the receipt."""
        base: dict[str, Any] = {"from": wallet.checksum, "value": value,
                                "chainId": self.chain_id}
        if deploy_bytecode is not None:
            ctor = self.w3.eth.contract(abi=abi, bytecode=deploy_bytecode).constructor()
            tx = ctor.build_transaction({**base, **self._fees(), "gas": 0, "nonce": 0})
            tx.pop("gas")
        else:
            tx = fn.build_transaction({**base, **self._fees(), "gas": 0, "nonce": 0})
            tx.pop("gas")
        tx.pop("nonce")
        have = self._rpc(self.w3.eth.get_balance, wallet.checksum)
        if have < value:
            raise InsufficientFunds(f"{action}: {wallet.checksum} holds {have} wei, needs {value} + gas")
        estimate = {k: v for k, v in tx.items()
                    if k not in ("maxFeePerGas", "maxPriorityFeePerGas", "gasPrice", "type")}
        try:
            gas = self._rpc(self.w3.eth.estimate_gas, estimate)
        except (ContractLogicError, TransactionFailed) as exc:
            raise TransactionReverted(action, _revert_reason(exc)) from None
        except (Web3RPCError, ValueError) as exc:  # eth-utils ValidationError is a ValueError
            msg = str(exc).lower()
            if "insufficient funds" in msg or "cannot afford" in msg:
                raise InsufficientFunds(
                    f"{action}: {wallet.checksum} cannot pay for gas (holds {have} wei)") from None
            raise TransactionReverted(action, _revert_reason(exc)) from None
        tx["gas"] = gas + gas // 5 + 10_000
        price = tx.get("maxFeePerGas", tx.get("gasPrice", 0))
        need = value + tx["gas"] * price
        if have < need:
            raise InsufficientFunds(
                f"{action}: {wallet.checksum} holds {have} wei, needs up to {need} (value + gas)")
        with self._nonce_lock(wallet.address):
            nonce = self._nonces.get(wallet.address)
            chain_nonce = self._rpc(self.w3.eth.get_transaction_count, wallet.checksum, "pending")
            if nonce is None or chain_nonce > nonce:
                nonce = chain_nonce
            tx["nonce"] = nonce
            signed = Account.sign_transaction(tx, wallet.key)
            try:
                tx_hash = self._rpc(self.w3.eth.send_raw_transaction, signed.raw_transaction)
            except (ContractLogicError, TransactionFailed) as exc:
                raise TransactionReverted(action, _revert_reason(exc)) from None
            except Web3RPCError as exc:
                self._nonces.pop(wallet.address, None)
                if "insufficient funds" in str(exc).lower():
                    raise InsufficientFunds(f"{action}: {wallet.checksum} has insufficient funds") from None
                raise ChainError(f"{action}: node refused the transaction: {exc}") from None
            self._nonces[wallet.address] = nonce + 1
        receipt = self._rpc(self.w3.eth.wait_for_transaction_receipt, tx_hash,
                            timeout=self.receipt_timeout, poll_latency=self.poll_latency)
        if receipt["status"] != 1:
            raise TransactionReverted(action, self._replay_reason(tx, receipt))
        return receipt

    def _replay_reason(self, tx: dict, receipt) -> str:
        call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
        try:
            self.w3.eth.call(call, receipt["blockNumber"] - 1)
        except (ContractLogicError, TransactionFailed, Web3RPCError) as exc:
            return _revert_reason(exc)
        return "reverted on chain (out of gas or state changed before inclusion)"

    # --------------------------------------------------------------- sync operations
    def deploy_escrow_sync(self, wallet: Wallet) -> str:
        art = load_contract("Escrow")
        rcpt = self._transact(wallet, "deploy escrow", deploy_bytecode=art["bytecode"],
                              abi=art["abi"])
        self.escrow = self.w3.eth.contract(address=rcpt["contractAddress"], abi=self._escrow_abi)
        return rcpt["contractAddress"]

    def deploy_test_token_sync(self, wallet: Wallet) -> str:
        if not self.local:
            raise ChainError("refusing to deploy the public-mint TestToken on a non-local chain")
        art = load_contract("TestToken")
        rcpt = self._transact(wallet, "deploy test token", deploy_bytecode=art["bytecode"],
                              abi=art["abi"])
        self.token = self.w3.eth.contract(address=rcpt["contractAddress"], abi=self._token_abi)
        return rcpt["contractAddress"]

    def _erc20(self, token: bytes):
        return self.w3.eth.contract(address=_addr(token), abi=self._token_abi)

    def mint_test_token_sync(self, wallet: Wallet, to: bytes, amount: int) -> None:
        if self.token is None or not self.local:
            raise ChainError("no local test token deployed")
        self._transact(wallet, "mint", self.token.functions.mint(_addr(to), amount))

    def token_balance_sync(self, token: bytes, who: bytes) -> int:
        if token == ZERO_ADDRESS:
            return self._rpc(self.w3.eth.get_balance, _addr(who))
        return self._rpc(self._erc20(token).functions.balanceOf(_addr(who)).call)

    def approve_sync(self, wallet: Wallet, token: bytes, amount: int) -> None:
        escrow = self._need_escrow()
        self._transact(wallet, "approve", self._erc20(token).functions.approve(escrow.address, amount))

    def open_sync(self, wallet: Wallet, terms: AgreementTerms, consent_sig: bytes) -> dict:
        escrow = self._need_escrow()
        if wallet.address != terms.renter:
            raise ChainError("open must be sent by the renter's wallet")
        value = 0
        if terms.token == ZERO_ADDRESS:
            value = terms.deposit
        else:
            tok = self._erc20(terms.token)
            bal = self._rpc(tok.functions.balanceOf(wallet.checksum).call)
            if bal < terms.deposit:
                raise InsufficientFunds(
                    f"open: renter holds {bal} token units, the deposit is {terms.deposit}")
            allowed = self._rpc(tok.functions.allowance(wallet.checksum, escrow.address).call)
            if allowed < terms.deposit:
                raise InsufficientAllowance(
                    f"open: escrow allowance is {allowed}, the deposit is {terms.deposit}; approve first")
        return self._transact(wallet, "open", escrow.functions.open(_terms_arg(terms), consent_sig),
                              value=value)

    def claim_sync(self, wallet: Wallet, terms: AgreementTerms, acked_seconds: int,
                   receipt_sig: bytes) -> dict:
        return self._transact(wallet, "claim", self._need_escrow().functions.claim(
            _terms_arg(terms), acked_seconds, receipt_sig))

    def close_sync(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return self._transact(wallet, "close", self._need_escrow().functions.close(_terms_arg(terms)))

    def recover_sync(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return self._transact(wallet, "recover", self._need_escrow().functions.recover(_terms_arg(terms)))

    def dispute_sync(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return self._transact(wallet, "dispute", self._need_escrow().functions.dispute(_terms_arg(terms)))

    def arbitrate_sync(self, wallet: Wallet, terms: AgreementTerms, provider_amount: int) -> dict:
        return self._transact(wallet, "arbitrate", self._need_escrow().functions.arbitrate(
            _terms_arg(terms), provider_amount))

    def finalize_sync(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return self._transact(wallet, "finalize", self._need_escrow().functions.finalize(_terms_arg(terms)))

    def withdraw_sync(self, wallet: Wallet, token: bytes) -> dict:
        return self._transact(wallet, "withdraw", self._need_escrow().functions.withdraw(_addr(token)))

    def status_sync(self, agreement_id: bytes) -> AgreementStatus:
        st, end, acked, since = self._rpc(self._need_escrow().functions.status(agreement_id).call)
        return AgreementStatus(STATE_NAMES[st], end, acked, since)

    def credit_sync(self, token: bytes, holder: bytes) -> int:
        return self._rpc(self._need_escrow().functions.credits(_addr(token), _addr(holder)).call)

    def advance_time_sync(self, seconds: int) -> None:
        """Local chains only: move the clock forward and mine a block (tests, demos)."""
        if not self.local:
            raise ChainError("advance_time is only for local chains")
        provider = self.w3.provider
        if isinstance(provider, EthereumTesterProvider):
            now = self.w3.eth.get_block("latest")["timestamp"]
            provider.ethereum_tester.time_travel(now + seconds)
        else:
            provider.make_request("evm_increaseTime", [seconds])
            provider.make_request("evm_mine", [])

    async def advance_time(self, seconds: int) -> None:
        await self._run(self.advance_time_sync, seconds)

    def block_number_sync(self) -> int:
        return self._rpc(lambda: self.w3.eth.block_number)

    def events_sync(self, from_block: int, to_block: int) -> list[EscrowEvent]:
        escrow = self._need_escrow()
        logs = self._rpc(self.w3.eth.get_logs, {"address": escrow.address,
                                                "fromBlock": from_block, "toBlock": to_block})
        by_topic = {}
        for name in EVENT_NAMES:
            ev = getattr(escrow.events, name)
            by_topic[bytes.fromhex(str(ev.topic).removeprefix("0x"))] = ev
        out = []
        for log in logs:
            ev = by_topic.get(bytes(log["topics"][0]))
            if ev is None:
                continue
            decoded = ev().process_log(log)
            out.append(EscrowEvent(decoded["event"], dict(decoded["args"]), log["blockNumber"],
                                   log["transactionHash"].to_0x_hex(), log["logIndex"]))
        return out

    # --------------------------------------------------------------- async API (trio)
    async def deploy_escrow(self, wallet: Wallet) -> str:
        return await self._run(self.deploy_escrow_sync, wallet)

    async def deploy_test_token(self, wallet: Wallet) -> str:
        return await self._run(self.deploy_test_token_sync, wallet)

    async def mint_test_token(self, wallet: Wallet, to: bytes, amount: int) -> None:
        await self._run(self.mint_test_token_sync, wallet, to, amount)

    async def token_balance(self, token: bytes, who: bytes) -> int:
        return await self._run(self.token_balance_sync, token, who)

    async def approve(self, wallet: Wallet, token: bytes, amount: int) -> None:
        await self._run(self.approve_sync, wallet, token, amount)

    async def open(self, wallet: Wallet, terms: AgreementTerms, consent_sig: bytes) -> dict:
        return await self._run(self.open_sync, wallet, terms, consent_sig)

    async def claim(self, wallet: Wallet, terms: AgreementTerms, acked: int, sig: bytes) -> dict:
        return await self._run(self.claim_sync, wallet, terms, acked, sig)

    async def close(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return await self._run(self.close_sync, wallet, terms)

    async def recover(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return await self._run(self.recover_sync, wallet, terms)

    async def dispute(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return await self._run(self.dispute_sync, wallet, terms)

    async def arbitrate(self, wallet: Wallet, terms: AgreementTerms, provider_amount: int) -> dict:
        return await self._run(self.arbitrate_sync, wallet, terms, provider_amount)

    async def finalize(self, wallet: Wallet, terms: AgreementTerms) -> dict:
        return await self._run(self.finalize_sync, wallet, terms)

    async def withdraw(self, wallet: Wallet, token: bytes) -> dict:
        return await self._run(self.withdraw_sync, wallet, token)

    async def status(self, agreement_id: bytes) -> AgreementStatus:
        return await self._run(self.status_sync, agreement_id)

    async def credit(self, token: bytes, holder: bytes) -> int:
        return await self._run(self.credit_sync, token, holder)

    async def watch_events(self, *, from_block: int = 0, confirmations: int = 0,
                           poll_interval: float = 0.5) -> AsyncIterator[EscrowEvent]:
        """Yield escrow events in order once `confirmations` blocks are on top of them."""
        next_block = from_block
        while True:
            head = await self._run(self.block_number_sync)
            last = head - confirmations
            if last >= next_block:
                for ev in await self._run(self.events_sync, next_block, last):
                    yield ev
                next_block = last + 1
            await trio.sleep(poll_interval)


def _terms_arg(terms: AgreementTerms) -> tuple:
    return tuple(_addr(v) if isinstance(v, bytes) and len(v) == 20 else v
                 for v in terms.as_tuple())


# ----------------------------------------------------------------------------- anvil

def find_anvil() -> str | None:
    """The anvil binary: $GPUMARKET_ANVIL, then .ci's npm prefix (.anvil/), then PATH."""
    env = os.environ.get("GPUMARKET_ANVIL")
    if env:
        return env if os.access(env, os.X_OK) else None
    root = pathlib.Path(__file__).resolve().parent.parent
    candidate = root / ".anvil" / "node_modules" / ANVIL_PACKAGE / "bin" / "anvil"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("anvil")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AnvilProcess:
    """An anvil chain on 127.0.0.1 on a free port; use as a context manager."""

    def __init__(self, binary: str | None = None, *, chain_id: int = 31337,
                 block_time: float | None = None) -> None:
        self.binary = binary or find_anvil()
        if not self.binary:
            raise ChainError("anvil binary not found: set GPUMARKET_ANVIL or run "
                             f"npm install --prefix .anvil {ANVIL_PACKAGE}@1.7.1")
        self.chain_id = chain_id
        self.block_time = block_time
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "AnvilProcess":
        self.port = _free_port()
        cmd = [self.binary, "--host", "127.0.0.1", "--port", str(self.port),
               "--chain-id", str(self.chain_id), "--silent"]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        w3 = Web3(HTTPProvider(self.url, request_kwargs={"timeout": 1}))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise ChainError(f"anvil exited with {self.proc.returncode}: {err[-1] if err else ''}")
            try:
                if w3.eth.chain_id == self.chain_id:
                    return self
            except Exception:
                time.sleep(0.05)
        self.stop()
        raise RpcUnavailable(f"anvil did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def fund(self, address: bytes, wei: int) -> None:
        """Set an account's native balance (anvil_setBalance): test wallets need no dev keys."""
        w3 = Web3(HTTPProvider(self.url))
        w3.provider.make_request("anvil_setBalance", [_addr(address), hex(wei)])

    def __enter__(self) -> "AnvilProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
