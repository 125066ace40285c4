"""Sockets inside other network namespaces, served from the tunnel's own process.

A socket belongs to the namespace it was created in, whatever thread later uses it. So a short-lived
helper thread enters the pod's namespace (setns affects only the calling thread), creates the socket,
and exits; the tunnel's event loop then serves it like any other (as ztunnel does with its in-pod
listeners).
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _enter(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def in_netns(path: str, make: Callable[[], T]) -> T:
    """Run `make` in a fresh thread that first joins the network namespace bound at `path`."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            _enter(path)
            result.append(make())
        except BaseException as exc:  # handed back to the caller
            error.append(exc)

    thread = threading.Thread(target=run, name="netns-socket")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def listening_socket(netns_path: str, port: int, *, backlog: int = 512) -> socket.socket:
    """A TCP socket listening on 0.0.0.0:`port` inside the namespace, non-blocking."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return in_netns(netns_path, make)


IP_TRANSPARENT, IP_FREEBIND = 19, 15


def configure(sock: socket.socket, mark: int, source: str | None = None) -> socket.socket:
    """Make an unconnected TCP socket the tunnel's: `mark` (capture rules skip it), non-blocking, and with
    `source` transparent and bound to that address (see `client_socket`). Any thread may do this: only
    creating the socket depends on the thread's namespace."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def client_socket(netns_path: str, mark: int, source: str | None = None) -> socket.socket:
    """An unconnected TCP socket in the namespace, carrying `mark` (so capture rules skip it).

    With `source`, the socket is transparent and bound to that address (any port), so the server sees
    the original client: as ztunnel's inbound connect, this needs CAP_NET_ADMIN and the pod's capture
    routing replies to marked connections back to the local stack.
    """
    return configure(in_netns(netns_path, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)), mark, source)


SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection captured by an iptables REDIRECT was going (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntoa(raw[4:8]), port
