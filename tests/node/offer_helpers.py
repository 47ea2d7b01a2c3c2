"""Helpers for offer-service tests: real hosts on 127.0.0.1 with stores, providers with fake GPUs."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from node.fake_nvml import FakeNvml
from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC, OfferService, OfferServiceConfig
from node.publisher import OfferPublisher, ProviderConfig
from node.store import Store
from node.testing import LOOPBACK
from protocol.identity import PeerKey
from protocol.messages import Binding
from protocol.params import Params
from protocol.samples import sample_terms

CHAIN_ID = 31337
TEST_PARAMS = Params().replace(offer_min_lifetime_ms=1000, clock_skew_ms=300)


@dataclass
class Node:
    host: GossipHost
    service: OfferService
    store: Store
    identity: NodeIdentity

    @property
    def book(self):
        return self.service.book


async def start_node(nursery: trio.Nursery, db_path, *, seed: bytes | None = None,
                     params: Params = TEST_PARAMS,
                     config: OfferServiceConfig = OfferServiceConfig(flush_interval_s=0.2),
                     host_config: HostConfig | None = None) -> Node:
    identity = NodeIdentity.from_seed(seed or os.urandom(32))
    host = await nursery.start(GossipHost(identity, host_config or HostConfig(listen_addrs=LOOPBACK)).run)
    store = await Store.open(db_path, synchronous="NORMAL")
    service = OfferService(host, store, params, config=config)
    await nursery.start(service.run)
    return Node(host, service, store, identity)


@asynccontextmanager
async def market(n: int, tmp_path, **kwargs) -> AsyncIterator[list[Node]]:
    """``n`` nodes with an offer service each; all cancelled together on exit."""
    async with trio.open_nursery() as nursery:
        nodes = [await start_node(nursery, tmp_path / f"node{i}.db", **kwargs) for i in range(n)]
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


def provider_config(*, lifetime_ms: int = 60_000, interval_s: float = 0.05, burst: int = 10,
                    price: int = 100, region: str = "eu-frankfurt") -> ProviderConfig:
    return ProviderConfig(
        terms=sample_terms(CHAIN_ID, b"\xee" * 20, b"\x70" * 20, price),
        region=region, bandwidth_mbps=1000, lifetime_ms=lifetime_ms,
        publish_interval_s=interval_s, publish_burst=burst,
    )


def binding_for(identity: NodeIdentity, rng: random.Random | None = None) -> Binding:
    rng = rng or random.Random(identity.public_key)
    return Binding.create(PeerKey.from_signing_key(identity.signing_key), rng.randbytes(32), CHAIN_ID)


def publisher(node: Node, config: ProviderConfig | None = None, gpus: int = 2) -> OfferPublisher:
    return OfferPublisher(node.service, node.identity, binding_for(node.identity),
                          config or provider_config(), nvml=FakeNvml.with_gpus(gpus))


async def connect_and_mesh(nodes: list[Node], pairs: list[tuple[int, int]], timeout: float = 6.0) -> None:
    async with trio.open_nursery() as nursery:
        for i, j in pairs:
            nursery.start_soon(nodes[i].host.connect, nodes[j].host.addrs()[0])
    with trio.fail_after(timeout):
        for i, j in pairs:
            await nodes[i].host.pubsub.wait_for_mesh(nodes[j].host.peer_id, OFFER_TOPIC, timeout=timeout)
            await nodes[j].host.pubsub.wait_for_mesh(nodes[i].host.peer_id, OFFER_TOPIC, timeout=timeout)


async def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll ``predicate()`` until true; fails after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
