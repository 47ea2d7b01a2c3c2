"""A relay's limits hold against a peer that tries to exceed them (node.libp2p_nat_patches
GuardedRelay; issue 15). Real py-libp2p hosts on 127.0.0.1 speaking raw circuit relay v2 HOP
messages, as a hostile peer would; the destination is a sink that accepts every STOP."""

from __future__ import annotations

import os
from collections import Counter
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, StopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP, STOP_PROTOCOL_ID as STOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from node.host import build_libp2p_host
from node.identity import NodeIdentity
from node.libp2p_nat_patches import GuardedRelay
from node.reachability import ReachabilityConfig

LOCAL = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


class Lab:
    def __init__(self, stack: AsyncExitStack, config: ReachabilityConfig):
        self.stack, self.config = stack, config
        self.counters: Counter[str] = Counter()
        self.sunk: Counter[ID] = Counter()  # bytes each sink destination received

    async def host(self):
        h = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [LOCAL])
        await self.stack.enter_async_context(h.run([LOCAL]))
        return h

    async def relay(self):
        h = await self.host()
        relay = GuardedRelay(h, self.config.relay_limits(), self.config.guard_limits(), self.counters)
        await self.stack.enter_async_context(background_trio_service(relay))
        relay.set_serving(True)
        self.relay_host, self.relay_proto = h, relay
        return h

    async def sink(self):
        """A destination that accepts every relayed connection and reads it to the end."""
        h = await self.host()

        async def stop(stream):
            await read_delimited_msg(stream, StopMessage)
            await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS,
                                                          status=to_proto_status(StatusCode.OK)))
            try:
                while data := await stream.read(65536):
                    self.sunk[h.get_id()] += len(data)
            except Exception:
                pass

        h.set_stream_handler(STOP, stop)
        await self.connect(h)
        return h

    async def connect(self, h) -> None:
        await h.connect(info_from_p2p_addr(self.relay_host.get_addrs()[0]))

    async def hop(self, h, msg: HopMessage):
        stream = await h.new_stream(self.relay_host.get_id(), [HOP])
        await write_delimited_msg(stream, msg)
        with trio.fail_after(10):
            resp = await read_delimited_msg(stream, HopMessage)
        return StatusCode(resp.status), stream

    async def reserve(self, h, claimed: ID | None = None) -> StatusCode:
        msg = HopMessage(type=HopMessage.RESERVE)
        if claimed is not None:
            msg.peer.CopyFrom(PeerId(id=claimed.to_bytes()))
        status, stream = await self.hop(h, msg)
        await stream.close()
        return status

    async def circuit(self, h, dst: ID):
        return await self.hop(h, HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=dst.to_bytes())))


async def run_lab(config: ReachabilityConfig, body) -> None:
    with trio.fail_after(60):  # hang guard only
        async with AsyncExitStack() as stack:
            lab = Lab(stack, config)
            await lab.relay()
            await body(lab)


def fake_id() -> ID:
    return NodeIdentity.from_seed(os.urandom(32)).peer_id


@pytest.mark.trio
async def test_reserve_for_made_up_peer_ids_reserves_only_the_sender() -> None:
    async def body(lab: Lab) -> None:
        attacker = await lab.host()
        await lab.connect(attacker)
        for _ in range(5):
            assert await lab.reserve(attacker, claimed=fake_id()) is StatusCode.OK
        table = lab.relay_proto.resource_manager._reservations
        assert list(table) == [attacker.get_id()]  # py-libp2p 0.8.1 made 5 entries for 5 ids

    await run_lab(ReachabilityConfig(max_reservations=3), body)


@pytest.mark.trio
async def test_reservations_per_ip_and_disconnected_ones_free_their_slot() -> None:
    async def body(lab: Lab) -> None:
        peers = [await lab.host() for _ in range(3)]
        for p in peers:
            await lab.connect(p)
        assert await lab.reserve(peers[0]) is StatusCode.OK
        assert await lab.reserve(peers[1]) is StatusCode.OK
        # all on 127.0.0.1: the third from this address is refused
        assert await lab.reserve(peers[2]) is StatusCode.RESOURCE_LIMIT_EXCEEDED
        assert lab.counters["relay.reservation_refused"] == 1
        # one leaves: its reservation ends with its connection and the slot is free again
        await lab.relay_host.get_network().close_peer(peers[0].get_id())
        with trio.fail_after(10):
            while peers[0].get_id() in lab.relay_host.get_network().connections:
                await trio.sleep(0.05)
        assert await lab.reserve(peers[2]) is StatusCode.OK

    await run_lab(ReachabilityConfig(max_reservations_per_ip=2), body)


@pytest.mark.trio
async def test_circuits_per_peer_hold_for_the_source_too() -> None:
    async def body(lab: Lab) -> None:
        dst = await lab.sink()
        assert await lab.reserve(dst) is StatusCode.OK
        src = await lab.host()
        await lab.connect(src)
        open_streams = []
        for _ in range(2):
            status, stream = await lab.circuit(src, dst.get_id())
            assert status is StatusCode.OK
            open_streams.append(stream)
        status, _ = await lab.circuit(src, dst.get_id())
        assert status is StatusCode.RESOURCE_LIMIT_EXCEEDED
        assert lab.relay_proto.circuits == 2 and lab.counters["relay.circuit_refused"] == 1
        # closing one frees one slot (counted per circuit, not per peer)
        await open_streams[0].reset()
        with trio.fail_after(10):
            while lab.relay_proto.circuits > 1:
                await trio.sleep(0.05)
        status, _ = await lab.circuit(src, dst.get_id())
        assert status is StatusCode.OK

    await run_lab(ReachabilityConfig(max_circuits_per_peer=2), body)


@pytest.mark.trio
async def test_bytes_per_circuit() -> None:
    async def body(lab: Lab) -> None:
        dst = await lab.sink()
        assert await lab.reserve(dst) is StatusCode.OK
        src = await lab.host()
        await lab.connect(src)
        status, stream = await lab.circuit(src, dst.get_id())
        assert status is StatusCode.OK
        with trio.fail_after(20):
            try:
                for _ in range(100):  # 100 KiB offered against a 20,000-byte budget
                    await stream.write(b"x" * 1024)
                    await trio.sleep(0.01)
            except Exception:
                pass  # reset by the relay
            while lab.relay_proto.circuits:
                await trio.sleep(0.05)
        assert lab.counters["relay.circuit_bytes_exceeded"] == 1
        assert lab.sunk[dst.get_id()] <= 20_000  # never more than the budget got through

    await run_lab(ReachabilityConfig(circuit_max_bytes=20_000), body)


@pytest.mark.trio
async def test_an_idle_circuit_ends_at_its_duration() -> None:
    async def body(lab: Lab) -> None:
        dst = await lab.sink()
        assert await lab.reserve(dst) is StatusCode.OK
        src = await lab.host()
        await lab.connect(src)
        status, stream = await lab.circuit(src, dst.get_id())
        assert status is StatusCode.OK
        with trio.fail_after(20):
            while lab.relay_proto.circuits:  # nobody writes: only the deadline can end it
                await trio.sleep(0.05)
        assert lab.counters["relay.circuit_expired"] == 1
        with pytest.raises(Exception):
            with trio.fail_after(5):
                data = await stream.read(10)
                if not data:
                    raise EOFError
                await stream.write(b"after the end")

    await run_lab(ReachabilityConfig(circuit_max_seconds=1), body)
