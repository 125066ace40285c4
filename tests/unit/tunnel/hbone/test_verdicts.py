"""What a CONNECT request may be (pure): every refusal has its status and reason."""

from __future__ import annotations

import pytest

from nodeagent.tunnel.hbone.request import connect_verdict, parse_authority


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ([(":method", "GET"), (":authority", "10.0.0.1:80"), (":path", "/"), (":scheme", "https")], 400, "not CONNECT"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")], 400, "neither :path"),
    ([(":method", "CONNECT"), (":authority", "db.example:5432")], 400, "is not ip:port"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:70000")], 400, "is not ip:port"),
    ([(":method", "CONNECT")], 400, "is not ip:port"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-pad", "a" * 20_000)], 400, "header block"),
])
def test_refusals(headers: list[tuple[str, str]], status: int, reason: str) -> None:
    got_status, destination, got_reason = connect_verdict(headers)
    assert (got_status, destination) == (status, None) and reason in got_reason


def test_a_classic_connect_to_an_address_proceeds() -> None:
    assert connect_verdict([(":method", "CONNECT"), (":authority", "10.244.2.2:8080")]) == (0, ("10.244.2.2", 8080), "")
    assert parse_authority("[fd00::1]:443") == ("fd00::1", 443)
