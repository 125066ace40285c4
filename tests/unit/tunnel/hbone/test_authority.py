"""HBONE `:authority` for both families: read and written as ztunnel does (`ip:port`, `[v6]:port`), hostile forms
refused with a reason that names the wrong part, and a CONNECT to an IPv6 destination proceeding."""

from __future__ import annotations

import pytest

from nodeagent.tunnel.hbone.request import (
    AuthorityError,
    connect_verdict,
    format_authority,
    parse_authority,
    read_authority,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.244.1.5:8080", ("10.244.1.5", 8080)),
    ("[fd00:10:244::5]:8080", ("fd00:10:244::5", 8080)),
    ("[::1]:1", ("::1", 1)),
    ("[FD00:0:0::5]:65535", ("fd00::5", 65535)),  # read into the canonical text
    ("[::ffff:10.0.0.1]:80", ("::ffff:a00:1", 80)),  # v4-mapped stays IPv6 (the target check refuses it)
])
def test_authorities_read_in_both_families(text: str, expected: tuple[str, int]) -> None:
    assert read_authority(text) == expected == parse_authority(text)


@pytest.mark.parametrize(("text", "reason"), [
    ("[::1", "'[' without ']'"),
    ("[::1]:", "port '' is not a number"),
    ("[::1]", "no ':port' after ']'"),
    ("[::1]80", "no ':port' after ']'"),
    ("[zz::]:80", "'zz::' in brackets is not an IPv6 address"),
    ("[10.0.0.1]:80", "in brackets is not an IPv6 address"),
    ("::1:80", "must be in brackets"),
    ("fd00::5:443", "must be in brackets"),
    ("[fe80::1%eth0]:80", "zone"),
    ("[::1]:0", "out of range"),
    ("[::1]:65536", "out of range"),
    ("[::1]:99999", "out of range"),
    ("[::1]:000080", "not a number"),
    ("[::1]:-1", "not a number"),
    ("[::1]:\uff18\uff10", "not a number"),  # full-width digits: str.isdigit() says yes, a port says no
    ("10.0.0.1:+80", "not a number"),
    ("10.0.0.1", "no ':port'"),
    ("db.example:5432", "not an IP address"),
    ("", "empty"),
])
def test_hostile_authorities_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(AuthorityError) as raised:
        read_authority(text)
    assert reason in str(raised.value) and repr(text) in str(raised.value)
    assert parse_authority(text) is None
    status, destination, why = connect_verdict([(":method", "CONNECT"), (":authority", text)])
    assert (status, destination) == (400, None) and reason in why


@pytest.mark.parametrize(("host", "port", "text"), [
    ("10.244.1.5", 80, "10.244.1.5:80"),
    ("fd00:10:244::5", 80, "[fd00:10:244::5]:80"),
    ("fd00:0010:0244:0000::5", 443, "[fd00:10:244::5]:443"),
])
def test_authorities_written_as_ztunnel_writes_a_socket_address(host: str, port: int, text: str) -> None:
    assert format_authority(host, port) == text
    assert read_authority(text) == (text.rpartition(":")[0].strip("[]"), port)


@pytest.mark.parametrize(("host", "port"), [("fd00::5", 0), ("fd00::5", 65536), ("10.0.0.1", True),
                                            ("fe80::1%eth0", 80), ("db.example", 80), ("[fd00::5]", 80)])
def test_writing_an_unusable_authority_is_refused(host: str, port: int) -> None:
    with pytest.raises(AuthorityError):
        format_authority(host, port)


def test_a_connect_to_an_ipv6_destination_proceeds() -> None:
    assert connect_verdict([(":method", "CONNECT"), (":authority", "[fd00:10:244::5]:8080")]) == (
        0, ("fd00:10:244::5", 8080), "")
