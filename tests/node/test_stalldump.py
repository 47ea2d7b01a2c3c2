"""node/stalldump.py: the snapshot tells what a connection holds and where its tasks wait, on
real hosts on 127.0.0.1; a slow stream open is dumped with the caller's stage."""

from __future__ import annotations

import json

import trio
from libp2p.custom_types import TProtocol

from node.stalldump import StallDumper, snapshot
from node.testing import running_hosts

PROTOCOL = TProtocol("/gpumarket/test/stalldump/1")


async def test_snapshot_shows_unread_bytes_windows_and_where_the_handler_waits():
    done = trio.Event()
    async with running_hosts(2) as (a, b):
        async def never_reads(stream):
            await done.wait()

        b.host.set_stream_handler(PROTOCOL, never_reads)
        await a.connect(b.addrs()[0])
        stream = await a.host.new_stream(b.peer_id, [PROTOCOL])
        await stream.write(b"x" * 5000)
        sid = stream.muxed_stream.stream_id
        with trio.fail_after(10):
            while True:
                conn = next(c for c in snapshot(b.host, "test")["connections"]
                            if c["peer"] == str(a.peer_id)[-8:])
                row = next((s for s in conn["streams"] if s["id"] == sid), None)
                if row is not None and row["unread"] == 5000:
                    break
                await trio.sleep(0.01)
        assert row["proto"] == PROTOCOL
        assert row["recv_window"] <= row["target"] - 5000  # the unread bytes are not credited
        assert conn["write_lock"]["locked"] is False
        assert conn["accept_backlog"]["max"] == 10
        assert conn["socket"]["kernel_unread"] == 0  # the read loop took it off the socket
        assert any("handle_incoming" in f or "read" in f for f in conn["read_loop"])
        handler = next(h for h in conn["inbound_handlers"] if h["stream"] == sid)
        assert any("never_reads" in f for f in handler["stack"])
        done.set()


async def test_a_slow_stream_open_is_dumped_with_the_callers_stage(tmp_path):
    path = tmp_path / "stall.jsonl"
    async with running_hosts(2) as (a, b):
        b.host.set_stream_handler(PROTOCOL, lambda stream: stream.close())
        await a.connect(b.addrs()[0])
        real = a.host.new_stream

        async def slow_open(peer, protocols):
            await trio.sleep(0.5)  # stands in for a stream open that waits on its peer
            return await real(peer, protocols)

        a.host.new_stream = slow_open
        dumper = StallDumper(a.host, str(path), after_s=0.2)
        async with trio.open_nursery() as nursery:
            await nursery.start(dumper.run)
            stream = await a.host.new_stream(b.peer_id, [PROTOCOL])
            await stream.close()
            await a.host.new_stream(b.peer_id, [PROTOCOL])  # a second one, also slow
            nursery.cancel_scope.cancel()
    dumps = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["call"] for d in dumps] == [1, 1, 2, 2]  # at 0.2 s and 0.44 s each
    assert all(d["why"] == "slow_new_stream" and d["protocols"] == [PROTOCOL] for d in dumps)
    assert any("slow_open" in f for f in dumps[0]["caller_stack"])
    assert dumps[0]["connections"][0]["peer"] == str(b.peer_id)[-8:]


def test_a_dump_never_raises_into_the_node(tmp_path):
    """The dumper runs inside the node's nursery: a snapshot that fails (here a host whose
    network is gone; in a soak, a socket closed while it was read) is written as an error
    record, never raised (it once ended a provider under attack)."""
    class Broken:
        def get_network(self):
            raise ValueError("file descriptor cannot be a negative integer (-1)")

    path = tmp_path / "stall.jsonl"

    async def main():
        StallDumper(Broken(), str(path)).dump("signal")

    trio.run(main)
    record = json.loads(path.read_text())
    assert record["why"] == "signal" and "negative integer" in record["error"]
