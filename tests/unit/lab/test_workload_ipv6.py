"""The lab workload over IPv6 (loopback ::1): `[ip]:port` targets and answers, UDP and TCP clients of IPv6."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from nodeagent.lab.workload import request_tcp, request_udp, serve, split_target


def _ipv6_port(kind: int) -> int | None:
    try:
        with socket.socket(socket.AF_INET6, kind) as sock:
            sock.bind(("::1", 0))
            return int(sock.getsockname()[1])
    except OSError:
        return None


def test_targets_of_both_families() -> None:
    assert split_target("[fd00:10:96::a]:80") == ("fd00:10:96::a", 80)
    assert split_target("10.96.0.10:53") == ("10.96.0.10", 53)
    with pytest.raises(ValueError):
        split_target("[fd00::1]")


async def _exchange(tcp: int, udp: int) -> tuple[dict[str, Any], dict[str, Any]]:
    stop = asyncio.Event()
    server = asyncio.create_task(serve(tcp, udp, host="::1", stop=stop))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # poll until the server accepts, never sleep a fixed time
            try:
                _, writer = await asyncio.open_connection("::1", tcp)
                writer.close()
                break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "server did not start"
                await asyncio.sleep(0.01)
        answer_tcp = await request_tcp("::1", tcp, "six", timeout=5)
        answer_udp = await asyncio.to_thread(request_udp, "::1", udp, "six", 5)
        return answer_tcp, answer_udp
    finally:
        stop.set()
        await server


@pytest.mark.skipif(_ipv6_port(socket.SOCK_STREAM) is None, reason="no IPv6 loopback here")
def test_answers_over_ipv6_write_addresses_in_brackets() -> None:
    tcp, udp = _ipv6_port(socket.SOCK_STREAM), _ipv6_port(socket.SOCK_DGRAM)
    assert tcp is not None and udp is not None
    answer_tcp, answer_udp = asyncio.run(_exchange(tcp, udp))
    assert answer_tcp["peer"].startswith("[::1]:") and answer_tcp["local"] == f"[::1]:{tcp}"
    assert answer_udp["proto"] == "udp" and answer_udp["peer"].startswith("[::1]:")
    assert answer_udp["local"] == f"[::]:{udp}"
