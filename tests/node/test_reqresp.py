"""Length-prefixed request/response: framing unit tests and real hosts on 127.0.0.1."""

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamError

from node.reqresp import (
    FrameTooLarge,
    MalformedFrame,
    PeerClosed,
    ReadTimeout,
    encode_frame,
    encode_uvarint,
    open_request_stream,
    read_frame,
    request,
    serve,
)
from node.testing import connect_pairs, running_hosts

PROTO = "/gpumarket/test-echo/1.0.0"


class BytesStream:
    """Just enough of INetStream for read_frame: yields the given chunks, then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self.data = bytearray(b"".join(chunks))

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.data:
            raise StreamEOF()
        out, self.data = bytes(self.data[:n]), self.data[n:]
        return out


@given(st.binary(max_size=2000))
def test_frame__round_trips(payload):
    out = trio.run(read_frame, BytesStream(encode_frame(payload)))
    assert out == payload


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_uvarint__matches_leb128(n):
    enc = encode_uvarint(n)
    value = sum((b & 0x7F) << (7 * i) for i, b in enumerate(enc))
    assert value == n
    assert all(b & 0x80 for b in enc[:-1]) and not enc[-1] & 0x80
    assert len(enc) == max(1, (n.bit_length() + 6) // 7)


def test_uvarint__known_vectors():
    assert encode_uvarint(0) == b"\x00"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"


async def test_frame__oversized_prefix_refused_before_body():
    # announces 1 MiB but sends no body: refused from the prefix alone
    with pytest.raises(FrameTooLarge):
        await read_frame(BytesStream(encode_uvarint(1 << 20)), max_frame=1000)
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 1001, max_frame=1000)
    assert await read_frame(BytesStream(encode_frame(b"x" * 1000)), max_frame=1000) == b"x" * 1000


async def test_frame__truncated_and_malformed():
    with pytest.raises(PeerClosed):
        await read_frame(BytesStream(encode_uvarint(10), b"abc"))
    with pytest.raises(PeerClosed):
        await read_frame(BytesStream())
    with pytest.raises(MalformedFrame):
        await read_frame(BytesStream(b"\x85\x00"))  # non-minimal encoding of 5
    with pytest.raises((MalformedFrame, FrameTooLarge)):
        await read_frame(BytesStream(b"\x80" * 11), max_frame=2**70)


async def test_frame__read_deadline_covers_a_trickling_peer(autojump_clock):
    class Trickle:
        async def read(self, n):
            await trio.sleep(0.4)  # one byte every 0.4 s: each read is "alive", the frame is not
            return b"\x7f" if n == 1 else b"x"

    with pytest.raises(ReadTimeout):
        await read_frame(Trickle(), timeout=1.0)


async def upper(req, peer):
    return req.upper()


async def test_reqresp__round_trip_fresh_and_reused_streams():
    async with running_hosts(2) as (a, b):
        serve(b.host, PROTO, upper)
        await connect_pairs([a, b], [(0, 1)])
        assert await request(a.host, b.peer_id, PROTO, b"hello") == b"HELLO"
        assert await request(a.host, b.peer_id, PROTO, b"") == b""
        async with await open_request_stream(a.host, b.peer_id, PROTO) as rs:
            for i in range(5):
                assert await rs.request(b"req %d" % i) == b"REQ %d" % i


async def test_reqresp__oversized_request_is_refused_and_server_keeps_serving():
    async with running_hosts(2) as (a, b):
        serve(b.host, PROTO, upper, max_frame=1024)
        await connect_pairs([a, b], [(0, 1)])
        # the client's own limit is larger, so it sends; the server resets the stream
        with pytest.raises(PeerClosed):
            await request(a.host, b.peer_id, PROTO, b"x" * 5000, max_frame=10_000)
        assert await request(a.host, b.peer_id, PROTO, b"x" * 1024, max_frame=10_000) == b"X" * 1024


async def test_reqresp__oversized_response_is_refused_by_client():
    async def big(req, peer):
        return b"y" * 4096

    async with running_hosts(2) as (a, b):
        serve(b.host, PROTO, big)
        await connect_pairs([a, b], [(0, 1)])
        with pytest.raises(FrameTooLarge):
            await request(a.host, b.peer_id, PROTO, b"q", max_frame=1000)


async def test_reqresp__silent_stream_is_timed_out_while_another_works():
    async with running_hosts(2) as (a, b):
        serve(b.host, PROTO, upper, read_timeout=0.5)
        await connect_pairs([a, b], [(0, 1)])
        with trio.fail_after(5):
            silent = await a.host.new_stream(b.peer_id, [TProtocol(PROTO)])
        t0 = trio.current_time()
        # while the silent stream is open, other requests are answered
        assert await request(a.host, b.peer_id, PROTO, b"busy?") == b"BUSY?"
        # the server gives up on the silent one: its read ends (EOF or reset). Nothing else ends
        # it (the client never writes nor closes), so the guard is only against a hang.
        with trio.fail_after(30):
            with pytest.raises(StreamError):
                while True:
                    if not await silent.read(1):
                        raise StreamEOF()
        waited = trio.current_time() - t0
        assert waited >= 0.4  # by the 0.5 s read timeout, not at once
        assert await request(a.host, b.peer_id, PROTO, b"still") == b"STILL"


async def test_reqresp__handler_error_resets_only_that_stream():
    async def picky(req, peer):
        if req == b"boom":
            raise ValueError("handler bug")
        return req

    async with running_hosts(2) as (a, b):
        serve(b.host, PROTO, picky)
        await connect_pairs([a, b], [(0, 1)])
        with pytest.raises(PeerClosed):
            await request(a.host, b.peer_id, PROTO, b"boom", timeout=3)
        assert await request(a.host, b.peer_id, PROTO, b"ok") == b"ok"
