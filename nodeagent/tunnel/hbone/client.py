"""The HBONE client: TLS connections to peer tunnels (the server's SPIFFE ID checked), CONNECT streams on
them, and the pool that shares connections among streams (as ztunnel pools them).

A stream sends its CONNECT, waits for the 200, then carries a local connection (`HboneStream.splice`,
the fast path: bytes move in protocol callbacks, see `connection`'s module doc) or is read and written
(`HboneStream.read` / `write`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from h2.exceptions import ProtocolError

from nodeagent.ca.identity import IdentityError, SpiffeId
from nodeagent.tunnel.hbone.connection import HboneConnection, LocalSide, StreamState, marked_socket, take_over
from nodeagent.tunnel.hbone.limits import MAX_STREAMS
from nodeagent.tunnel.identity.tls import expect_identity

log = structlog.get_logger("nodeagent.tunnel.hbone.client")


class ConnectRefused(ConnectionRefusedError):
    """The peer tunnel answered a CONNECT with a status other than 200 (`status` 0: the stream was reset)."""

    def __init__(self, authority: str, status: int) -> None:
        super().__init__(f"HBONE CONNECT {authority}: status {status}")
        self.status = status


@dataclass
class HboneStream:
    """The client end of one CONNECT stream: `splice` a local connection onto it (the fast path), or
    `read`/`write` it."""

    h2: HboneConnection
    stream_id: int
    inbound: asyncio.Queue[bytes | None]

    def _stream(self) -> StreamState:
        stream = self.h2.streams.get(self.stream_id)
        if stream is None or self.h2.closed.is_set():
            raise ConnectionResetError("hbone stream closed")
        return stream

    async def write(self, data: bytes) -> None:
        """Send `data`; returns once it is handed to TLS (the peer's window and the transport allow)."""
        stream = self._stream()
        if not data:
            return
        self.h2.send_local(stream, data)
        while not stream.writable.is_set():
            await stream.writable.wait()
        if stream.pending or self.h2.streams.get(self.stream_id) is not stream:
            raise ConnectionResetError("hbone stream closed")

    def carried(self) -> int:
        """Bytes moved so far, both ways (for idle detection); -1 once the stream is gone."""
        stream = self.h2.streams.get(self.stream_id)
        return -1 if stream is None else stream.sent + stream.received

    def write_eof(self) -> None:
        stream = self.h2.streams.get(self.stream_id)
        if stream is not None:
            self.h2.local_eof(stream)

    def close(self) -> None:
        """Abort the stream (RST_STREAM); the connection and its other streams go on."""
        self.h2.reset(self.stream_id)

    async def read(self) -> bytes:
        """Next chunk, b"" at END_STREAM."""
        chunk = await self.inbound.get()
        if chunk is None:
            return b""
        if not self.h2.closed.is_set():  # (h2 returns only the connection's window once the stream is closed)
            self.h2.conn.acknowledge_received_data(len(chunk), self.stream_id)
            self.h2.flush()
        return chunk

    async def splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, int]:
        """Carry the local connection (`reader`, `writer`) on this stream until both directions end or
        either side aborts; the bytes move in protocol callbacks (see `connection`'s module doc). Returns (bytes
        sent toward the peer, bytes received from it)."""
        stream = self._stream()
        stream.done = asyncio.get_running_loop().create_future()
        local = LocalSide(self.h2, stream)
        buffered, eof = take_over(reader, writer, local)
        self.h2.attach(stream, local)
        if buffered:
            local.data_received(buffered)
        if eof:
            local.eof_received()
        await stream.done
        return stream.sent, stream.received


async def open_connection(peer: tuple[str, int], context: ssl.SSLContext, expected: SpiffeId,
                          timeout: float = 10.0, make_socket: Callable[[], socket.socket] | None = None,
                          socket_for: Callable[[str], socket.socket] | None = None) -> HboneConnection:
    """A TLS + HTTP/2 connection to the tunnel at `peer`, verified to be `expected`, ready for streams.

    `make_socket` decides where the connection starts: a tunnel passes one that creates the socket in
    the source pod's network namespace, so the connection leaves through the pod's own interface.
    `socket_for` does the same given the peer's address, so the socket is of the peer's family (IPv6 peers).
    """
    if socket_for is not None:
        sock = socket_for(peer[0])
    else:
        sock = make_socket() if make_socket is not None else marked_socket(
            socket.AF_INET6 if ":" in peer[0] else socket.AF_INET)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, peer), timeout)
        transport, h2 = await asyncio.wait_for(loop.create_connection(
            lambda: HboneConnection(client_side=True), sock=sock, ssl=context, server_hostname="",
            ssl_handshake_timeout=timeout), timeout)
    except BaseException:
        sock.close()
        raise
    try:
        expect_identity(transport.get_extra_info("ssl_object"), expected)
    except IdentityError:
        transport.close()
        raise
    return h2


async def open_stream(h2: HboneConnection, authority: str, timeout: float = 10.0) -> HboneStream:
    """A CONNECT stream to `authority` on an open connection; ConnectionRefusedError unless answered 200."""
    if h2.closed.is_set():
        raise ConnectionResetError("hbone connection closed")
    stream_id = h2.conn.get_next_available_stream_id()
    response: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    stream = StreamState(stream_id, response=response, inbound=inbound)
    h2.streams[stream_id] = stream
    h2.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    h2.flush()
    try:
        status = await asyncio.wait_for(response, timeout)
    except BaseException:
        h2.reset(stream_id)
        raise
    if status != 200:
        h2.streams.pop(stream_id, None)
        raise ConnectRefused(authority, status)
    stream.sending = True
    h2.pump(stream)  # anything written while waiting for the 200
    return HboneStream(h2, stream_id, inbound)


async def hbone_connect(peer: tuple[str, int], authority: str, context: ssl.SSLContext, expected: SpiffeId,
                        timeout: float = 10.0) -> HboneStream:
    """One stream on its own new connection (the pool shares connections; this is the simple form)."""
    h2 = await open_connection(peer, context, expected, timeout)
    try:
        return await open_stream(h2, authority, timeout)
    except BaseException:
        h2.writer.close()
        raise


PoolKey = tuple[tuple[str, int], SpiffeId]


@dataclass
class HbonePool:
    """HTTP/2 connections to peer tunnels, shared by many CONNECT streams (as ztunnel pools them).

    Keyed by (peer address, expected identity); the client certificate comes from `context()` when a
    connection opens (so a renewed certificate is used by new connections only). A connection takes at
    most `max_streams` concurrent streams; then another one opens. Streams asked for while a connection
    to the same key is being opened wait for it rather than opening one each.
    """

    context: Callable[[], ssl.SSLContext]
    max_streams: int = MAX_STREAMS
    make_socket: Callable[[], socket.socket] | None = None
    socket_for: Callable[[str], socket.socket] | None = None  # the socket for a peer's address (its family)
    keepalive: float = 30.0  # seconds between PINGs; a PING unanswered for as long closes the connection
    connections: dict[PoolKey, list[HboneConnection]] = field(default_factory=dict)
    opening: dict[PoolKey, asyncio.Future[HboneConnection]] = field(default_factory=dict)

    async def connect(self, peer: tuple[str, int], authority: str, expected: SpiffeId,
                      timeout: float = 10.0) -> HboneStream:
        key = (peer, expected)
        retried = False
        while True:
            # A draining connection (GOAWAY either way) takes no new stream; its open ones finish on it.
            live = [c for c in self.connections.get(key, []) if not c.closed.is_set() and not c.draining]
            self.connections[key] = live
            chosen = next((c for c in live if c.conn.open_outbound_streams < self.max_streams), None)
            if chosen is not None:
                try:
                    return await open_stream(chosen, authority, timeout)
                except ConnectRefused as exc:
                    # Crossed the peer's GOAWAY on the wire: never processed (RFC 9113 8.7), so it is safe to
                    # open again on a new connection (ztunnel's pool does the same); any other refusal stands.
                    if exc.status or not chosen.draining or retried:
                        raise
                    retried = True  # once: a peer whose every connection drains is going away
                    continue
            opening = self.opening.get(key)
            if opening is None or opening.done():
                opening = self.opening[key] = asyncio.ensure_future(self._open(key, timeout))
            await asyncio.shield(opening)

    async def _open(self, key: PoolKey, timeout: float) -> HboneConnection:
        try:
            h2 = await open_connection(key[0], self.context(), key[1], timeout, self.make_socket, self.socket_for)
        finally:
            self.opening.pop(key, None)
        h2.keepalive_task = asyncio.create_task(_keepalive(h2, self.keepalive))
        self.connections.setdefault(key, []).append(h2)
        return h2

    async def close(self) -> None:
        """GOAWAY on every connection, then close them."""
        for connections in self.connections.values():
            for h2 in connections:
                if h2.keepalive_task is not None:
                    h2.keepalive_task.cancel()
                if not h2.closed.is_set():
                    h2.conn.close_connection()
                    h2.flush()
                    h2.writer.close()
        self.connections.clear()


async def _keepalive(h2: HboneConnection, interval: float) -> None:
    """PING the peer every `interval`; a PING not answered within `interval` ends the connection (a
    dead peer or path is noticed even when no stream sends anything)."""
    sequence = 0
    while not h2.closed.is_set():
        await asyncio.sleep(interval)
        sequence += 1
        h2.ping_acked.clear()
        try:
            h2.conn.ping(sequence.to_bytes(8, "big"))
            h2.flush()
            await asyncio.wait_for(h2.ping_acked.wait(), interval)
        except (TimeoutError, ProtocolError, ConnectionError, OSError):
            log.info("hbone peer stopped answering PINGs; closing the connection")
            h2.writer.close()
            h2.connection_lost(None)
            return
