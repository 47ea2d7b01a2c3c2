"""Which of our addresses a renter can dial (the addresses a provider puts in its offers).

One rule, in one function (:func:`dialable_addrs`), for a node that is directly reachable:
the configured `node.announce` addresses when there are any; otherwise each bound listen
address, with an unspecified host (0.0.0.0 or ::) replaced by the machine's interface addresses.
An unspecified address is never dialable and is never returned. Reachability through NAT
(observed addresses, relays) extends this rule elsewhere; a node with nothing dialable refuses
to publish (:class:`NoDialableAddress`) rather than publish offers nobody can rent.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence

UNSPECIFIED = {"ip4": "0.0.0.0", "ip6": "::"}


class NoDialableAddress(Exception):
    """Nothing in node.listen/node.announce is dialable by another machine; str() is one line."""


def interface_addresses() -> list[str]:
    """This machine's interface IP addresses (IPv4 and IPv6), as text."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.append(a.address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    return out


def _usable(ip: str, family: str) -> bool:
    """An interface address another machine could dial: not loopback, link-local, unspecified
    or multicast (those cannot be reached, or reach only this machine)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if (addr.version == 4) != (family == "ip4"):
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast)


def _sort_key(ip: str) -> tuple:
    addr = ipaddress.ip_address(ip)
    return (not addr.is_global, addr.version, ip)  # public first, IPv4 before IPv6


def dialable_addrs(bound: Sequence[str], announce: Sequence[str], peer_id: str, *,
                   interfaces: Callable[[], Iterable[str]] = interface_addresses) -> tuple[str, ...]:
    """The addresses to publish, each ending in /p2p/<peer_id>.

    ``bound``: the listen addresses as bound (real ports; with or without /p2p/...);
    ``announce``: node.announce, taken as given. An empty result means nothing is dialable."""
    suffix = f"/p2p/{peer_id}"
    if announce:
        return tuple(dict.fromkeys(a if a.endswith(suffix) else a + suffix for a in announce))
    local: list[str] | None = None
    out: list[str] = []
    for addr in bound:
        addr = addr.removesuffix(suffix)
        parts = addr.split("/")  # "", "ip4", "0.0.0.0", "tcp", "4001", ...
        if len(parts) < 3 or parts[1] not in UNSPECIFIED:
            out.append(addr + suffix)
            continue
        if parts[2] != UNSPECIFIED[parts[1]]:
            out.append(addr + suffix)
            continue
        if local is None:
            local = sorted({ip for ip in interfaces() if _is_ip(ip)}, key=_sort_key)
        rest = "/".join(parts[3:])
        out.extend(f"/{parts[1]}/{ip}/{rest}{suffix}" for ip in local if _usable(ip, parts[1]))
    return tuple(dict.fromkeys(out))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def no_dialable_address_message(listen: Sequence[str]) -> str:
    return (f"no dialable address to put in offers: the node listens on {', '.join(listen)} and "
            "found no interface address another machine can reach; set node.announce in the "
            "config to the public address renters dial (e.g. announce = "
            "[\"/ip4/203.0.113.7/tcp/4001\"])")


__all__ = ["NoDialableAddress", "dialable_addrs", "interface_addresses",
           "no_dialable_address_message"]
