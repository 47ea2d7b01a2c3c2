"""Helpers for running real hosts on loopback in tests, benchmarks and the demo."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@asynccontextmanager
async def running_hosts(n: int, config: HostConfig | None = None) -> AsyncIterator[list[GossipHost]]:
    """Start ``n`` hosts listening on 127.0.0.1 (random ports, fresh identities).

    All hosts run in one nursery and are cancelled together on exit: stopping many in-process
    py-libp2p hosts one after another has crashed ("Nursery is closed to new arrivals").
    """
    config = replace(config or HostConfig(), listen_addrs=LOOPBACK, bootstrap=())
    async with trio.open_nursery() as nursery:
        hosts = [
            await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)), config).run)
            for _ in range(n)
        ]
        try:
            yield hosts
        finally:
            nursery.cancel_scope.cancel()


async def connect_pairs(hosts: list[GossipHost], pairs: list[tuple[int, int]]) -> None:
    """Dial ``hosts[i] -> hosts[j]`` for every pair, all in parallel."""
    async with trio.open_nursery() as nursery:
        for i, j in pairs:
            nursery.start_soon(hosts[i].connect, hosts[j].addrs()[0])


async def wait_for_mesh(hosts: list[GossipHost], pairs: list[tuple[int, int]], topic: str,
                        timeout: float = 5.0) -> None:
    """Wait until both ends of every pair have each other in their mesh for ``topic``."""
    with trio.fail_after(timeout):
        for i, j in pairs:
            await hosts[i].pubsub.wait_for_mesh(hosts[j].peer_id, topic, timeout=timeout)
            await hosts[j].pubsub.wait_for_mesh(hosts[i].peer_id, topic, timeout=timeout)


async def settle_meshes(hosts: list[GossipHost], topic: str, timeout: float, d_low: int = 4) -> list[int]:
    """The barrier a benchmark takes before its clock starts: wait (at most ``timeout``, then go
    on) until every host's connections all subscribe to ``topic`` and its mesh holds
    min(``d_low``, its connections) of them. Returns each host's mesh size."""

    def meshed(h: GossipHost) -> bool:
        connected = len(h.host.get_network().connections)
        subscribed = len(h.pubsub.peer_topics.get(topic, ()))
        return 0 < connected == subscribed and len(h.mesh_peers(topic)) >= min(d_low, connected)

    with trio.move_on_after(timeout):
        while not all(meshed(h) for h in hosts):
            await trio.sleep(0.1)
    return [len(h.mesh_peers(topic)) for h in hosts]


def recover_past_grace(chain, key: bytes, terms) -> int:
    """Local chains only (tests, the demo): move block time past the closed or ended agreement's
    `end + grace`, then recover its deposit with `key` (anyone may). The escrow's grace is at
    least 5 minutes (its MIN_GRACE), too long to wait out in a test; a renter's node would
    recover by itself once that time passed on its own clock. Returns the seconds skipped."""
    status = chain.status(terms.agreement_id())
    if status.state not in ("open", "closed"):
        raise ValueError(f"agreement is {status.state}, not open or closed")
    skip = max(0, status.end_s + terms.grace + 1 - chain.now_s())
    chain.time_travel(skip)
    chain.recover(key, terms)
    return skip
