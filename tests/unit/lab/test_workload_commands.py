"""The lab workload on loopback: every answer names the pod and the peer address the server saw."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from nodeagent.lab.workload import request_tcp, request_udp, serve


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def identity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "echo-0")
    monkeypatch.setenv("POD_NAMESPACE", "demo")
    monkeypatch.setenv("NODE_NAME", "node1")
    monkeypatch.setenv("NODEAGENT_LAB", "unit")


async def _with_server(tcp: int, udp: int, body):  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(tcp, udp, host="127.0.0.1", stop=stop))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # poll until the server accepts, never sleep a fixed time
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", tcp)
                writer.close()
                break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "server did not start"
                await asyncio.sleep(0.01)
        return await body()
    finally:
        stop.set()
        await server


def test_tcp_line_answers_with_pod_and_peer(identity_env: None) -> None:
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)

    async def body():  # type: ignore[no-untyped-def]
        return await request_tcp("127.0.0.1", tcp, "ping", timeout=5)

    answer = asyncio.run(_with_server(tcp, udp, body))
    assert answer["pod"] == "demo/echo-0" and answer["node"] == "node1" and answer["lab"] == "unit"
    assert answer["proto"] == "tcp" and answer["echo"] == "ping"
    assert answer["peer"].startswith("127.0.0.1:") and answer["local"] == f"127.0.0.1:{tcp}"


def test_http_request_gets_an_http_response_with_json_body(identity_env: None) -> None:
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)

    async def body():  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    raw = asyncio.run(_with_server(tcp, udp, body))
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert json.loads(payload)["echo"] == "GET /x HTTP/1.1"


def test_udp_datagram_is_answered(identity_env: None) -> None:
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)

    async def body():  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(request_udp, "127.0.0.1", udp, "dgram", 5.0)

    answer = asyncio.run(_with_server(tcp, udp, body))
    assert answer["proto"] == "udp" and answer["echo"] == "dgram" and answer["pod"] == "demo/echo-0"
