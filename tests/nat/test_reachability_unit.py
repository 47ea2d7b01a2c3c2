"""node/reachability.py without a NAT: configuration checks, which addresses count as public,
and what two hosts on loopback conclude (nothing to offer anyone outside: private, no relay
served, no reservation attempted, so local tests and devnets pay nothing for it)."""

from __future__ import annotations

import os

import pytest
import trio

from node.host import GossipHost, HostConfig
from node.identity import NodeIdentity
from node.reachability import Reachable, ReachabilityConfig, is_public_ip


def test_public_ip_rule() -> None:
    assert is_public_ip("8.8.8.8") and is_public_ip("198.18.3.1")  # 198.18/15: the NAT lab
    for ip in ("10.1.0.2", "192.168.1.5", "127.0.0.1", "0.0.0.0", "100.64.0.1", "not an ip"):
        assert not is_public_ip(ip), ip


@pytest.mark.parametrize("kwargs,why", [
    ({"relay_service": "sometimes"}, "one of auto, on, off"),
    ({"max_circuits_per_peer": 0}, "must be positive"),
    ({"circuit_max_bytes": -1}, "must be positive"),
    ({"relays_to_reserve": -1}, "relays_to_reserve"),
])
def test_config_errors(kwargs, why) -> None:
    with pytest.raises(ValueError, match=why):
        ReachabilityConfig(**kwargs)


@pytest.mark.trio
async def test_two_hosts_on_loopback_are_private_and_neither_relays_nor_reserves() -> None:
    config = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))
    with trio.fail_after(30):  # hang guard
        async with trio.open_nursery() as nursery:
            a = await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)), config).run)
            b = await nursery.start(GossipHost(NodeIdentity.from_seed(os.urandom(32)), config).run)
            await b.connect(a.addrs()[0])
            for host in (a, b):
                while host.reachability.status is Reachable.UNKNOWN:
                    await trio.sleep(0.1)
            await trio.sleep(6)  # a reservation round (every 5 s while private) has passed
            for host in (a, b):
                r = host.reachability
                assert r.status is Reachable.PRIVATE and r.candidate_addrs() == []
                assert not r.serving_relay and r.reservations == {}
                assert host.counters["nat.reservation_refused"] == 0  # none was tried
                assert r.summary()["direct_peers"] == 1
            nursery.cancel_scope.cancel()
