"""`/gpumarket/exec/1` end to end in one process: the renter's control socket, its node, the
libp2p stream, the provider's desk and a Docker exec in the rental's container (real daemon)."""

from __future__ import annotations

import fcntl
import functools
import os
import select
import signal
import struct
import sys
import termios
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol

from node.access import (EXEC_PROTOCOL, MAX_EXEC_FRAME, REFUSED, STDERR, STDOUT, ExecRefused, Open, forward_listen,
                         exec_session, parse_refused)
from node.control import SOCKET_NAME, ControlServer
from node.node import Node, NodeConfig
from node.reqresp import read_frame, write_frame
from tests.docker_image import docker_client, no_daemon_reason
from tests.node.test_rental_containers import PARAMS, Market, _gone, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())


class Output:
    def __init__(self) -> None:
        self.data = {STDOUT: bytearray(), STDERR: bytearray()}
        self.changed = trio.Event()

    def __call__(self, kind: int, data: bytes) -> None:
        self.data[kind] += data
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, text: bytes, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while text not in self.data[STDOUT]:
                await self.changed.wait()


async def raw_exec(node: Node, provider: Node, frame: bytes) -> tuple[str, str]:
    """Open the exec stream from `node` directly and send one frame: the provider's answer."""
    stream = await node.host.host.new_stream(provider.peer_id, [TProtocol(EXEC_PROTOCOL)])
    try:
        await write_frame(stream, frame, max_frame=MAX_EXEC_FRAME)
        answer = await read_frame(stream, max_frame=MAX_EXEC_FRAME, timeout=10)
    finally:
        await stream.close()
    assert answer[0] == REFUSED
    return parse_refused(answer)


async def test_exec__run_shell_and_every_refusal(tmp_path):
    market = Market(tmp_path)
    await trio.sleep(market.chain.lead_s())
    provider, renter = market.provider(), market.renter
    other = Node(NodeConfig(tmp_path / "o", market.keys[3], params=PARAMS, name="other",
                            chain_poll_s=0.3), market.achain)
    control = ControlServer(renter, renter.data_dir)
    sock = str(renter.data_dir / SOCKET_NAME)
    try:
        async with trio.open_nursery() as nursery:
            for n in (provider, renter, other):
                await nursery.start(n.run)
            await nursery.start(control.run)
            await renter.host.connect(provider.addrs()[0])
            await other.host.connect(provider.addrs()[0])
            rental = await market.rent(provider)
            aid = rental.agreement_id.hex()
            await wait_until(lambda: _true(provider.rentals[rental.agreement_id].access is not None), 20, "access")

            async def session(argv, *, tty=False, chunks=None, resizes=None, rows=0, cols=0):
                out = Output()
                code = await exec_session(sock, control.token, aid[:12], argv, tty=tty, rows=rows,
                                          cols=cols, input_chunks=chunks, resizes=resizes, out=out)
                return code, out

            # run: stdout and stderr apart, the exit code back
            code, out = await session(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (code, bytes(out.data[STDOUT]), bytes(out.data[STDERR])) == (3, b"out\n", b"err\n")
            # stdin reaches the command, and its end of file too
            async def hello():
                yield b"hello " * 20_000  # 120 kB: several frames each way
            code, out = await session(["cat"], chunks=hello())
            assert code == 0 and bytes(out.data[STDOUT]) == b"hello " * 20_000
            # a command that does not exist: the shell's 127, not a hang
            code, out = await session(["sh", "-c", "no-such-command"])
            assert code == 127

            # shell: a terminal of the asked size, resized, Ctrl-C reaches the foreground job
            typed = trio.open_memory_channel(16)
            sizes = trio.open_memory_channel(4)

            async def from_channel(rx):
                async for item in rx:
                    yield item

            shell_out = Output()
            result = []

            async def shell():
                result.append(await exec_session(sock, control.token, aid, [], tty=True, rows=40, cols=100,
                                                 input_chunks=from_channel(typed[1]),
                                                 resizes=from_channel(sizes[1]), out=shell_out))

            nursery.start_soon(shell)
            await typed[0].send(b"stty size; echo READY\r")
            await shell_out.wait_for(b"40 100")
            await sizes[0].send((50, 120))
            await trio.sleep(0.5)
            await typed[0].send(b"stty size\r")
            await shell_out.wait_for(b"50 120")
            await typed[0].send(b"sleep 60; echo NOT-$((1+1))-INTERRUPTED\r")
            await trio.sleep(0.5)
            await typed[0].send(b"\x03")  # Ctrl-C
            await typed[0].send(b"echo AFTER-$((40+2))\r")
            await shell_out.wait_for(b"AFTER-42", timeout=10)
            await typed[0].send(b"exit 7\r")
            with trio.fail_after(10):
                while not result:
                    await trio.sleep(0.05)
            assert result == [7] and b"NOT-2-INTERRUPTED" not in shell_out.data[STDOUT]

            # the same through the `gpumarket` command, a process of its own
            cli = [sys.executable, "-m", "node.cli", "--data-dir", str(renter.data_dir)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            done = await trio.run_process(cli + ["run", aid[:10], "--", "sh", "-c", "tr a-z A-Z; exit 5"],
                                          stdin=b"piped in\n", capture_stdout=True,
                                          capture_stderr=True, check=False, env=env)
            assert (done.returncode, done.stdout) == (5, b"PIPED IN\n"), done.stderr
            await shell_in_a_terminal(cli, env, aid)

            # refusals, each counted by the provider
            desk = provider.exec_desk
            request = Open(rental.agreement_id, False, 0, 0, ("true",)).encode()
            assert (await raw_exec(other, provider, request))[0] == "not_renter"
            unknown = Open(b"\x07" * 32, False, 0, 0, ("true",)).encode()
            assert (await raw_exec(renter, provider, unknown))[0] == "unknown_agreement"
            assert (await raw_exec(renter, provider, b"\x01\xc1garbage"))[0] == "bad_open"
            assert (await raw_exec(renter, provider, Open(rental.agreement_id, False, 0, 0, ()).encode()))[0] == "bad_open"
            # through the renter's node: an agreement it does not hold is refused there
            with pytest.raises(ExecRefused, match="no rental"):
                await exec_session(sock, control.token,
                                   "ff" * 8, ["true"], tty=False, out=Output())

            # a session open when the rental ends is cut with rental_over; later ones refused
            long_out = Output()
            cut = []

            async def long_running():
                try:
                    await exec_session(sock, control.token, aid, ["sh", "-c", "echo UP; sleep 60"],
                                       tty=False, out=long_out)
                except ExecRefused as exc:
                    cut.append(exc.code)

            nursery.start_soon(long_running)
            await long_out.wait_for(b"UP")
            await renter.stop_rental(rental.agreement_id)
            await wait_until(lambda: _gone(provider, rental.agreement_id), 30, "teardown")
            with trio.fail_after(10):
                while not cut:
                    await trio.sleep(0.05)
            assert cut == ["rental_over"]
            with pytest.raises(ExecRefused) as refused:
                await session(["true"])
            assert refused.value.code == "rental_over"
            done = await trio.run_process(cli + ["run", aid, "--", "true"], capture_stdout=True,
                                          capture_stderr=True, check=False, env=env)
            assert done.returncode == 125 and b"refused (rental_over)" in done.stderr
            assert desk.rejected == {"not_renter": 1, "unknown_agreement": 1, "bad_open": 2,
                                     "rental_over": 3}
            nursery.cancel_scope.cancel()
    finally:
        for c in docker_client().containers.list(
                all=True, filters={"label": f"gpumarket.provider={provider.peer_id.to_base58()}"}):
            c.remove(force=True)


async def shell_in_a_terminal(cli: list[str], env: dict, aid: str) -> None:
    """`gpumarket shell` on a pseudo-terminal of 30x90, resized to 33x91 (SIGWINCH)."""
    main_fd, child_fd = os.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 90, 0, 0))
    seen = bytearray()

    async def expect(text: bytes) -> None:
        with trio.move_on_after(15):
            while text not in seen:
                await trio.to_thread.run_sync(lambda: select.select([main_fd], [], [], 0.2))
                try:
                    seen.extend(os.read(main_fd, 65536))
                except BlockingIOError:
                    pass
        assert text in seen, bytes(seen)

    os.set_blocking(main_fd, False)
    async with trio.open_nursery() as n:
        proc = await n.start(functools.partial(trio.run_process, cli + ["shell", aid], stdin=child_fd,
                                               stdout=child_fd, stderr=child_fd, check=False, env=env))
        os.close(child_fd)
        await expect(b"/ # ")  # typed before the command set the terminal raw, it would be flushed
        os.write(main_fd, b"stty size\r")
        await expect(b"30 90")
        fcntl.ioctl(main_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 91, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        await trio.sleep(0.5)
        os.write(main_fd, b"stty size\r")
        await expect(b"33 91")
        os.write(main_fd, b"exit 4\r")
    assert proc.returncode == 4
    os.close(main_fd)


async def _true(value: bool) -> bool:
    return value


async def http_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        body = bytearray()
        try:
            while data := await stream.receive_some(65536):
                body += data
        except trio.BrokenResourceError:  # reset: the forward was refused
            pass
    return bytes(body)


async def test_forward__many_connections_to_a_server_in_the_container_and_refusals(tmp_path):
    market = Market(tmp_path)
    await trio.sleep(market.chain.lead_s())
    provider, renter = market.provider(), market.renter
    control = ControlServer(renter, renter.data_dir)
    sock = str(renter.data_dir / SOCKET_NAME)
    errors: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            for n in (provider, renter):
                await nursery.start(n.run)
            await nursery.start(control.run)
            await renter.host.connect(provider.addrs()[0])
            rental = await market.rent(provider)
            aid = rental.agreement_id.hex()
            await wait_until(lambda: _true(provider.rentals[rental.agreement_id].access is not None), 20, "access")
            container = docker_client().containers.get(
                f"gpumarket-{aid[:16]}")
            # an HTTP server in the container, serving a 3 MB file and a small one
            container.exec_run(["sh", "-c", "mkdir -p /www && echo hello-from-the-container > /www/index.html"
                                " && dd if=/dev/urandom of=/www/big bs=1M count=3 2>/dev/null"])
            big = container.exec_run(["sh", "-c", "md5sum /www/big"]).output.split()[0].decode()
            container.exec_run(["httpd", "-f", "-p", "8000", "-h", "/www"], detach=True)
            await trio.sleep(0.5)
            local = await nursery.start(forward_listen, sock, control.token, aid[:12], 8000, 0, errors.append)
            body = await http_get(local, "/index.html")
            assert body.endswith(b"hello-from-the-container\n"), body[:200]
            results: dict[int, bytes] = {}

            async def fetch(i: int) -> None:
                results[i] = await http_get(local, "/big")

            async with trio.open_nursery() as many:  # several connections at once
                for i in range(4):
                    many.start_soon(fetch, i)
            import hashlib
            for data in results.values():
                assert hashlib.md5(data.split(b"\r\n\r\n", 1)[1]).hexdigest() == big
            assert provider.exec_desk.forwarded == 5 and not errors

            # a port nothing listens on: refused with the reason, counted
            closed = await nursery.start(forward_listen, sock, control.token, aid, 8001, 0, errors.append)
            assert await http_get(closed, "/") == b""
            with trio.fail_after(10):
                while not errors:
                    await trio.sleep(0.05)
            assert errors[0].startswith("refused (port_closed)")
            assert provider.exec_desk.rejected == {"port_closed": 1}

            # cp both ways through the `gpumarket` command: a directory in, then back out
            cli = [sys.executable, "-m", "node.cli", "--data-dir", str(renter.data_dir)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            src = tmp_path / "payload"
            (src / "sub").mkdir(parents=True)
            (src / "sub" / "data.bin").write_bytes(os.urandom(200_000))
            (src / "note.txt").write_text("hello\n")
            done = await trio.run_process(cli + ["cp", str(src), f"{aid[:12]}:/www"], capture_stdout=True,
                                          capture_stderr=True, check=False, env=env)
            assert done.returncode == 0, done.stderr
            assert container.exec_run(["cat", "/www/payload/note.txt"]).output == b"hello\n"
            back = tmp_path / "back"
            back.mkdir()
            done = await trio.run_process(cli + ["cp", f"{aid[:12]}:/www/payload", str(back)],
                                          capture_stdout=True, capture_stderr=True, check=False, env=env)
            assert done.returncode == 0, done.stderr
            assert (back / "payload" / "sub" / "data.bin").read_bytes() == (src / "sub" / "data.bin").read_bytes()
            done = await trio.run_process(cli + ["cp", f"{aid[:12]}:/no/such/path", str(back)],
                                          capture_stdout=True, capture_stderr=True, check=False, env=env)
            assert done.returncode == 125 and b"refused (copy_failed)" in done.stderr, done.stderr
            assert provider.exec_desk.copied == 2
            nursery.cancel_scope.cancel()
    finally:
        for c in docker_client().containers.list(
                all=True, filters={"label": f"gpumarket.provider={provider.peer_id.to_base58()}"}):
            c.remove(force=True)
