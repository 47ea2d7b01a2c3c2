"""Compiled escrow contracts: ABI and bytecode committed as JSON, so a node never needs a compiler.

`python -m node.contracts.build` regenerates the JSON from the Vyper sources (needs the `vyper`
test dependency); tests/escrow/test_build.py fails if the committed JSON is stale.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

CONTRACT_NAMES = ("Escrow", "TestToken")


@cache
def load(name: str) -> dict:
    """Return {"abi": [...], "bytecode": "0x...", ...} for a committed contract."""
    if name not in CONTRACT_NAMES:
        raise KeyError(f"unknown contract {name!r}; known: {', '.join(CONTRACT_NAMES)}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text()
    return json.loads(text)
