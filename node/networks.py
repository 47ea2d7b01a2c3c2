"""Known networks (node/networks.json, shipped in the package): what `gpumarket init --network
NAME` writes into a new config: chain id, a public RPC where there is an official one, the
suggested stablecoin, and bootstrap peers when there are any."""

from __future__ import annotations

import json
from importlib import resources


class UnknownNetwork(ValueError):
    pass


def networks() -> dict[str, dict]:
    text = resources.files("node").joinpath("networks.json").read_text()
    return json.loads(text)["networks"]


def network(name: str) -> dict:
    known = networks()
    if name not in known:
        raise UnknownNetwork(f"unknown network {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def chain_section(name: str) -> str:
    """The [chain] keys for `name` as TOML lines (no escrow: it is computed)."""
    net = network(name)
    lines = [f"# network: {name} ({net['name']}); the escrow's address is computed, not configured"]
    lines.append(f'rpc = "{net["rpc"]}"' if net["rpc"] else
                 '# rpc = "https://..."  # no public endpoint listed: set your provider\'s URL')
    lines.append(f"chain_id = {net['chain_id']}")
    if net["tokens"]:
        t = net["tokens"][0]
        lines.append(f'token = "{t["address"]}"  # {t["symbol"]}, {t["decimals"]} decimals')
    return "\n".join(lines)
