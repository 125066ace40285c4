"""A draining HBONE server (a tunnel shutting down) lets its open streams finish and sends the client's pool
elsewhere for new ones (root: the tunnel's sockets carry SO_MARK)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from nodeagent.tunnel.hbone.client import HbonePool
from nodeagent.tunnel.hbone.server import open_upstream, serve_connection
from tests.support.hbone import SERVER_ID, contexts, upstream_echo

pytestmark = pytest.mark.root


@dataclass
class Rig:
    pool: HbonePool
    peer: tuple[str, int]
    echo_port: int
    # one event per accepted connection, in order: setting one drains that connection only
    draining: list[asyncio.Event] = field(default_factory=list)
    drain_from_start: set[int] = field(default_factory=set)  # connection indexes that drain at once


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server_ctx, client_ctx = contexts()
    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    state = Rig(HbonePool(lambda: client_ctx), ("127.0.0.1", 0), echo.sockets[0].getsockname()[1])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event = asyncio.Event()
        if len(state.draining) in state.drain_from_start:
            event.set()
        state.draining.append(event)
        await serve_connection(reader, writer, trust_domain="cluster.local", policy=lambda who, dest: True,
                               connect=open_upstream, draining=event)

    hbone = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    state.peer = ("127.0.0.1", hbone.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        await state.pool.close()
        hbone.close()
        echo.close()


async def until(condition: object, deadline: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():  # type: ignore[operator]
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_open_stream_finishes_on_a_draining_connection_and_new_ones_go_to_a_new_connection(
        rig: Rig) -> None:
    authority = f"127.0.0.1:{rig.echo_port}"
    stream = await rig.pool.connect(rig.peer, authority, SERVER_ID)
    first = stream.h2
    await stream.write(b"before ")
    rig.draining[0].set()
    await until(lambda: first.draining)
    # After the GOAWAY the stream still carries both ways, to its end.
    await stream.write(b"after")
    stream.write_eof()
    received = b""
    while chunk := await stream.read():
        received += chunk
    assert received.startswith(b"before after") and b"EOF:" in received
    # Its last stream done, the drained connection closes by itself...
    await asyncio.wait_for(first.closed.wait(), 5)
    # ...and the pool opens the next stream on a new connection, which the server serves normally.
    again = await rig.pool.connect(rig.peer, authority, SERVER_ID)
    assert again.h2 is not first and len(rig.draining) == 2
    again.write_eof()
    while await again.read():
        pass


async def test_a_stream_refused_by_a_drain_it_crossed_is_opened_again_on_a_new_connection(rig: Rig) -> None:
    rig.drain_from_start.add(0)  # the first connection drains before it takes any stream
    stream = await rig.pool.connect(rig.peer, f"127.0.0.1:{rig.echo_port}", SERVER_ID)
    await stream.write(b"hello")
    stream.write_eof()
    received = b""
    while chunk := await stream.read():
        received += chunk
    assert received.startswith(b"hello")
    assert len(rig.draining) == 2 and stream.h2.draining is False


async def test_a_peer_whose_every_connection_drains_is_refused_not_retried_forever(rig: Rig) -> None:
    rig.drain_from_start.update(range(10))
    with pytest.raises(ConnectionRefusedError):
        await rig.pool.connect(rig.peer, f"127.0.0.1:{rig.echo_port}", SERVER_ID, timeout=5)
    assert len(rig.draining) <= 2
