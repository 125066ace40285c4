"""The tunnel's sockets in a pod's network namespace, for both IP families.

IPv4 sockets are `nodeagent.kernel.netns`'s, unchanged. IPv6 ones mirror them, as ztunnel's (src/socket.rs):
- listeners: one per family and port, the IPv6 one bound to `::` with IPV6_V6ONLY, beside the IPv4 one on
  0.0.0.0. ztunnel binds one dual-stack `[::]` socket instead and canonicalizes every peer address
  (`to_canonical`); separate sockets keep IPv4 peers and original destinations in their own family (nothing
  to canonicalize) and keep the IPv4 listener what it was, so an older tunnel holding the port with
  SO_REUSEPORT during a rollout still shares its group with this one.
- client sockets: made in the family of the address they will connect to; transparent (IPV6_TRANSPARENT and
  IPV6_FREEBIND, as ztunnel's `set_transparent` for `Domain::IPV6`) when bound to the client's address.
- original destination: SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST (the same value, 80, at SOL_IPV6,
  answering a `sockaddr_in6`) for IPv6, tried in that order as ztunnel's `orig_dst_addr` does.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Callable

from nodeagent.kernel import netns as kernel
from nodeagent.kernel.netns import Namespaces, OpenNetns, in_netns

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IPV6_TRANSPARENT, IPV6_FREEBIND = 75, 78  # linux/in6.h
_SOCKADDR_IN6 = 28  # family 2, port 2, flowinfo 4, address 16, scope id 4


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address, AF_INET otherwise."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def listening_families() -> tuple[socket.AddressFamily, ...]:
    """The families the tunnel listens in: IPv6 too wherever the kernel has it (booted with ipv6.disable=1 it
    has none, in any namespace)."""
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        return (socket.AF_INET, socket.AF_INET6)
    return (socket.AF_INET,)


def _in(netns: str | OpenNetns, namespaces: Namespaces | None, make: Callable[[], socket.socket]) -> socket.socket:
    if namespaces is not None and isinstance(netns, OpenNetns):
        return namespaces.run(netns, make)
    return in_netns(netns.path if isinstance(netns, OpenNetns) else netns, make)


def _listener6(port: int, backlog: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        # IPv6 only: the IPv4 listener on the same port takes IPv4 (see the module doc).
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_socket(netns: str | OpenNetns, port: int, *, family: socket.AddressFamily = socket.AF_INET,
                     backlog: int = 512, reuse_port: bool = False, namespaces: Namespaces | None = None
                     ) -> socket.socket:
    """A TCP socket listening on `port` inside the namespace, non-blocking: on 0.0.0.0 for AF_INET
    (`kernel.netns.listening_socket`), on `::` (IPv6 only) for AF_INET6."""
    if family == socket.AF_INET:
        return kernel.listening_socket(netns, port, backlog=backlog, reuse_port=reuse_port, namespaces=namespaces)
    return _in(netns, namespaces, lambda: _listener6(port, backlog, reuse_port))


def _configure6(sock: socket.socket, mark: int, source: str | None) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def client_socket(netns: str | OpenNetns, mark: int, source: str | None = None, *, host: str | None = None,
                  namespaces: Namespaces | None = None) -> socket.socket:
    """An unconnected TCP socket in the namespace for connecting to `host` (its family; None: IPv4), carrying
    `mark`; with `source`, transparent and bound to it (`kernel.netns.client_socket`). A `source` of the other
    family cannot be the socket's: the connection is then made from the pod's own address."""
    family = family_of(host) if host is not None else socket.AF_INET
    if source is not None and family_of(source) != family:
        source = None
    if family == socket.AF_INET:
        return kernel.client_socket(netns, mark, source, namespaces=namespaces)
    sock = _in(netns, namespaces, lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    return _configure6(sock, mark, source)


def canonical(address: str) -> str:
    """`address` with an IPv4-mapped IPv6 address unwrapped to its IPv4 one (ztunnel's `to_canonical`), any
    other address in its canonical text; a string that is not an address unchanged."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection captured by an iptables/ip6tables REDIRECT was going: IPv4's SO_ORIGINAL_DST first,
    then IPv6's IP6T_SO_ORIGINAL_DST on an IPv6 socket. Raises OSError (ENOENT) for a connection that was not
    redirected."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        if sock.family != socket.AF_INET6:
            raise
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
    if len(raw) < 24 or int.from_bytes(raw[0:2], sys.byteorder) != socket.AF_INET6:
        raise OSError(errno.EINVAL, f"IP6T_SO_ORIGINAL_DST answered {len(raw)} bytes that are not a sockaddr_in6")
    return canonical(socket.inet_ntop(socket.AF_INET6, raw[8:24])), int.from_bytes(raw[2:4], "big")
