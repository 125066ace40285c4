"""What an HBONE request means: a classic CONNECT (RFC 9113 8.5) whose `:authority` is `ip:port` (`[v6]:port`
for IPv6). Pure.

The server answers anything else with 400 (`connect_verdict`), before policy or an upstream is looked at.
"""

from __future__ import annotations

import ipaddress

from nodeagent.errors import NodeAgentError
from nodeagent.tunnel.hbone.limits import MAX_HEADER_LIST


class AuthorityError(NodeAgentError, ValueError):
    """An HBONE `:authority` that is not `ip:port` / `[ipv6]:port`; the message says which part is wrong."""

    def __init__(self, authority: str, reason: str) -> None:
        super().__init__(f":authority {authority!r}: {reason}")
        self.authority, self.reason = authority, reason


def read_authority(authority: str) -> tuple[str, int]:
    """(address, port) of a CONNECT's `ip:port`, the address in its canonical text; raises AuthorityError.

    As ztunnel reads it (a Rust `SocketAddr`: the HBONE server parses the request's authority so), an IPv6
    address is bracketed and an IPv4 one is not, and the port is 1-65535 in at most five ASCII digits.
    Stricter than `SocketAddr`: no zone (`%eth0`; a link-local scope means nothing on another node) and
    no port 0 (nothing listens there).
    """
    if not isinstance(authority, str) or not authority:
        raise AuthorityError(str(authority), "empty")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise AuthorityError(authority, "'[' without ']'")
        host, rest = authority[1:close], authority[close + 1:]
        if not rest.startswith(":"):
            raise AuthorityError(authority, "no ':port' after ']'")
        port_text = rest[1:]
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise AuthorityError(authority, f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise AuthorityError(authority, "no ':port'")
        if ":" in host:
            raise AuthorityError(authority, "an IPv6 address must be in brackets ([v6]:port)")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise AuthorityError(authority, f"{host!r} is not an IP address") from None
    if "%" in host:
        raise AuthorityError(authority, "an address with a zone is refused")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise AuthorityError(authority, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise AuthorityError(authority, f"port {port} is out of range (1-65535)")
    return str(address), port


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`ip:port` (`[v6]:port`) of a CONNECT, or None when it is anything else (`read_authority` says why)."""
    try:
        return read_authority(authority)
    except AuthorityError:
        return None


def format_authority(host: str, port: int) -> str:
    """The `:authority` of a CONNECT to `host`:`port`: `ip:port`, `[v6]:port` for IPv6 (as ztunnel writes a
    `SocketAddr`), the address in its canonical text; raises AuthorityError for anything else."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise AuthorityError(f"{host}:{port}", f"{host!r} is not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise AuthorityError(f"{host}:{port}", f"port {port!r} is out of range (1-65535)")
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            raise AuthorityError(f"[{host}]:{port}", "an address with a zone is refused")
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def connect_verdict(headers: list[tuple[str, str]]) -> tuple[int, tuple[str, int] | None, str]:
    """(status, destination, reason) for a request's headers: 0 when it may proceed. Pure."""
    size = sum(len(name) + len(value) + 32 for name, value in headers)  # RFC 9113 6.5.2's accounting
    if size > MAX_HEADER_LIST:
        return 400, None, f"header block of {size} bytes exceeds {MAX_HEADER_LIST}"
    fields = dict(headers)
    if fields.get(":method") != "CONNECT":
        return 400, None, f"method {fields.get(':method')!r} is not CONNECT"
    if ":path" in fields or ":scheme" in fields:
        return 400, None, "a CONNECT carries neither :path nor :scheme (RFC 9113 8.5)"
    try:
        destination = read_authority(fields.get(":authority", ""))
    except AuthorityError as exc:
        return 400, None, f":authority {fields.get(':authority')!r} is not ip:port ({exc.reason})"
    return 0, destination, ""


def header_text(headers: object) -> list[tuple[str, str]]:
    """h2 gives str headers with header_encoding set; its types say bytes. Both become str here."""
    out = []
    for name, value in headers:  # type: ignore[attr-defined]
        out.append((name.decode() if isinstance(name, bytes) else str(name),
                    value.decode() if isinstance(value, bytes) else str(value)))
    return out
