"""What the CLI tests share: running `gpumarket` as a user would (its own process, a password
in the environment), a data directory set up for the embedded chain or for an anvil market,
node processes started and stopped, the devnet's banner read, and a bounded wait.

A module of its own (not a test file), so that test modules import from here rather than
from each other."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.anvil import AnvilProcess
from node.chain import Chain
from node.devnet import start_node_process
from node.wallet import Wallet

EXE = shutil.which("gpumarket") or os.path.join(os.path.dirname(sys.executable), "gpumarket")
ENV = {**os.environ, "GPUMARKET_PASSWORD": "test password", "COLUMNS": "200"}
LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"
DEFAULT_LISTEN = 'listen = ["/ip4/0.0.0.0/tcp/4001"]'  # what `init` writes


def gm(data_dir: Path, *args: str, timeout: float = 120, env: dict | None = None,
       prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """One `gpumarket --data-dir DATA_DIR ARGS...` run, its output captured as text."""
    return subprocess.run([*prefix, EXE, "--data-dir", str(data_dir), *args], capture_output=True,
                          text=True, timeout=timeout, env=env or ENV, stdin=subprocess.DEVNULL)


def wallet_address(data_dir: Path) -> bytes:
    return bytes.fromhex(json.loads((data_dir / "wallet.json").read_text())["address"].removeprefix("0x"))


def init(data_dir: Path, *, provider: bool, fake_gpus: int = 1, listen: str = LOOPBACK_LISTEN) -> None:
    """`gpumarket init` on the embedded chain, listening on `listen`; a provider gets
    `fake_gpus` fake GPUs (0: none, the real NVML probe)."""
    out = gm(data_dir, "init", *(["--provider"] if provider else []))
    assert out.returncode == 0, out.stderr
    cfg = data_dir / "config.toml"
    text = cfg.read_text().replace(DEFAULT_LISTEN, f'listen = ["{listen}"]')
    if provider and fake_gpus:
        text += f"fake_gpus = {fake_gpus}\n"
    cfg.write_text(text)


ACCESS_HOOK = """import json, sys
agreement = json.load(sys.stdin)
print("ssh -p 2222 gpu@127.0.0.1  # for", agreement["access_key"].split()[-1], agreement["agreement_id"][:8])
"""


def configure_for_anvil(data_dir: Path, anvil: AnvilProcess, escrow: bytes, token: bytes,
                        provider: bool) -> None:
    """Point an initialised data directory at an anvil market on loopback; a provider gets two
    fake GPUs, short rentals (10 s minimum, 5 s heartbeats, the escrow's minimum grace) and an
    access hook that prints an ssh line."""
    cfg = data_dir / "config.toml"
    text = cfg.read_text()
    text = text.replace('rpc = "embedded"', f'rpc = "{anvil.url}"\nchain_id = {anvil.chain_id}\n'
                        f'escrow = "0x{escrow.hex()}"\ntoken = "0x{token.hex()}"')
    text = text.replace(DEFAULT_LISTEN, f'listen = ["{LOOPBACK_LISTEN}"]')
    if provider:
        text = text.replace("min_duration_s = 600", "min_duration_s = 10")
        text = text.replace("heartbeat_interval_s = 30", "heartbeat_interval_s = 5")
        text = text.replace("grace_s = 600", "grace_s = 300")  # the escrow's minimum
        hook = data_dir / "access_hook.py"
        hook.write_text(ACCESS_HOOK)
        text += "fake_gpus = 2\n"
        text += f"access_hook = ['{sys.executable}', '{hook}']\n"
    cfg.write_text(text)


@dataclass
class AnvilMarket:
    """An anvil chain with the market's escrow and test token deployed, and a provider's and
    a renter's data directories initialised, funded with ETH and configured for it."""
    anvil: AnvilProcess
    chain: Chain
    deployer: Wallet
    escrow: bytes
    token: bytes
    provider_dir: Path
    renter_dir: Path
    init_stdout: dict[Path, str]  # what `gpumarket init` printed, by data directory

    def fund_renter(self, token_units: int) -> None:
        self.chain.fund(wallet_address(self.renter_dir), token_units=token_units,
                        minter_key=self.deployer.key)


@contextmanager
def anvil_market(tmp_path: Path, deployer_key: bytes = b"\x01" * 32):
    with AnvilProcess() as anvil:
        deployer = Wallet.from_key(deployer_key)
        anvil.fund(deployer.address, 10**21)
        chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
        escrow, token = chain.deploy_local_market(deployer.key)
        dirs, printed = {}, {}
        for name, provider in (("provider", True), ("renter", False)):
            d = dirs[name] = tmp_path / name
            out = gm(d, "init", *(["--provider"] if provider else []))
            assert out.returncode == 0, out.stderr
            printed[d] = out.stdout
            anvil.fund(wallet_address(d), 10**20)
            configure_for_anvil(d, anvil, escrow, token, provider)
        yield AnvilMarket(anvil, chain, deployer, escrow, token, dirs["provider"], dirs["renter"],
                           printed)


def start_node(data_dir: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    """`gpumarket node run` in its own process; returns it and its ready line."""
    return start_node_process(EXE, data_dir, ENV, *extra)


def stop(proc: subprocess.Popen, timeout: float = 30) -> float:
    """SIGTERM, then SIGKILL after `timeout`; returns the seconds the node took to exit."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.monotonic() - t0


def wait_for(fn, timeout: float, what: str, step: float = 0.3):
    """fn() until it returns something true (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout  # a hang guard, not a performance bound
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def search(d: Path, query: str = "") -> list:
    out = gm(d, "offers", "search", *([query] if query else []), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start_devnet(directory: Path, providers: int, renters: int,
                 timeout: float = 120) -> tuple[subprocess.Popen, list[str]]:
    """`gpumarket devnet` in its own process; returns it and the lines it printed up to its
    "Ctrl-C" line (or its exit), waiting at most `timeout` seconds. A thread reads stdout (a
    readline in this thread would wait past the deadline on a devnet that prints nothing) and
    goes on draining it, so that the devnet never blocks on a full pipe."""
    proc = subprocess.Popen([EXE, "devnet", "--providers", str(providers), "--renters", str(renters),
                             "--dir", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, stdin=subprocess.DEVNULL)
    printed: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [printed.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = printed.get(timeout=min(left, 1.0))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return proc, lines
