"""The node's bounded table of peers (the store's ``peers`` rows), and rejoining from it.

Every ``interval_s``, and within 2 s of connecting to a new peer, the node records each peer it
has a direct connection to, with the
addresses it can dial it at again (the remote address of a connection we dialled, and the
peer's identify listen addresses that are not wildcards), and keeps the ``limit`` most recently
seen rows. At start, when no bootstrap peer could be reached (or none is configured), it dials
the ``rejoin`` most recently seen stored peers in parallel: a node restarted without its
bootstrap list rejoins the network it knew (specs/node.md, "Reachability").
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .reachability import is_relayed

if TYPE_CHECKING:
    from .host import GossipHost
    from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerTableConfig:
    limit: int = 200  # rows kept (most recently seen)
    rejoin: int = 8  # stored peers dialled at start when no bootstrap peer answered
    interval_s: float = 30.0
    per_group: int = 2  # stored peers dialled at start from one /24 (IPv4) or /48 (IPv6)


def address_group(addr: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) of a multiaddr's IP: many peer ids there cost an attacker
    one address block."""
    parts = addr.split("/")
    try:
        if parts[1] == "ip4":
            return str(ipaddress.ip_network(f"{parts[2]}/24", strict=False))
        if parts[1] == "ip6":
            return str(ipaddress.ip_network(f"{parts[2]}/48", strict=False))
    except (IndexError, ValueError):
        pass
    return addr


def choose_rejoin(rows: list, n: int, per_group: int) -> list:
    """The ``n`` most recent rows (peer, addrs, ...), at most ``per_group`` per address group of
    their first address: peer ids are free, so a restart must not dial only the identities one
    attacker connected with last (an eclipse); loopback and LAN peers share a group too."""
    out, groups = [], Counter()
    for row in rows:
        group = address_group(row[1][0])
        if groups[group] >= per_group:
            continue
        groups[group] += 1
        out.append(row)
        if len(out) >= n:
            break
    return out


class PeerTable:
    def __init__(self, host: GossipHost, store: Store, clock, config: PeerTableConfig = PeerTableConfig()):
        self.host, self.store, self.clock, self.config = host, store, clock, config
        self.rejoined: list[str] = []  # peer ids reached from the table at the last start

    def dialable(self) -> dict[str, list[str]]:
        """Directly connected peers and where to dial them again."""
        out: dict[str, list[str]] = {}
        network = self.host.host.get_network()
        store = self.host.host.get_peerstore()
        for peer, conns in list(network.connections.items()):
            conns = conns if isinstance(conns, list) else [conns]
            direct = [c for c in conns if not is_relayed(c)]
            if not direct:
                continue
            addrs: list[str] = []
            for conn in direct:
                if getattr(getattr(conn, "muxed_conn", None), "is_initiator", False):
                    addrs += [str(a) for a in conn.get_transport_addresses()]
            addrs += [str(a) for a in store.addrs(peer)]
            keep = []
            for a in addrs:
                a = a.split("/p2p/")[0]
                if "/ip4/0.0.0.0/" in a + "/" or "/p2p-circuit" in a or a in keep:
                    continue
                keep.append(a)
            if keep:
                out[peer.to_base58()] = [f"{a}/p2p/{peer.to_base58()}" for a in keep[:4]]
        return out

    async def record(self) -> None:
        now = self.clock.time()
        for peer, addrs in self.dialable().items():
            await self.store.upsert_peer(peer, addrs, now)
        await self.store.prune_peers(self.config.limit)

    async def rejoin(self) -> list[str]:
        """Dial the most recently seen stored peers (each under the host's dial timeout), at
        most ``per_group`` of them in one address group (:func:`choose_rejoin`)."""
        me = self.host.peer_id.to_base58()
        rows = choose_rejoin([r for r in await self.store.peers() if r[0] != me and r[1]],
                             self.config.rejoin, self.config.per_group)
        ok = await self.host.connect_all([r[1][0] for r in rows])
        self.rejoined = [r[0] for r, good in zip(rows, ok) if good]
        log.info("rejoined %d of %d stored peers", len(self.rejoined), len(rows))
        return self.rejoined

    async def run(self, bootstrap: bool) -> None:
        """``bootstrap``: whether bootstrap peers are configured (their dials are under way)."""
        network = self.host.host.get_network()
        if bootstrap:
            with trio.move_on_after(self.host.config.dial_timeout + 1):
                while not network.connections:
                    await trio.sleep(0.2)
        if not network.connections:
            await self.rejoin()
        recorded: set = set()
        next_record = trio.current_time()
        while True:
            # every interval_s, and within 2 s of a new peer (one found by node/discovery.py)
            await trio.sleep(2.0)
            peers = set(network.connections)
            if not peers or (peers <= recorded and trio.current_time() < next_record):
                continue
            recorded, next_record = peers, trio.current_time() + self.config.interval_s
            try:
                await self.record()
            except Exception:
                log.exception("recording peers failed")
