"""Every command the README documents, run against a devnet with --json: its exit code, and that
stdout parses as JSON (issue 17). A command added to the README without a run here fails the
coverage check below."""

import json
import re
import signal
import time
from pathlib import Path

import pytest

from node.anvil import find_anvil

from .harness import gm, start_devnet, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"
ELSEWHERE = {  # documented commands exercised by other tests
    ("simulate",): "tests/cli/test_simulate_extra.py",
    ("demo",): "tests/cli/test_demo.py",
    ("node", "run"): "this test's devnet runs every node with it",
    ("devnet",): "this test starts one",
    # a docker provider's container: tests/cli/test_cli_containers.py rents on a devnet and runs each
    ("shell",): "tests/node/test_exec.py (a terminal session: pty, resize, Ctrl-C)", ("run",): "tests/cli/test_cli_containers.py",
    ("forward",): "tests/cli/test_cli_containers.py", ("cp",): "tests/cli/test_cli_containers.py",
}


def documented() -> set[tuple[str, ...]]:
    """(command,) or (command, subcommand) for each `gpumarket ...` line of the README."""
    with_sub = {"node", "offers", "rental", "evidence", "escrow"}
    out = set()
    for line in README.read_text().splitlines():
        for m in re.finditer(r"(?:^\s+|&& )(?:\.venv/bin/)?gpumarket ((?:[a-z]+)(?: [a-z]+)?)", line):
            words = tuple(m.group(1).split())
            out.add(words[:2] if words[0] in with_sub else words[:1])
    return out


def run_json(d: Path, *args: str, code: int = 0) -> object:
    out = gm(d, *args, "--json")
    assert out.returncode == code, (args, out.stdout, out.stderr)
    return json.loads(out.stdout)


@pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (.ci/run installs it)")
def test_readme__every_documented_command_against_a_devnet(tmp_path):
    ran: set[tuple[str, ...]] = set()
    root = tmp_path / "devnet"
    proc, _ = start_devnet(root, providers=1, renters=1)
    try:
        renter = root / "renter-0"
        state = json.loads((root / "devnet.json").read_text())

        doc = run_json(tmp_path / "fresh", "init")
        assert doc["wallet"].startswith("0x"); ran.add(("init",))
        doc = run_json(tmp_path / "net", "init", "--network", "base-sepolia")
        assert doc["config"].endswith("config.toml")
        assert "chain_id = 84532" in (tmp_path / "net" / "config.toml").read_text()
        run_json(tmp_path / "prov", "init", "--provider")
        out = gm(tmp_path / "prov", "gpus")  # no GPU here: a usage error; with one, JSON
        assert out.returncode in (0, 2), out.stderr
        if out.returncode == 0:
            json.loads(out.stdout)
        ran.add(("gpus",))
        doc = run_json(tmp_path / "x", "escrow", "deploy", "--rpc", state["rpc"], "--key-file",
                       str(_key_file(tmp_path, state)))
        assert doc["deployed"] is False and doc["escrow"] == state["escrow"]; ran.add(("escrow", "deploy"))

        assert run_json(renter, "status")["peers"] >= 1; ran.add(("status",))
        assert run_json(renter, "balance")["token"] == "tUSDC"; ran.add(("balance",))
        rows = wait_for(lambda: run_json(renter, "offers", "search", "gpu=H100 count>=1"), 40,
                        "the devnet provider's offer at the renter")
        ran.add(("offers", "search"))
        row = run_json(renter, "rent", rows[0]["offer_id"], "--hours", "0.05", "--yes",
                       "--max-price", rows[0]["price_per_gpu_hour"])
        aid = row["agreement_id"]; ran.add(("rent",))
        assert [r for r in run_json(renter, "rentals") if r["agreement_id"] == aid]; ran.add(("rentals",))
        assert run_json(renter, "escrow", "status", aid[:12])["state"] == "open"
        time.sleep(6)  # a heartbeat interval, so that there is something to export
        run_json(renter, "rental", "stop", aid[:12]); ran.add(("rental", "stop"))
        bundle = tmp_path / "rental.bin"
        run_json(renter, "evidence", "export", aid[:12], "-o", str(bundle)); ran.add(("evidence", "export"))
        assert run_json(renter, "evidence", "verify", str(bundle))["valid"] is True
        ran.add(("evidence", "verify"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    missing = documented() - ran - set(ELSEWHERE)
    assert not missing, f"README commands this test does not run: {sorted(missing)}"


def _key_file(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "minter.hex"
    path.write_text(state["minter_key"])
    return path
