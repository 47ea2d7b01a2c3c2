"""The committed ABI/bytecode JSON must be exactly what the committed Vyper sources compile to."""

import json

from node.contracts import CONTRACT_NAMES, load
from node.contracts.build import HERE, compile_contract, render


def test_committed_json_matches_fresh_compile():
    for name in CONTRACT_NAMES:
        committed = (HERE / f"{name}.json").read_text()
        assert committed == render(compile_contract(name)), (
            f"{name}.json is stale: run python -m node.contracts.build")


def test_loader_returns_abi_and_bytecode():
    art = load("Escrow")
    assert art["bytecode"].startswith("0x") and len(art["bytecode"]) > 1000
    names = {item.get("name") for item in art["abi"]}
    assert {"open", "claim", "close", "recover", "dispute", "arbitrate", "finalize",
            "withdraw", "withdrawTo", "status", "Opened", "Claimed"} <= names
    assert json.loads((HERE / "TestToken.json").read_text())["abi"] == load("TestToken")["abi"]
