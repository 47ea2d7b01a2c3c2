"""`gpumarket devnet`: a local chain and N node processes for experiments.

Starts anvil on 127.0.0.1, deploys the escrow and the test stablecoin, creates one data directory
per node (identity, encrypted keystore with the password "devnet", config), funds every wallet,
starts each node as its own `gpumarket node run` process, and prints how to talk to them. Ctrl-C
stops the nodes (SIGTERM: they withdraw their offers) and the chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .anvil import AnvilProcess
from .chain import Chain
from .config import default_config_text
from .identity import load_or_create_identity
from .wallet import Wallet

DEVNET_PASSWORD = "devnet"
USDC_DECIMALS = 6  # the devnet deploys its own tUSDC, with these decimals
USDC = 10**USDC_DECIMALS


def _configure(data_dir: Path, url: str, chain_id: int, escrow: bytes, token: bytes,
               provider: bool, index: int) -> None:
    text = default_config_text(data_dir, provider=provider)
    text = text.replace('rpc = "embedded"', f'rpc = "{url}"\nchain_id = {chain_id}\n'
                        f'escrow = "0x{escrow.hex()}"\ntoken = "0x{token.hex()}"')
    text = text.replace('listen = ["/ip4/0.0.0.0/tcp/4001"]', 'listen = ["/ip4/127.0.0.1/tcp/0"]')
    if provider:
        prices = ("0.45", "0.38", "0.60", "0.52")
        text = text.replace('price_per_gpu_hour = "0.50"', f'price_per_gpu_hour = "{prices[index % 4]}"')
        text = text.replace("min_duration_s = 600", "min_duration_s = 60")
        text = text.replace("heartbeat_interval_s = 30", "heartbeat_interval_s = 5")
        text = text.replace("grace_s = 600", "grace_s = 300")  # the escrow's minimum
        text += f"fake_gpus = {1 + index % 4}\n"
    (data_dir / "config.toml").write_text(text)


def start_node_process(exe: str, data_dir: Path, env: dict, *extra: str,
                       timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """Start `gpumarket node run` for `data_dir` (the node writes its log to data_dir/node.log;
    its terminal output goes to data_dir/stderr.log: a pipe nobody reads would block the node)
    and return it with its JSON ready line."""
    log = open(data_dir / "stderr.log", "w")
    proc = subprocess.Popen([exe, "--data-dir", str(data_dir), "node", "run", *extra],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    log.close()  # the child holds its own descriptor
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            return proc, json.loads(line)
        if proc.poll() is not None:
            break
    proc.kill()
    tail = (data_dir / "stderr.log").read_text()[-2000:]
    raise RuntimeError(f"node in {data_dir} did not start: {tail}")


STATE_NAME = "devnet.json"


def _write_state(root: Path, url: str, chain_id: int, escrow: bytes, token: bytes,
                 minter_key: bytes) -> None:
    """What `gpumarket devnet faucet` needs while the devnet runs (0600: it holds the test
    token's minter key, a throwaway key of this devnet)."""
    doc = {"rpc": url, "chain_id": chain_id, "escrow": "0x" + escrow.hex(),
           "token": "0x" + token.hex(), "minter_key": minter_key.hex()}
    path = root / STATE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


def faucet(root: Path, address: bytes, eth: int = 10, tokens: int = 1000) -> dict:
    """Fund `address` on the running devnet in `root`: `eth` of the native coin, `tokens` tUSDC."""
    root = root.expanduser().resolve()
    try:
        state = json.loads((root / STATE_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no devnet is running in {root} (start one with `gpumarket devnet "
                                f"--dir {root}`)") from None
    chain = Chain.connect(state["rpc"], chain_id=state["chain_id"],
                          token=bytes.fromhex(state["token"][2:]))
    minter = bytes.fromhex(state["minter_key"])
    chain.fund(address, native_wei=eth * 10**18, token_units=tokens * USDC, minter_key=minter)
    return {"address": "0x" + address.hex(), "eth": eth, "tUSDC": tokens,
            "tUSDC_balance": chain.token_balance(address) / USDC}


def run_devnet(root: Path, providers: int, renters: int) -> int:
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "gpumarket")
    env = {**os.environ, "GPUMARKET_PASSWORD": DEVNET_PASSWORD}
    procs: list[subprocess.Popen] = []
    with AnvilProcess() as anvil:
        deployer = Wallet.from_key(os.urandom(32))
        anvil.fund(deployer.address, 10**22)
        chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
        # the escrow at its computed address (the same on every chain), through the proxy
        escrow, token = chain.deploy_local_market(deployer.key, symbol="tUSDC", decimals=USDC_DECIMALS,
                                                  deterministic=True)
        _write_state(root, anvil.url, anvil.chain_id, escrow, token, deployer.key)
        names = [f"provider-{i}" for i in range(providers)] + [f"renter-{i}" for i in range(renters)]
        for i, name in enumerate(names):
            d = root / name
            d.mkdir(exist_ok=True)
            load_or_create_identity(d / "identity.seed")
            keystore = d / "wallet.json"
            if keystore.exists():
                wallet = Wallet.from_keystore(keystore, DEVNET_PASSWORD)
            else:
                wallet = Wallet.create()
                wallet.write_keystore(keystore, DEVNET_PASSWORD)
            anvil.fund(wallet.address, 10**20)
            if name.startswith("renter"):
                chain.fund(wallet.address, token_units=10_000 * USDC, minter_key=deployer.key)
            _configure(d, anvil.url, anvil.chain_id, escrow, token, name.startswith("provider"), i)
        try:
            first = None
            rows = []
            for name in names:
                proc, ready = start_node_process(exe, root / name, env,
                                                 *(["--bootstrap", first] if first else []))
                procs.append(proc)
                first = first or ready["addrs"][0]
                rows.append((name, ready["peer_id"], ready["wallet"], ready["addrs"]))
            print(f"devnet ready: anvil {anvil.url} (chain {anvil.chain_id}), escrow 0x{escrow.hex()}, "
                  f"tUSDC 0x{token.hex()}", flush=True)
            for name, peer, wallet, addrs in rows:
                print(f"  {name:<12} {peer}  {wallet}  {root / name}")
                for addr in addrs:  # dialable: other nodes join with --bootstrap ADDR
                    print(f"  {'':<12} {addr}")
            renter = next((n for n in names if n.startswith("renter")), names[0])
            print("try (in another terminal):", flush=True)
            print(f"  export GPUMARKET_PASSWORD={DEVNET_PASSWORD}")
            print(f"  export GPUMARKET_HOME={root / renter}")
            print("  gpumarket offers search 'gpu=H100'")
            print("  gpumarket rent OFFER_ID --hours 0.05 --yes")
            print(f"  gpumarket devnet faucet 0xYOUR_WALLET --dir {root}   # 10 ETH and 1000 tUSDC")
            print(f"join it with your own node: rpc = \"{anvil.url}\", chain_id = {anvil.chain_id}, "
                  f"token = \"0x{token.hex()}\", bootstrap = [\"{first}\"]")
            print("Ctrl-C stops everything.", flush=True)

            def stop(signum, frame):  # SIGTERM ends the devnet like Ctrl-C
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, stop)
            # and SIGINT always: a devnet started from a non-interactive shell's background job
            # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it
            signal.signal(signal.SIGINT, stop)
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            dead = [n for n, p in zip(names, procs) if p.poll() is not None]
            print(f"node(s) exited: {', '.join(dead)}; see their node.log; stopping", flush=True)
            return 1
        except KeyboardInterrupt:
            pass
        finally:
            (root / STATE_NAME).unlink(missing_ok=True)
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0
