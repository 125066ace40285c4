"""HBONE streams sharing one connection: a slow upstream holds back only its own stream (root: SO_MARK).

The server writes each DATA frame to its stream's upstream at once and withholds the stream's window
acknowledgements while that upstream is above its high-water mark; it never stops reading the shared
TLS connection for one stream's sake (the head-of-line stall this guards against).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from nodeagent.tunnel.hbone.client import HbonePool, HboneStream
from nodeagent.tunnel.hbone.limits import STREAM_WINDOW
from nodeagent.tunnel.hbone.server import open_upstream, serve_connection
from tests.support.hbone import SERVER_ID, contexts, upstream_echo

pytestmark = pytest.mark.root


@dataclass
class Slow:
    """An upstream that reads nothing until `go` is set, then reports the digest of all it got."""

    server: asyncio.Server
    go: asyncio.Event
    port: int


async def slow_upstream() -> Slow:
    go = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        digest, total = hashlib.sha256(), 0
        while data := await reader.read(1 << 16):
            digest.update(data)
            total += len(data)
        writer.write(f"{total}:{digest.hexdigest()}".encode())
        await writer.drain()
        writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it: fills at once
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(handle, sock=sock)
    return Slow(server, go, sock.getsockname()[1])


@dataclass
class Rig:
    pool: HbonePool
    peer: tuple[str, int]
    echo_port: int
    slow: Slow

    async def stream(self, port: int) -> HboneStream:
        return await self.pool.connect(self.peer, f"127.0.0.1:{port}", SERVER_ID)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server_ctx, client_ctx = contexts()
    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    slow = await slow_upstream()
    hbone = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: True,
                                      connect=open_upstream), "127.0.0.1", 0, ssl=server_ctx)
    pool = HbonePool(lambda: client_ctx)
    try:
        yield Rig(pool, ("127.0.0.1", hbone.sockets[0].getsockname()[1]), echo.sockets[0].getsockname()[1], slow)
    finally:
        slow.go.set()
        await pool.close()
        for server in (hbone, echo, slow.server):
            server.close()


async def read_all(stream: Any) -> bytes:
    out = bytearray()
    while chunk := await asyncio.wait_for(stream.read(), 10):
        out += chunk
    return bytes(out)


async def test_a_slow_upstream_does_not_stall_another_stream_on_the_same_connection(rig: Rig) -> None:
    stuck = await rig.stream(rig.slow.port)
    payload = os.urandom(STREAM_WINDOW - (64 << 10))  # fits the stream window: the write completes
    await asyncio.wait_for(stuck.write(payload), 10)  # ... and piles up at the server, behind the slow reader
    lively = await rig.stream(rig.echo_port)
    assert lively.h2 is stuck.h2, "both streams share one pooled connection"
    for i in range(20):  # round trips on the other stream go on while the first is held up
        message = f"ping {i}".encode()
        await lively.write(message)
        assert await asyncio.wait_for(lively.read(), 2) == message
    lively.write_eof()
    assert (await read_all(lively)).startswith(b"EOF:")
    rig.slow.go.set()  # the slow upstream starts reading: every byte arrives, in order
    stuck.write_eof()
    assert await read_all(stuck) == f"{len(payload)}:{hashlib.sha256(payload).hexdigest()}".encode()


async def test_a_stalled_stream_holds_back_only_its_own_window(rig: Rig) -> None:
    stuck = await rig.stream(rig.slow.port)
    writing = asyncio.create_task(stuck.write(os.urandom(2 * STREAM_WINDOW)))  # more than the stream window
    lively = await rig.stream(rig.echo_port)
    payload = os.urandom(3 * STREAM_WINDOW)  # needs window updates on its own stream to get through
    sender = asyncio.create_task(lively.write(payload))
    received = bytearray()
    while len(received) < len(payload):
        received += await asyncio.wait_for(lively.read(), 5)
    await sender
    assert bytes(received) == payload
    assert not writing.done(), "the stalled stream is held by its own window, not by the connection"
    rig.slow.go.set()
    await asyncio.wait_for(writing, 20)
    stuck.write_eof()
    assert (await read_all(stuck)).startswith(f"{2 * STREAM_WINDOW}:".encode())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_spliced_connection_carries_bytes_both_ways_with_half_close(loop: str) -> None:
    """The fast path end to end: a local connection spliced onto a stream, the server's upstream reached
    with `upstream_socket` (both sides' protocol callbacks), on both event loops the tunnel runs on."""
    import uvloop

    from nodeagent.tunnel.hbone.server import upstream_socket

    async def scenario() -> tuple[bytes, bytes, tuple[int, int]]:
        server_ctx, client_ctx = contexts()
        echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
        hbone = await asyncio.start_server(
            lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: True,
                                          connect=upstream_socket), "127.0.0.1", 0, ssl=server_ctx)
        pool = HbonePool(lambda: client_ctx)
        carried: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

        async def entry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = await pool.connect(("127.0.0.1", hbone.sockets[0].getsockname()[1]),
                                        f"127.0.0.1:{echo.sockets[0].getsockname()[1]}", SERVER_ID)
            carried.set_result(await stream.splice(reader, writer))

        front = await asyncio.start_server(entry, "127.0.0.1", 0)
        try:
            payload = os.urandom(3 * STREAM_WINDOW // 2)
            reader, writer = await asyncio.open_connection(*front.sockets[0].getsockname()[:2])
            writer.write(payload)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            # the splice returns once the tunnel has seen both directions end
            return payload, answer, await asyncio.wait_for(carried, 10)
        finally:
            await pool.close()
            for server in (front, hbone, echo):
                server.close()

    run = uvloop.run if loop == "uvloop" else asyncio.run
    payload, answer, (sent, received) = run(scenario())
    assert answer == payload + b"EOF:" + hashlib.sha256(payload).hexdigest().encode()
    assert (sent, received) == (len(payload), len(answer))
