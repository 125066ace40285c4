"""nfacct objects (extended packet accounting, `-m nfacct --nfacct-name NAME`) over NETLINK_NETFILTER.

kube-proxy's pkg/proxy/util/nfacct: support is probed by getting a counter that may not exist (found or
ENOENT: supported; any other error: not), and `ensure` gets a counter and adds it when missing. The objects
belong to the network namespace of the socket, i.e. of the thread that opens it. No `nfacct` binary is
needed (and none is installed on most nodes).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog

from nodeagent.errors import NodeAgentError

log = structlog.get_logger("nodeagent.kernel.nfacct")
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
MSG_NEW, MSG_GET = 0, 1  # NFNL_MSG_ACCT_NEW, NFNL_MSG_ACCT_GET
ATTR_NAME, ATTR_PKTS, ATTR_BYTES = 1, 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
MAX_NAME = 31  # NFACCT_NAME_MAX - 1
PROBE_NAME = "IMayExist"  # kube-proxy's probe
_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")


class NfacctError(NodeAgentError):
    """An nfacct request failed."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NfacctUnsupported(NfacctError):
    """This kernel has no nfacct subsystem (kube-proxy: "nfacct sub-system not available")."""


@dataclass(frozen=True)
class Counter:
    """One nfacct object and what it counted."""

    name: str
    packets: int
    bytes: int


def _attr(kind: int, payload: bytes) -> bytes:
    padded = payload + b"\0" * (-len(payload) % 4)
    return _ATTR.pack(_ATTR.size + len(payload), kind) + padded


def _name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME:
        raise NfacctError(f"nfacct name {name!r} must be 1 to {MAX_NAME} bytes")
    return raw + b"\0"


def _attrs(data: bytes) -> dict[int, bytes]:
    found, pos = {}, 0
    while pos + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, pos)
        if length < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[pos + _ATTR.size:pos + length]
        pos += length + (-length % 4)
    return found


class Nfacct:
    """A NETLINK_NETFILTER socket for nfacct requests in this thread's network namespace.

    Opening probes support as kube-proxy does; NfacctUnsupported when the kernel has none."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._seq = 0
        try:
            self._sock.bind((0, 0))
            self.get(PROBE_NAME)
        except NfacctError as exc:
            self._sock.close()
            raise NfacctUnsupported(f"nfacct sub-system not available: {exc}", exc.code) from exc
        except OSError as exc:
            self._sock.close()
            raise NfacctUnsupported(f"nfacct sub-system not available: {exc}", exc.errno or 0) from exc

    def __enter__(self) -> Nfacct:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def _request(self, command: int, flags: int, name: str) -> list[bytes]:
        """Send one request; the payloads of the replies (after the nfgenmsg), until the ACK."""
        self._seq += 1
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + _attr(ATTR_NAME, _name(name))
        header = _HEADER.pack(_HEADER.size + len(body), (NFNL_SUBSYS_ACCT << 8) | command,
                              NLM_F_REQUEST | NLM_F_ACK | flags, self._seq, 0)
        self._sock.send(header + body)
        replies: list[bytes] = []
        while True:
            data = self._sock.recv(65536)
            pos = 0
            while pos + _HEADER.size <= len(data):
                length, kind, _, seq, _ = _HEADER.unpack_from(data, pos)
                if length < _HEADER.size:
                    raise NfacctError("nfacct: malformed netlink reply")
                payload = data[pos + _HEADER.size:pos + length]
                pos += length + (-length % 4)
                if seq != self._seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NfacctError(f"nfacct {name!r}: {os.strerror(code)}", code)
                    return replies
                if kind == NLMSG_DONE:
                    return replies
                replies.append(payload[_NFGEN.size:])

    def get(self, name: str) -> Counter | None:
        """The counter `name`, or None when it does not exist."""
        try:
            replies = self._request(MSG_GET, 0, name)
        except NfacctError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        for payload in replies:
            attrs = _attrs(payload)
            if attrs.get(ATTR_NAME, b"").rstrip(b"\0").decode() == name:
                packets = struct.unpack(">Q", attrs[ATTR_PKTS])[0] if ATTR_PKTS in attrs else 0
                count = struct.unpack(">Q", attrs[ATTR_BYTES])[0] if ATTR_BYTES in attrs else 0
                return Counter(name, packets, count)
        return None

    def add(self, name: str) -> None:
        """Create the counter `name` (an error when it exists: EBUSY)."""
        self._request(MSG_NEW, NLM_F_CREATE, name)

    def ensure(self, name: str) -> None:
        """Make sure the counter `name` exists (kube-proxy's Ensure)."""
        if self.get(name) is not None:
            return
        try:
            self.add(name)
        except NfacctError as exc:
            if exc.code != errno.EBUSY:  # created meanwhile
                raise


def ensure_counters(names: Iterable[str]) -> frozenset[str]:
    """Create the counters `names` in this thread's namespace as kube-proxy does; the ones that exist after.

    No nfacct in the kernel: none (kube-proxy renders its rules without `-m nfacct` then)."""
    try:
        client = Nfacct()
    except NfacctUnsupported as exc:
        log.warning("Failed to create nfacct runner, nfacct based metrics won't be available", reason=str(exc))
        return frozenset()
    ensured = set()
    with client:
        for name in names:
            try:
                client.ensure(name)
            except (NfacctError, OSError) as exc:
                log.error("Failed to create nfacct counter; the corresponding metric will not be updated",
                          counter=name, reason=str(exc))
            else:
                ensured.add(name)
    return frozenset(ensured)


def existing_counters(names: Iterable[str]) -> frozenset[str]:
    """Which of `names` exist in this thread's namespace (what a running agent ensured); none without nfacct."""
    try:
        client = Nfacct()
    except NfacctUnsupported:
        return frozenset()
    with client:
        return frozenset(name for name in names if client.get(name) is not None)


def packets(name: str) -> int | None:
    """The packets counted by the nfacct object `name` in this thread's namespace, None when it does not exist
    (what kube-proxy's metrics collector reads at each scrape). A socket of its own per call: scrapes may run
    on several threads at once, and one shared socket would mix their replies. Raises NfacctError (also
    NfacctUnsupported without nfacct in the kernel) or OSError."""
    with Nfacct() as client:
        counter = client.get(name)
    return None if counter is None else counter.packets
