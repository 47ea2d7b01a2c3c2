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


def test_spec_abi_table_matches_the_committed_abi():
    """specs/escrow.md lists every function with its exact types, selector and returns."""
    import re

    from eth_utils import keccak

    def typ(x):
        if x["type"].startswith("tuple"):
            return "(" + ",".join(typ(c) for c in x["components"]) + ")" + x["type"][5:]
        return x["type"]

    spec = (HERE.parents[1] / "specs" / "escrow.md").read_text()
    rows = re.findall(r"^\| `(\w+)\(([^`]*)\)` \| `(0x[0-9a-f]{8})` \| (\w+) \|", spec, re.M)
    terms = "(address,address,address,uint256,uint64,uint32,uint32,address,uint32,bytes32,uint64)"
    functions = {f["name"]: f for f in load("Escrow")["abi"] if f["type"] == "function"}
    assert sorted(name for name, *_ in rows) == sorted(functions)
    for name, args, selector, mutability in rows:
        f = functions[name]
        spec_args = [a.rsplit(" ", 1) for a in args.split(", ")] if args else []
        assert [(t.replace("Terms", terms), n) for t, n in spec_args] == \
            [(typ(i), i["name"]) for i in f["inputs"]], name
        signature = f"{name}({','.join(typ(i) for i in f['inputs'])})"
        assert "0x" + keccak(text=signature)[:4].hex() == selector, name
        assert f["stateMutability"] == mutability, name
