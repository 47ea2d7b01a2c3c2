"""anvil (Foundry's local EVM node) on 127.0.0.1, for several node processes sharing one chain.

The binary ships inside the npm package `@foundry-rs/anvil-linux-amd64` (glibc); `.ci/run`
installs it under `.anvil/`. npm 11 skips the wrapper's install script, so the binary inside the
package is called directly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time

from web3 import HTTPProvider, Web3

from .chain import ChainError, RpcUnavailableError

ANVIL_PACKAGE = "@foundry-rs/anvil-linux-amd64"


def _addr(raw: bytes) -> str:
    return Web3.to_checksum_address(raw)


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
                 block_time: float | None = None, extra_args: tuple[str, ...] = (),
                 host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        """`extra_args`: more anvil flags (e.g. --disable-default-create2-deployer). `host` and
        `prefix` (e.g. ``ip netns exec NS``) run it elsewhere: the NAT tests put it in their
        internet namespace (tests/nat/topology.py); then the port is fixed (8545)."""
        self.extra_args = tuple(extra_args)
        self.binary = binary or find_anvil()
        if not self.binary:
            raise ChainError("anvil binary not found: set GPUMARKET_ANVIL or run "
                             f"npm install --prefix .anvil {ANVIL_PACKAGE}@1.7.1")
        self.chain_id = chain_id
        self.block_time = block_time
        self.host = host
        self.prefix = tuple(prefix)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "AnvilProcess":
        self.port = _free_port() if not self.prefix else 8545
        cmd = [*self.prefix, self.binary, "--host", self.host, "--port", str(self.port),
               "--chain-id", str(self.chain_id), "--silent"]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        cmd += list(self.extra_args)
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
        raise RpcUnavailableError(f"anvil did not answer on {self.url} within {timeout} s")

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
