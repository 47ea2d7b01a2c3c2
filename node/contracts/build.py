"""Compile the Vyper sources next to this file into committed ABI + bytecode JSON.

Usage: python -m node.contracts.build [--check]
With --check nothing is written; the exit status is 1 if a committed JSON file is stale.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

from . import CONTRACT_NAMES

HERE = pathlib.Path(__file__).resolve().parent


def compile_contract(name: str) -> dict:
    import vyper  # build-time only; a running node reads the JSON

    source = (HERE / f"{name}.vy").read_text()
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    return {
        "contractName": name,
        "compiler": f"vyper {vyper.__version__}",
        "sourceSha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
    }


def render(artifact: dict) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in CONTRACT_NAMES:
        path = HERE / f"{name}.json"
        text = render(compile_contract(name))
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(name)
            if not check:
                path.write_text(text)
    if check and stale:
        print(f"stale compiled contracts: {', '.join(stale)}; run python -m node.contracts.build")
        return 1
    print("written: " + ", ".join(stale) if stale and not check else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
