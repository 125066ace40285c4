"""The one way into another network namespace: in a thread (`in_netns`, `setns`) or for a command (`command_in`).

A socket belongs to the namespace it was created in, whatever thread later uses it. So a short-lived
helper thread enters the pod's namespace (setns affects only the calling thread), creates the socket,
and exits; the tunnel's event loop then serves it like any other (as ztunnel does with its in-pod
listeners).

A binary that must run in a namespace (iptables, conntrack, ip) gets the prefix of `command_in`:
`nsenter --net=PATH`, since runtimes hand us namespace paths while the lab names its namespaces
(a name is the path /run/netns/NAME, as `ip netns exec` resolves it). Unlike `ip netns exec`, nsenter
does not remount /sys nor bind /etc/netns/NAME: iptables, conntrack, tc and ip talk netlink or read
/proc/net (the calling process's namespace), so none of them needs either.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add NAME` binds a namespace
T = TypeVar("T")


def netns_path(netns: str) -> str:
    """The path of a network namespace given by name (bound under /run/netns, as `ip netns` names them) or path."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def command_in(netns: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run inside the network namespace `netns` (a name or a path); unchanged for None (this namespace)."""
    if not netns:
        return list(argv)
    return ["nsenter", f"--net={netns_path(netns)}", *argv]


# A command that could not finish (timed out): what callers above the kernel layer catch, beside OSError,
# without importing subprocess themselves.
CommandError = subprocess.SubprocessError


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command ended: its exit status and its (text) output."""

    returncode: int
    stdout: str
    stderr: str


def run_in(netns: str | None, argv: Sequence[str], *, timeout: float = 30) -> CommandResult:
    """Run `argv` inside `netns` (None: here), output captured; never raises on its exit status (raises
    OSError when it cannot start, CommandError when it times out)."""
    done = subprocess.run(command_in(netns, argv), capture_output=True, text=True, timeout=timeout, check=False)
    return CommandResult(done.returncode, done.stdout, done.stderr)


def exit_status(argv: Sequence[str], *, timeout: float = 30) -> int:
    """Run `argv` here, output discarded; its exit status (for fire-and-check commands such as conntrack)."""
    return subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False).returncode


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace open at `fd` (`nstype` 0: any kind, as `fd` says)."""
    if _libc().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path` (or named so)."""
    fd = os.open(netns_path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def in_netns(path: str, make: Callable[[], T]) -> T:
    """Run `make` in a fresh thread that first joins the network namespace bound at `path`."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            enter(path)
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


SO_NETNS_COOKIE = 71


def netns_cookie(netns: str) -> int:
    """The kernel's cookie of the network namespace `netns` (what eBPF programs key a namespace by)."""
    def make() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)

    return in_netns(netns, make)


def cookie_key(cookie: int) -> bytes:
    """A netns cookie as a u64 map key, in the kernel's byte order."""
    return cookie.to_bytes(8, sys.byteorder)


def ipv4_address(netns: str, interface: str = "eth0") -> str | None:
    """The first IPv4 address on `interface` inside the namespace `netns` (None: none, or gone)."""
    shown = run_in(netns, ["ip", "-j", "-4", "addr", "show", "dev", interface])
    if shown.returncode != 0:
        return None
    return next((str(a["local"]) for link in json.loads(shown.stdout or "[]") for a in link.get("addr_info", [])),
                None)


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
