"""Helpers for whole-node tests in one process on the embedded chain: the market (the escrow
and token deployed, a renter funded) and a node run under its own cancel scope, so that a test
"kills" it by cancelling the scope and restarts it on the same store (what it left on disk is
what the restart reads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from node.chain import AsyncChain, Chain
from node.node import Node, NodeConfig, ProviderSettings
from protocol.eth import private_key_address
from protocol.params import Params

LISTEN = "/ip4/127.0.0.1/tcp/0"  # loopback, any free port


async def funded_market(*, renter: int, token_units: int = 10**12) -> tuple[Chain, AsyncChain, list[bytes]]:
    """The embedded chain with the escrow and token deployed by dev key 0 and `token_units`
    minted to dev key `renter`'s wallet; returns once the chain's block clock no longer runs
    ahead of this machine's. Returns (chain, its async client, the dev keys)."""
    chain = Chain.embedded()
    keys = chain.dev_keys()
    chain.deploy_local_market(keys[0])
    chain.fund(private_key_address(keys[renter]), token_units=token_units, minter_key=keys[0])
    await trio.sleep(chain.lead_s())  # eth-tester stamps the setup blocks ahead of the wall clock
    return chain, AsyncChain(chain), keys


async def start_node(nursery: trio.Nursery, chain: AsyncChain, path: Path, key: bytes,
                     provider: ProviderSettings | None = None, *, params: Params,
                     bootstrap: Sequence[str] = (), listen: str = LISTEN,
                     chain_poll_s: float = 0.1) -> tuple[Node, trio.CancelScope]:
    """A node on store directory `path` (named after it), started in `nursery` under its own
    cancel scope: cancelling the scope kills it. Pass the old node's `listen` address to
    restart it on the port its peers know."""
    scope = trio.CancelScope()
    node = Node(NodeConfig(data_dir=path, wallet_key=key, params=params, provider=provider,
                           listen=(listen,), bootstrap=bootstrap, name=path.name,
                           chain_poll_s=chain_poll_s), chain)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(run)
    return node, scope
