"""The one way into another network namespace: for a socket (`Namespaces`, `in_netns`, `setns`) or for a
command (`command_in`).

A socket belongs to the namespace it was created in, whatever thread later uses it, and setns(2) moves only
the calling thread. So the tunnel's event loop thread makes a pod's socket by entering the pod's namespace,
creating the socket and going back (`Namespaces.run`: two setns calls on namespace files it keeps open), and
then serves it like any other. This is ztunnel's way (`src/inpod/netns.rs`, `InpodNetns::run`: setns there,
the closure, setns back, and a panic if going back fails). `in_netns` does the same in a short-lived thread,
for callers that are not on a thread of their own to switch (the CLI, one-off lookups): a thread per socket
costs a clone, a start and a join, which a connection path must not pay.

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


class NamespaceSwitchError(OSError):
    """The calling thread could not go back to its own network namespace after a switch."""


@dataclass(frozen=True, slots=True)
class OpenNetns:
    """A network namespace held open (its file descriptor), to switch into without resolving its path again.
    It stays valid while open, even after the namespace's bind mount is removed."""

    path: str
    fd: int

    def close(self) -> None:
        """Release the descriptor (a switch into it afterwards fails with EBADF)."""
        os.close(self.fd)


class Namespaces:
    """One thread's way into other network namespaces and back, without a thread per socket.

    Made on the thread that will switch (the event loop's): that thread's own namespace is held open as
    home. `run` from any other thread falls back to `in_netns`, so a caller on the wrong thread is slower,
    never wrong.
    """

    def __init__(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._thread = threading.get_ident()

    def open(self, path: str) -> OpenNetns:
        """Hold the namespace bound at `path` (or named so) open."""
        resolved = netns_path(path)
        return OpenNetns(resolved, os.open(resolved, os.O_RDONLY | os.O_CLOEXEC))

    def run(self, netns: OpenNetns, make: Callable[[], T]) -> T:
        """`make()` run inside `netns` on the calling thread, which is back in its own namespace afterwards.

        `make` must not block or yield: nothing else runs on this thread while it is away."""
        if threading.get_ident() != self._thread:
            return in_netns(netns.path, make)
        setns(netns.fd)
        try:
            return make()
        finally:
            try:
                setns(self._home)
            except OSError as exc:
                # Every later socket of this thread would be made in the pod's namespace. ztunnel panics here;
                # the caller must treat this as fatal (the tunnel exits, and is restarted clean).
                raise NamespaceSwitchError(exc.errno, f"could not return to the tunnel's network namespace "
                                                      f"from {netns.path}: {exc.strerror}") from exc

    def close(self) -> None:
        """Release the home namespace's descriptor."""
        os.close(self._home)


def _listener(port: int, backlog: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Several tunnel processes (workers, or an old and a new tunnel during a rollout) each hold a
            # listener on the same port and the kernel spreads new connections among them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_socket(netns: str | OpenNetns, port: int, *, backlog: int = 512, reuse_port: bool = False,
                     namespaces: Namespaces | None = None) -> socket.socket:
    """A TCP socket listening on 0.0.0.0:`port` inside the namespace, non-blocking (with `reuse_port`: shared
    with other sockets that set it too). With `namespaces` and an open `netns`, made on the calling thread."""
    def make() -> socket.socket:
        return _listener(port, backlog, reuse_port)

    if namespaces is not None and isinstance(netns, OpenNetns):
        return namespaces.run(netns, make)
    return in_netns(netns.path if isinstance(netns, OpenNetns) else netns, make)


TCP_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def migrate_requests_on_close(netns: OpenNetns, namespaces: Namespaces) -> bool:
    """Set net.ipv4.tcp_migrate_req in the namespace (Linux 5.14+): when one of several SO_REUSEPORT listeners
    on a port closes, the connections queued on it (handshaken, not yet accepted) move to another listener of
    the group instead of being reset. A tunnel handing its ports to the next one relies on it. /proc/sys/net
    resolves against the namespace of the thread that opens the file, hence the switch. False when the
    kernel lacks it (then a listener closing resets its queue, as before 5.14)."""
    def write() -> bool:
        try:
            with open(TCP_MIGRATE_REQ, "r+") as knob:
                if knob.read().strip() != "1":
                    knob.seek(0)
                    knob.write("1")
            return True
        except OSError:
            return False

    return namespaces.run(netns, write)


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
    return _first_address(netns, ["-4", "addr", "show", "dev", interface])


def ipv6_address(netns: str, interface: str = "eth0") -> str | None:
    """The first global IPv6 address on `interface` inside `netns` (None: none, or gone)."""
    return _first_address(netns, ["-6", "addr", "show", "dev", interface, "scope", "global"])


def _first_address(netns: str, arguments: list[str]) -> str | None:
    shown = run_in(netns, ["ip", "-j", *arguments])
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


def _tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def client_socket(netns: str | OpenNetns, mark: int, source: str | None = None, *,
                  namespaces: Namespaces | None = None) -> socket.socket:
    """An unconnected TCP socket in the namespace, carrying `mark` (so capture rules skip it). With
    `namespaces` and an open `netns`, made on the calling thread (no thread per socket).

    With `source`, the socket is transparent and bound to that address (any port), so the server sees
    the original client: as ztunnel's inbound connect, this needs CAP_NET_ADMIN and the pod's capture
    routing replies to marked connections back to the local stack.
    """
    if namespaces is not None and isinstance(netns, OpenNetns):
        sock = namespaces.run(netns, _tcp_socket)
    else:
        sock = in_netns(netns.path if isinstance(netns, OpenNetns) else netns, _tcp_socket)
    return configure(sock, mark, source)


SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection captured by an iptables REDIRECT was going (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntoa(raw[4:8]), port
