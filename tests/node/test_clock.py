"""node/clock.py: a node runs on the clock it is given (NodeConfig.clock)."""

import time
from decimal import Decimal

import trio

from node.chain import AsyncChain, Chain
from node.clock import Clock
from node.fake_nvml import FakeGpu, FakeNvml
from node.node import Node, NodeConfig, ProviderSettings
from protocol.params import Params


async def test_clock__a_node_stamps_its_offers_and_holds_with_its_own_clock(tmp_path):
    chain = Chain.embedded()
    chain.deploy_local_market(chain.dev_keys()[0])
    ahead_ms = 600_000  # ten minutes ahead of this machine
    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", uuid="GPU-clock-0",
                             memory_total_mib=24564, compute_capability=(8, 9))])
    settings = ProviderSettings(price_per_gpu_hour=Decimal("3.6"), publish_interval_s=0.2, nvml=nvml)
    node = Node(NodeConfig(tmp_path / "p", chain.dev_keys()[1], params=Params(), provider=settings,
                           name="p", clock=Clock(offset_ms=ahead_ms)), AsyncChain(chain))
    async with trio.open_nursery() as nursery:
        before = int(time.time() * 1000)
        await nursery.start(node.run)
        with trio.fail_after(10):
            while node.book.held(node.key.public) is None:
                await trio.sleep(0.05)
        created = node.book.held(node.key.public).offer.created_ms
        assert before + ahead_ms <= created <= int(time.time() * 1000) + ahead_ms
        assert node.desk.clock() >= before + ahead_ms
        nursery.cancel_scope.cancel()
