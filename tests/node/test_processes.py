"""Crashes and restarts mid-rental, with each node in its own OS process (python -m node.process)
on one anvil chain on 127.0.0.1: SIGKILL at a moment the test picks, the survivor's reaction
checked on chain and in the stores the processes leave behind."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from eth_utils import keccak

from node.anvil import AnvilProcess, find_anvil
from node.chain import Chain
from node.identity import load_or_create_identity
from node.records import decode_agreement
from node.wallet import Wallet
from node.testing import recover_past_grace
from protocol.messages import UsageReceipt
from protocol.encoding import decode
from protocol.settlement import claim_payout

pytestmark = pytest.mark.skipif(
    find_anvil() is None,
    reason="anvil not installed: npm install --prefix .anvil @foundry-rs/anvil-linux-amd64@1.7.1 "
           "or set GPUMARKET_ANVIL to the binary")

ROOT = Path(__file__).resolve().parents[2]
PRICE = 1_000  # token units per GPU-second
# Fast timing as in the demo: 1 s heartbeats, and the escrow's shortest grace, 300 s (the
# provider's offer sets both): a test that needs the grace to pass moves anvil's clock.
FAST = {"clock_skew_ms": 2_000, "min_heartbeat_interval_s": 1, "heartbeat_late_tolerance_ms": 500,
        "negotiation_step_timeout_ms": 5_000, "renter_heartbeat_timeout_intervals": 2,
        "provider_stop_after_missed_receipts": 3}
# For restarts: the survivor must wait out a process start (about 2-3 s on this machine).
# Measured here: a node process takes 3-6 s to start on a loaded 2-core machine.
PATIENT = dict(FAST, renter_heartbeat_timeout_intervals=3, provider_stop_after_missed_receipts=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProc:
    """A `python -m node.process` child; its JSON lines arrive on a queue."""

    def __init__(self, tmp: Path, name: str, args: list[str], prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        # the checkout first; then whatever the test run itself imports from (PYTHONPATH)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        self.stderr = open(tmp / f"{name}.{time.monotonic_ns()}.log", "w")
        # prefix: e.g. `ip netns exec NS` (the NAT tests run nodes inside namespaces)
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "node.process", *args], cwd=ROOT,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exited"})

    def wait(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.events.get(timeout=left)
            except queue.Empty:
                break
            if got["event"] == event:
                return got
            assert got["event"] not in ("exited", "rent_failed"), f"{self.name}: {got}"
        raise AssertionError(f"{self.name}: no {event!r} within {timeout} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 5.0) -> float:
        """SIGTERM; returns how long the clean shutdown took."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.wait("stopped", timeout)
        assert self.proc.wait(timeout) == 0
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()


class Market:
    """anvil, the escrow and test token, funded wallets, and node processes on one chain."""

    def __init__(self, tmp: Path, anvil: AnvilProcess) -> None:
        self.tmp, self.anvil = tmp, anvil
        self.wallets = {n: Wallet.from_key(keccak(b"proc wallet " + n.encode()))
                        for n in ("deployer", "provider", "renter", "relay")}
        for w in self.wallets.values():
            anvil.fund(w.address, 10**21)
        chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
        self.escrow, self.token = chain.deploy_local_market(self.wallets["deployer"].key)
        self.chain = Chain.connect(anvil.url, escrow=self.escrow, token=self.token)
        self.funds = 1_000_000_000
        self.chain.fund(self.wallets["renter"].address, token_units=self.funds,
                        minter_key=self.wallets["deployer"].key)
        # Set up with instant mining, then a block every second, as on a real chain: with
        # mining only on transactions, block time stands still while nobody transacts and a
        # recover due "after end + grace" never becomes valid (eth_estimateGas runs against the
        # latest block's timestamp).
        self.chain.w3.provider.make_request("evm_setIntervalMining", [1])
        self.procs: list[NodeProc] = []

    def start(self, name: str, role: str, *extra: str, params: dict = FAST,
              prefix: tuple[str, ...] = ()) -> NodeProc:
        key_file = self.tmp / f"{name}.key"
        key_file.write_text(self.wallets[name].key.hex())
        args = ["--data-dir", str(self.tmp / name), "--chain-url", self.anvil.url,
                "--escrow", self.escrow.hex(), "--token", self.token.hex(),
                "--wallet-key-file", str(key_file), "--role", role, "--name", name,
                "--params", json.dumps(params), *extra]
        if role == "provider":
            args += ["--fake-gpus", "1", "--price", str(PRICE), "--heartbeat-interval", "1",
                     "--grace", "300"]
        proc = NodeProc(self.tmp, name, args, prefix)
        self.procs.append(proc)
        return proc

    def rental(self, params: dict = FAST, duration: int = 30) -> tuple[NodeProc, NodeProc, str, bytes]:
        """Start both processes at once (the provider's address is fixed in advance) and wait
        until the renter has rented the provider's offer. Returns the provider's listen addr."""
        peer = load_or_create_identity(self.tmp / "provider" / "identity.seed").peer_id
        listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
        provider = self.start("provider", "provider", "--listen", listen, params=params)
        renter = self.start("renter", "renter", "--bootstrap", f"{listen}/p2p/{peer}",
                            "--rent", "", "--duration", str(duration), "--max-price", str(PRICE),
                            params=params)
        provider.wait("ready")
        rented = renter.wait("rented")
        return provider, renter, listen, bytes.fromhex(rented["agreement_id"])

    def close(self) -> None:
        for p in self.procs:
            p.close()

    # -- what the processes left behind ---------------------------------------------------------

    def db(self, name: str) -> sqlite3.Connection:
        return sqlite3.connect(self.tmp / name / "node.db", timeout=5)

    def receipts(self, name: str, aid: bytes) -> list[tuple[int, int, float]]:
        """(heartbeat_seq, acked_seconds, stored_at) of every receipt in `name`'s store."""
        with self.db(name) as c:
            return c.execute("SELECT heartbeat_seq, acked_seconds, created_at FROM rental_receipts"
                             " WHERE agreement_id = ? ORDER BY heartbeat_seq", (aid,)).fetchall()

    def latest_receipt(self, name: str, aid: bytes) -> UsageReceipt:
        with self.db(name) as c:
            raw = c.execute("SELECT raw FROM rental_receipts WHERE agreement_id = ?"
                            " ORDER BY heartbeat_seq DESC LIMIT 1", (aid,)).fetchone()[0]
        return decode(raw, UsageReceipt)

    def heartbeat_times(self, name: str, aid: bytes) -> list[float]:
        with self.db(name) as c:
            return [r[0] for r in c.execute("SELECT received_at FROM heartbeats WHERE agreement_id = ?"
                                            " ORDER BY seq", (aid,))]

    def terms(self, name: str, aid: bytes):
        with self.db(name) as c:
            blob = c.execute("SELECT terms FROM agreements WHERE id = ?", (aid,)).fetchone()[0]
        return decode_agreement(blob)[0]

    def wait_receipts(self, name: str, aid: bytes, count: int, timeout: float = 15.0,
                      after_seq: int = -1) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = [r for r in self.receipts(name, aid) if r[0] > after_seq]
            if len(rows) >= count:
                return rows
            time.sleep(0.1)
        raise AssertionError(f"{name}: fewer than {count} receipts after seq {after_seq}")

    def wait_final(self, aid: bytes, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.chain.status(aid).state == "final":
                return [e for e in self.chain.events() if e.agreement_id == aid]
            time.sleep(0.2)
        raise AssertionError(f"agreement not final within {timeout} s: {self.chain.status(aid)}")


@pytest.fixture
def market(tmp_path):
    with AnvilProcess() as anvil:
        m = Market(tmp_path, anvil)
        try:
            yield m
        finally:
            m.close()


def test_processes__provider_sigkilled__renter_stops_paying_closes_and_recovers_deposit(market):
    provider, renter, _, aid = market.rental(duration=60)
    market.wait_receipts("renter", aid, 2)
    provider.kill()
    acked_at_kill = market.receipts("renter", aid)[-1][1]
    # silence: (renter timeout 2 + N 3) * 1 s, then close; allow for block times and a loaded
    # machine. The deposit is recoverable 300 s (the grace) after the close: anvil's clock is
    # moved past it and the deposit recovered on the renter's behalf (anyone may), since the
    # renter's node would wait those 300 s on its own clock.
    deadline = time.monotonic() + 20
    while market.chain.status(aid).state != "closed":
        assert time.monotonic() < deadline, f"not closed: {market.chain.status(aid)}"
        time.sleep(0.2)
    recover_past_grace(market.chain, market.wallets["deployer"].key, market.terms("renter", aid))
    events = market.wait_final(aid, timeout=10)
    assert [e.name for e in events] == ["Opened", "Closed", "Recovered"]
    assert market.chain.token_balance(market.wallets["renter"].address) == market.funds
    assert market.chain.token_balance(market.wallets["provider"].address) == 0
    assert market.receipts("renter", aid)[-1][1] == acked_at_kill  # nothing paid after the kill
    assert renter.terminate() < 5


def test_processes__renter_sigkilled__provider_stops_within_bound_and_claims_last_receipt(market):
    provider, renter, _, aid = market.rental(duration=60)
    market.wait_receipts("provider", aid, 3)
    renter.kill()
    events = market.wait_final(aid, timeout=20)
    assert [e.name for e in events] == ["Opened", "Claimed"]
    last = market.latest_receipt("provider", aid)
    claimed = events[1].args
    assert claimed["acked_seconds"] == last.acked_seconds > 0
    terms = market.terms("provider", aid)
    assert market.chain.token_balance(market.wallets["provider"].address) == \
        claim_payout(terms, last.acked_seconds).provider == PRICE * last.acked_seconds
    # Stop bound: no heartbeat after N intervals + tolerance past the last paying receipt.
    # The stop timer restarts at the receipt that raised acked_seconds to its last value.
    paid_at = min(t for seq, acked, t in market.receipts("provider", aid) if acked == last.acked_seconds)
    n, tol = FAST["provider_stop_after_missed_receipts"], FAST["heartbeat_late_tolerance_ms"] / 1000
    last_heartbeat = market.heartbeat_times("provider", aid)[-1]
    assert last_heartbeat <= paid_at + n * 1 + tol + 0.1  # 0.1 s: the heartbeat's own store write
    assert last_heartbeat >= paid_at + (n - 1) * 1  # it did keep serving for the grace of N intervals
    assert provider.terminate() < 5


def test_processes__provider_then_renter_restarted_mid_rental__rental_resumes_and_settles(market):
    # 36 s: two restarts must fit inside the rental even on a loaded machine (at 24 s a slow
    # renter restart once found the rental over and settled it instead of resuming).
    provider, renter, listen, aid = market.rental(params=PATIENT, duration=36)
    before = market.wait_receipts("provider", aid, 2)
    provider.kill()
    provider = market.start("provider", "provider", "--listen", listen, params=PATIENT)
    assert provider.wait("ready")["resumed"] == {"resumed": [aid.hex()]}
    seen = market.receipts("provider", aid)[-1][0]
    assert seen >= before[-1][0]
    market.wait_receipts("provider", aid, 2, after_seq=seen)  # receipts flow again

    renter.kill()
    renter = market.start("renter", "renter", params=PATIENT)
    assert renter.wait("ready")["resumed"] == {"resumed": [aid.hex()]}
    seen = market.receipts("renter", aid)[-1][0]
    market.wait_receipts("renter", aid, 2, after_seq=seen)

    events = market.wait_final(aid, timeout=40)
    assert [e.name for e in events] == ["Opened", "Claimed"]
    last = market.latest_receipt("provider", aid)
    assert events[1].args["acked_seconds"] == last.acked_seconds
    # two outages of a few seconds each are not paid; the rest of the 36 s is
    assert 20 <= last.acked_seconds <= 36
    assert market.chain.token_balance(market.wallets["provider"].address) == PRICE * last.acked_seconds
    for p in (provider, renter):
        assert p.terminate() < 5
