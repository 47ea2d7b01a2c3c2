"""A small offer node in its own process, for cross-process tests (not a product CLI).

python -m tests.node._offer_node --db PATH [--bootstrap ADDR] [--provide]
Prints JSON lines: {"addr": ...} once listening, {"published": digest_hex, "seq": n} after a
provider's first publish. Runs until stdin closes, then shuts down gracefully (a provider
withdraws its offer) and prints {"stopped": true}.
"""

import argparse
import json
import os
import sys

import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.offers import OFFER_TOPIC, OfferService, OfferServiceConfig
from node.store import Store
from node.testing import LOOPBACK
from tests.node.offer_helpers import TEST_PARAMS, Node, publisher


def say(**kw):
    print(json.dumps(kw), flush=True)


async def main(args):
    identity = NodeIdentity.from_seed(os.urandom(32))
    async with trio.open_nursery() as nursery:
        host = await nursery.start(GossipHost(identity, HostConfig(listen_addrs=LOOPBACK)).run)
        store = await Store.open(args.db, synchronous="NORMAL")
        service = await nursery.start(OfferService(host, store, TEST_PARAMS,
                                                   config=OfferServiceConfig(flush_interval_s=0.2)).run)
        say(addr=str(host.addrs()[0]))
        pub_scope = trio.CancelScope()
        if args.bootstrap:
            await host.connect(args.bootstrap)
            peer = args.bootstrap.rsplit("/p2p/", 1)[1]
            from libp2p.peer.id import ID
            await host.pubsub.wait_for_mesh(ID.from_base58(peer), OFFER_TOPIC, timeout=10)
        if args.provide:
            async def provide(task_status=trio.TASK_STATUS_IGNORED):
                with pub_scope:
                    await publisher(Node(host, service, store, identity)).run(task_status=task_status)

            pub = await nursery.start(provide)
            say(published=pub.live.digest.hex(), seq=pub.live.seq)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some(4096):
            pass
        pub_scope.cancel()  # the publisher withdraws on its way out
        await trio.sleep(0.5)  # let the withdrawal leave before the connections close
        with trio.move_on_after(2):
            await host.host.close()
        say(stopped=True)
        nursery.cancel_scope.cancel()
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--bootstrap")
    parser.add_argument("--provide", action="store_true")
    trio.run(main, parser.parse_args())
