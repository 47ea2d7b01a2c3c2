"""AutoNAT dial-back (node.libp2p_nat_patches.DialBackAutoNAT): the server must dial a new
connection; py-libp2p 0.8.1 reused the one the request came on and so answered OK to everyone.
On 127.0.0.1 (the NAT topology tests show the same on real NATs: tests/nat/test_nat_rental.py)."""

from __future__ import annotations

import os
import socket

import multiaddr
import pytest
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.peerinfo import info_from_p2p_addr

from node.host import build_libp2p_host
from node.identity import NodeIdentity
from node.libp2p_nat_patches import DialBackAutoNAT

LOCAL = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


async def ask(server_cls, addr_of_client) -> int:
    server = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [LOCAL])
    client = build_libp2p_host(NodeIdentity.from_seed(os.urandom(32)), [LOCAL])
    with trio.fail_after(30):  # hang guard
        async with server.run([LOCAL]), client.run([LOCAL]):
            server_cls(server)
            asker = AutoNATService(client, serve=False)
            await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
            status, _ = await asker.query_server(server.get_id(),
                                                 [addr_of_client(client).to_bytes()], timeout=20)
            return status


def unreachable(client) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{closed_port()}")


def listening(client) -> multiaddr.Multiaddr:
    return client.get_transport_addrs()[0]


@pytest.mark.trio
async def test_dial_back_to_an_address_nobody_listens_on_is_an_error() -> None:
    assert await ask(DialBackAutoNAT, unreachable) == Message.E_DIAL_ERROR


@pytest.mark.trio
async def test_dial_back_to_the_listen_address_is_ok() -> None:
    assert await ask(DialBackAutoNAT, listening) == Message.OK


@pytest.mark.trio
async def test_upstream_server_says_ok_to_an_unreachable_address() -> None:
    """The bug DialBackAutoNAT fixes, kept as a record: if this starts failing, py-libp2p has
    fixed it upstream and the patch can go (see node/libp2p_nat_patches.py)."""
    assert await ask(AutoNATService, unreachable) == Message.OK
