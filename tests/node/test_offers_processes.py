"""Propagation across OS processes: provider (process) -> relay (process) -> renter (this
process), then the provider's shutdown withdrawal evicts the offer along the same path."""

import json
import os
import subprocess
import sys

import trio

from node.offers import OFFER_TOPIC
from tests.node.offer_helpers import start_node, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Proc:
    def __init__(self, proc):
        self.proc = proc
        self.buf = b""

    async def line(self, timeout=20.0):
        with trio.fail_after(timeout):
            while b"\n" not in self.buf:
                chunk = await self.proc.stdout.receive_some(4096)
                assert chunk, "process exited early"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


async def spawn(nursery, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.node._offer_node", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    return Proc(proc)


async def test_processes__offer_crosses_two_processes_and_shutdown_withdrawal_follows(tmp_path):
    async with trio.open_nursery() as nursery:
        procs = []
        try:
            relay = await spawn(nursery, "--db", str(tmp_path / "relay.db"))
            procs.append(relay)
            relay_addr = (await relay.line())["addr"]
            renter = await start_node(nursery, tmp_path / "renter.db")
            await renter.host.connect(relay_addr)
            from libp2p.peer.id import ID
            relay_id = ID.from_base58(relay_addr.rsplit("/p2p/", 1)[1])
            await renter.host.pubsub.wait_for_mesh(relay_id, OFFER_TOPIC, timeout=10)

            provider = await spawn(nursery, "--db", str(tmp_path / "provider.db"),
                                   "--bootstrap", relay_addr, "--provide")
            procs.append(provider)
            await provider.line()  # its address
            published = await provider.line()
            digest = bytes.fromhex(published["published"])
            await wait_until(lambda: any(e.digest == digest for e in renter.book), timeout=5)
            assert renter.service.counters["offers.gossip.accept.offer"] == 1

            await provider.proc.stdin.aclose()  # graceful stop: the provider withdraws
            assert (await provider.line())["stopped"]
            await wait_until(lambda: len(renter.book) == 0, timeout=5)
            assert renter.service.counters["offers.gossip.accept.withdrawal"] == 1
            with trio.fail_after(10):
                assert await provider.proc.wait() == 0
            await relay.proc.stdin.aclose()
            assert (await relay.line())["stopped"]
            with trio.fail_after(10):
                assert await relay.proc.wait() == 0
        finally:
            for p in procs:
                if p.proc.returncode is None:
                    p.proc.kill()
                    with trio.move_on_after(5):
                        await p.proc.wait()
            nursery.cancel_scope.cancel()
