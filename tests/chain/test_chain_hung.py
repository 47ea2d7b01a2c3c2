"""The chain client against a hung JSON-RPC endpoint: a real TCP server on loopback that accepts
connections and never answers (optionally answering eth_chainId, so a Chain can be built first).
A call must fail within its timeout with a clear error while trio keeps running other tasks.

No test here asserts an upper bound on wall-clock time. The server drops an unanswered request
after `HOLD_S`, well before any timeout the client would otherwise fall back on (web3's 30 s), so
a call that did not end by its own timeout ends with another error ("cannot connect": the
connection closed) than the timeout's, and the error text proves which ended it."""

import json
import socket
import threading
import time

import pytest
import trio

from node.chain import RPC_ATTEMPTS, AsyncChain, Chain, RpcUnavailableError

CHAIN_ID = 31337
HOLD_S = 20.0  # the server closes a request it never answered after this long


class SilentRpc:
    """Accepts TCP connections on 127.0.0.1 and answers nothing, except eth_chainId when
    `answer_chain_id`. An unanswered request's connection is closed after `HOLD_S`; `close()`
    drops every connection, which ends the client's requests."""

    def __init__(self, *, answer_chain_id: bool) -> None:
        self.answer_chain_id = answer_chain_id
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.requests: list[str] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.held.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        unanswered_since: float | None = None
        while not self.closed.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                if unanswered_since is not None and time.monotonic() - unanswered_since > HOLD_S:
                    conn.close()
                    return
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if not sep:
                continue
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) < length:
                continue
            request = json.loads(body[:length])
            buf = body[length:]
            self.requests.append(request["method"])
            if self.answer_chain_id and request["method"] == "eth_chainId":
                reply = json.dumps({"jsonrpc": "2.0", "id": request["id"],
                                    "result": hex(CHAIN_ID)}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
            elif unanswered_since is None:  # anything else: never answered
                unanswered_since = time.monotonic()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for conn in self.held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.thread.join(2)


@pytest.fixture
def silent():
    servers = []

    def make(**kw) -> SilentRpc:
        servers.append(SilentRpc(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_chain__connect_to_a_silent_endpoint_fails_after_its_request_timeouts(silent):
    server = silent(answer_chain_id=False)
    with pytest.raises(RpcUnavailableError) as err:
        Chain.connect(server.url, timeout_s=0.3)
    # each attempt ended by its 0.3 s request timeout (not the server's close after HOLD_S)
    assert "does not answer" in str(err.value) and "request timeout" in str(err.value)
    assert server.requests.count("eth_chainId") == RPC_ATTEMPTS


async def test_async_chain__hung_call_fails_within_its_timeout_while_trio_runs_on(silent):
    server = silent(answer_chain_id=True)
    # The HTTP timeout (30 s) is far longer than the call's (1 s): only abandoning the worker
    # thread can end the call in time.
    chain = Chain.connect(server.url, chain_id=CHAIN_ID, timeout_s=30)
    assert chain.chain_id == CHAIN_ID
    achain = AsyncChain(chain, timeout_s=1.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.05)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        t0 = trio.current_time()
        with pytest.raises(RpcUnavailableError) as err:
            await achain.run(chain.now_s)
        first = trio.current_time() - t0
        # A second call waits for the one worker thread (still stuck) within its own timeout.
        t1 = trio.current_time()
        with pytest.raises(RpcUnavailableError) as err2:
            await achain.native_balance(b"\x01" * 20)
        second = trio.current_time() - t1
        nursery.cancel_scope.cancel()
    assert first >= 1.0 and second >= 1.0  # neither gave up before its timeout
    # both ended by AsyncChain's 1 s timeout: not the HTTP timeout (30 s), nor the server's close
    assert "now_s got no answer within 1 s" in str(err.value)
    assert "got no answer within 1 s" in str(err2.value)
    assert ticks >= 20  # the event loop kept running other tasks during both hung calls
    assert "eth_getBlockByNumber" in server.requests


async def test_async_chain__the_request_timeout_ends_a_hung_worker_thread(silent):
    server = silent(answer_chain_id=True)
    chain = Chain.connect(server.url, chain_id=CHAIN_ID, timeout_s=0.3)
    achain = AsyncChain(chain, timeout_s=30)
    with pytest.raises(RpcUnavailableError) as err:
        await achain.run(chain.now_s)
    # ended by the 0.3 s request timeout: not AsyncChain's 30 s ("got no answer within 30 s"),
    # nor the server's close after HOLD_S ("cannot connect")
    assert "now_s failed" in str(err.value) and "request timeout" in str(err.value)
    # The thread ended by itself, so the limiter is free: the next call starts at once and
    # fails the same way (not by waiting out a stuck predecessor).
    with pytest.raises(RpcUnavailableError) as err:
        await achain.run(chain.now_s)
    # its own request timeout again (waiting out a predecessor would read "within 30 s")
    assert "now_s failed" in str(err.value) and "request timeout" in str(err.value)
    assert server.requests.count("eth_getBlockByNumber") == 2 * RPC_ATTEMPTS
