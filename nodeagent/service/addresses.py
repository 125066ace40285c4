"""The addresses of this network namespace's interfaces (what kube-proxy's NodePorts listen on by default)."""

from __future__ import annotations

from ipaddress import ip_address

import psutil

from nodeagent.cluster.model import IPAddress


def local_addresses() -> tuple[IPAddress, ...]:
    """Every address configured on an interface of this network namespace."""
    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name in ("AF_INET", "AF_INET6"):
                found.append(ip_address(addr.address.split("%")[0]))
    return tuple(sorted(set(found), key=lambda ip: (ip.version, int(ip))))
