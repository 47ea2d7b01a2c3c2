"""py -> js -> py and js -> py: gossiped offers cross a js-libp2p node (js-libp2p 3.3,
@libp2p/gossipsub 17.1; tests/interop/js_gossip_peer.mjs) between two py nodes that are not
connected to each other, and an offer published by js reaches both, with our libp2p patches
applied (node/libp2p_patches.py and the CPU fixes of node/libp2p_perf.py: batched yamux window
updates, buffered pubsub frames, the peer record once per stream, IDONTWANT only >= 1 KiB): the
wire (TCP + Noise + yamux, meshsub 1.2/1.1, strict signing, sha256(data) message ids) still
interoperates. One py node dials js, js dials the other. Needs ``node`` and the npm packages that
.ci/run installs into tests/interop/node_modules; skipped (with that reason) only when they are
absent. The patched <-> unpatched py-libp2p pair is tests/interop/test_py_patched_unpatched.py."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from node.libp2p_perf import BatchedYamux, FastPubsub
from node.offers import OFFER_TOPIC
from protocol.samples import make_offer, make_provider
from tests.node.offer_helpers import publisher, start_node, wait_until

HERE = Path(__file__).parent
SCRIPT = HERE / "js_gossip_peer.mjs"
NODE = shutil.which("node")


def _missing() -> str | None:
    if NODE is None:
        return "node (Node.js) is not installed"
    for package in ("libp2p", "@libp2p/gossipsub", "@libp2p/tcp", "@chainsafe/libp2p-noise",
                    "@chainsafe/libp2p-yamux", "@libp2p/identify", "@multiformats/multiaddr"):
        if not (HERE / "node_modules" / package / "package.json").is_file():
            return f"npm package {package} is not installed in tests/interop (see .ci/run)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


class JsPeer:
    """The js process: JSON lines out, multiaddrs to dial in."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.messages: list[dict] = []

    async def next_event(self, key: str, timeout: float = 10.0) -> dict:
        """The next event that has ``key``; an error event for what we asked fails at once."""
        with trio.fail_after(timeout):
            while True:
                while b"\n" not in self._buffer:
                    chunk = await self.process.stdout.receive_some(65536)
                    if not chunk:
                        raise RuntimeError("the js peer exited")
                    self._buffer += chunk
                line, self._buffer = self._buffer.split(b"\n", 1)
                event = json.loads(line)
                if "message" in event:
                    self.messages.append(event)
                if key in event:
                    return event
                if "publish_error" in event or "dial_error" in event:
                    raise RuntimeError(f"the js peer: {event}")

    async def publish(self, data: bytes) -> dict:
        await self.process.stdin.send_all(b"publish " + data.hex().encode() + b"\n")
        event = await self.next_event("published", timeout=10)
        assert event["published"] == hashlib.sha256(data).hexdigest()
        return event

    async def dial(self, addr: str) -> None:
        await self.process.stdin.send_all(addr.encode() + b"\n")
        event = await self.next_event("dialled", timeout=10)
        assert event["dialled"] == addr


async def test_offers_gossiped_py_to_js_to_py_and_js_to_py_with_the_patches_on(tmp_path):
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [NODE, str(SCRIPT), "--topic", OFFER_TOPIC, "--lifetime", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE)
        try:
            js = JsPeer(process)
            hello = await js.next_event("listening", timeout=20)
            js_addr = hello["listening"][0]
            js_id = ID.from_base58(hello["peer"])

            provider = await start_node(nursery, tmp_path / "provider.db")
            receiver = await start_node(nursery, tmp_path / "receiver.db")
            await provider.host.connect(js_addr)  # py dials js
            await js.dial(str(receiver.host.addrs()[0]))  # js dials py
            for node in (provider, receiver):
                await node.host.pubsub.wait_for_mesh(js_id, OFFER_TOPIC, timeout=15)
                assert isinstance(node.host.pubsub, FastPubsub)
                conn = node.host.host.get_network().connections[js_id][0]
                assert isinstance(conn.muxed_conn, BatchedYamux)

            async with trio.open_nursery() as prov:
                await prov.start(publisher(provider).run)
                await wait_until(lambda: receiver.book.held(provider.identity.public_key) is not None,
                                 timeout=15)
                prov.cancel_scope.cancel()
            network = receiver.host.host.get_network()
            assert provider.host.peer_id not in network.connections, "only through js"
            assert receiver.service.counters["offers.gossip.accept.offer"] >= 1
            if not js.messages:
                await js.next_event("message", timeout=5)
            assert js.messages, "js received (and relayed) the offer"

            # js -> py: an offer that js itself publishes (signed envelope from js's key)
            rng = random.Random(16)
            peer, _, binding = make_provider(rng)
            offer = make_offer(peer, binding, rng, receiver.service.now_ms())
            await js.publish(offer.encode())
            for node in (provider, receiver):
                await wait_until(lambda node=node: node.book.held(peer.public) is not None,
                                 timeout=15)
            # a 2nd round on the same streams: nothing was dropped for a missing peer record
            # after the first RPC, or for window credit that never came
            offer2 = make_offer(peer, binding, rng, receiver.service.now_ms(), seq=2)
            await js.publish(offer2.encode())
            for node in (provider, receiver):
                await wait_until(lambda node=node: node.book.held(peer.public).seq == 2,
                                 timeout=15)
        finally:
            with trio.move_on_after(5) as cleanup:
                cleanup.shield = True
                await process.stdin.aclose()
                await process.wait()
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()
