"""What an HBONE request means: a classic CONNECT (RFC 9113 8.5) whose `:authority` is `ip:port`. Pure.

The server answers anything else with 400 (`connect_verdict`), before policy or an upstream is looked at.
"""

from __future__ import annotations

import ipaddress

from nodeagent.tunnel.hbone.limits import MAX_HEADER_LIST


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`ip:port` (`[v6]:port`) of a CONNECT, or None when it is anything else."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


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
    destination = parse_authority(fields.get(":authority", ""))
    if destination is None:
        return 400, None, f":authority {fields.get(':authority')!r} is not ip:port"
    return 0, destination, ""


def header_text(headers: object) -> list[tuple[str, str]]:
    """h2 gives str headers with header_encoding set; its types say bytes. Both become str here."""
    out = []
    for name, value in headers:  # type: ignore[attr-defined]
        out.append((name.decode() if isinstance(name, bytes) else str(name),
                    value.decode() if isinstance(value, bytes) else str(value)))
    return out
