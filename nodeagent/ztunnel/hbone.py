"""HBONE: one TCP connection tunnelled as one HTTP/2 CONNECT stream over mutual TLS (DESIGN §4).

`h2` does all framing and flow control; this module decides what a CONNECT means and moves bytes:
- **server** (15008): a CONNECT whose `:authority` is `ip:port` gets an upstream TCP connection; 200
  only once it is up, 503 if it cannot be made, 401 when policy denies, 400 for anything that is not
  a classic CONNECT to an address. Bytes flow both ways with backpressure (data is acknowledged to
  the peer only after it was written upstream); a half-close travels as END_STREAM / write_eof.
- **client**: opens the TLS connection (checking the server's SPIFFE ID), sends the CONNECT, waits for
  200, then carries a local stream.
Windows are ztunnel's: 4 MiB per stream, 16 MiB per connection. A bad stream is reset alone; the
connection and its other streams go on.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from hyperframe import frame as _hyperframe_frame

from nodeagent.ztunnel.identity import IdentityError, SpiffeId
from nodeagent.ztunnel.tls import expect_identity, peer_identity

log = structlog.get_logger("nodeagent.ztunnel.hbone")


def _short_hex(data: bytes | None) -> str:
    """hyperframe's frame-body repr, hexlifying only the 10 bytes it shows instead of the whole body."""
    if not data:
        return "None"
    shown = binascii.hexlify(data[:11]).decode("ascii")
    return "<hex:" + (shown[:20] + "..." if len(shown) > 20 else shown) + ">"


# h2 formats repr(frame) for its trace log on every received frame, logging or not, and hyperframe's
# repr hexlifies the whole body before cutting it to 20 characters: at 64 KiB DATA frames that was a
# fifth of the tunnel's CPU (bench/hbone_throughput.py). Same text, a bounded cost.
_hyperframe_frame._raw_data_repr = _short_hex

STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 16
MAX_HEADER_LIST = 16 << 10
MAX_STREAMS = 100
SOCKET_MARK = 0x539  # every socket the tunnel opens toward the network (excluded from capture)
READ_CHUNK = 256 << 10

# (peer identity, destination "ip:port") -> allowed?
Policy = Callable[[SpiffeId, str], bool]


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


def _text(headers: object) -> list[tuple[str, str]]:
    """h2 gives str headers with header_encoding set; its types say bytes. Both become str here."""
    out = []
    for name, value in headers:  # type: ignore[attr-defined]
        out.append((name.decode() if isinstance(name, bytes) else str(name),
                    value.decode() if isinstance(value, bytes) else str(value)))
    return out


def _config(client_side: bool) -> H2Configuration:
    return H2Configuration(client_side=client_side, header_encoding="utf-8", validate_inbound_headers=True)


@dataclass
class _Stream:
    writer: asyncio.StreamWriter | None = None
    window_open: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    response: asyncio.Future[int] | None = None
    inbound: asyncio.Queue[bytes | None] | None = None


class _H2Protocol:
    """One HTTP/2 connection over an established asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_side: bool) -> None:
        self.reader, self.writer = reader, writer
        self.conn = H2Connection(config=_config(client_side))
        self.streams: dict[int, _Stream] = {}
        self.closed = asyncio.Event()
        self.reader_task: asyncio.Task[None] | None = None  # the client's frame reader, kept alive here
        self.keepalive_task: asyncio.Task[None] | None = None
        self.ping_acked = asyncio.Event()
        self.pings_acked = 0

    def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                                   SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                                   SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                                   SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def send(self, stream_id: int, data: bytes) -> bool:
        """Send `data` on the stream as the peer's windows allow; False once the stream is gone."""
        view = memoryview(data)
        while view:
            stream = self.streams.get(stream_id)
            if stream is None or self.closed.is_set():
                return False
            try:
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            except (StreamClosedError, ProtocolError):
                return False
            if window <= 0:
                stream.window_open.clear()
                await stream.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk))
            self.flush()
            await self.writer.drain()
        return True

    def end(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
            self.flush()
        except (StreamClosedError, ProtocolError):
            pass

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
            self.flush()
        except (StreamClosedError, ProtocolError):
            pass
        self.streams.pop(stream_id, None)

    def window_updated(self, event: WindowUpdated) -> None:
        targets = self.streams.values() if event.stream_id == 0 else [self.streams.get(event.stream_id)]
        for stream in targets:
            if stream is not None:
                stream.window_open.set()


async def _pump_upstream(h2: _H2Protocol, stream_id: int, reader: asyncio.StreamReader) -> None:
    """Upstream bytes -> DATA frames; upstream EOF -> END_STREAM."""
    try:
        while data := await reader.read(READ_CHUNK):
            if not await h2.send(stream_id, data):
                return
        h2.end(stream_id)
    except (ConnectionError, OSError):
        h2.reset(stream_id)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, trust_domain: str,
                           policy: Policy, connect: Callable[[str, int], Awaitable[tuple[asyncio.StreamReader,
                                                                                     asyncio.StreamWriter]]]
                           ) -> None:
    """Serve one accepted TLS connection on 15008 until it ends."""
    tls = writer.get_extra_info("ssl_object")
    peer = writer.get_extra_info("peername")
    try:
        identity = peer_identity(tls, trust_domain)
    except IdentityError as exc:
        log.warning("hbone peer refused", peer=str(peer), reason=str(exc))
        writer.close()
        return
    h2 = _H2Protocol(reader, writer, client_side=False)
    h2.start()
    await writer.drain()
    tasks: set[asyncio.Task[None]] = set()

    async def open_stream(stream_id: int, destination: tuple[str, int]) -> None:
        target = f"{destination[0]}:{destination[1]}"
        if not policy(identity, target):
            h2.conn.send_headers(stream_id, [(":status", "401")], end_stream=True)
            h2.flush()
            h2.streams.pop(stream_id, None)
            log.info("hbone stream denied", peer=str(identity), destination=target)
            return
        try:
            up_reader, up_writer = await connect(*destination)
        except OSError as exc:
            h2.conn.send_headers(stream_id, [(":status", "503")], end_stream=True)
            h2.flush()
            h2.streams.pop(stream_id, None)
            log.info("hbone upstream unreachable", peer=str(identity), destination=target, reason=str(exc))
            return
        stream = h2.streams.get(stream_id)
        if stream is None:  # reset while connecting
            up_writer.close()
            return
        stream.writer = up_writer
        h2.conn.send_headers(stream_id, [(":status", "200")])
        h2.flush()
        await _pump_upstream(h2, stream_id, up_reader)

    try:
        while data := await reader.read(READ_CHUNK):
            try:
                events = h2.conn.receive_data(data)
            except ProtocolError as exc:
                log.warning("hbone protocol error", peer=str(identity), reason=str(exc))
                h2.flush()
                break
            for event in events:
                if isinstance(event, RequestReceived):
                    status, destination, reason = connect_verdict(_text(event.headers))
                    if status:
                        h2.conn.send_headers(event.stream_id, [(":status", str(status))], end_stream=True)
                        log.info("hbone request refused", peer=str(identity), status=status, reason=reason)
                        continue
                    assert destination is not None
                    h2.streams[event.stream_id] = _Stream()
                    task = asyncio.create_task(open_stream(event.stream_id, destination))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(event, DataReceived):
                    stream = h2.streams.get(event.stream_id)
                    if stream is not None and stream.writer is not None:
                        stream.writer.write(event.data)
                        await stream.writer.drain()
                    h2.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    stream = h2.streams.get(event.stream_id)
                    if stream is not None and stream.writer is not None and stream.writer.can_write_eof():
                        stream.writer.write_eof()
                elif isinstance(event, StreamReset):
                    stream = h2.streams.pop(event.stream_id, None)
                    if stream is not None and stream.writer is not None:
                        stream.writer.close()
                elif isinstance(event, WindowUpdated):
                    h2.window_updated(event)
                elif isinstance(event, ConnectionTerminated):
                    h2.closed.set()
            h2.flush()
            await writer.drain()
    except (ConnectionError, OSError, ssl.SSLError):
        pass
    finally:
        h2.closed.set()
        for stream in h2.streams.values():
            stream.window_open.set()
            if stream.writer is not None:
                stream.writer.close()
        for task in tasks:
            task.cancel()
        writer.close()


async def open_upstream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection with the tunnel's socket mark, so capture rules never take it back in."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=READ_CHUNK)


@dataclass
class HboneStream:
    """The client end of one CONNECT stream."""

    h2: _H2Protocol
    stream_id: int
    inbound: asyncio.Queue[bytes | None]

    async def write(self, data: bytes) -> None:
        if not await self.h2.send(self.stream_id, data):
            raise ConnectionResetError("hbone stream closed")

    def write_eof(self) -> None:
        self.h2.end(self.stream_id)

    def close(self) -> None:
        """Abort the stream (RST_STREAM); the connection and its other streams go on."""
        self.h2.reset(self.stream_id)

    async def read(self) -> bytes:
        """Next chunk, b"" at END_STREAM."""
        chunk = await self.inbound.get()
        if chunk is None:
            return b""
        self.h2.conn.acknowledge_received_data(len(chunk), self.stream_id)
        self.h2.flush()
        return chunk


def marked_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket in this process's network namespace, with the tunnel's mark."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
    sock.setblocking(False)
    return sock


async def open_connection(peer: tuple[str, int], context: ssl.SSLContext, expected: SpiffeId,
                          timeout: float = 10.0, make_socket: Callable[[], socket.socket] | None = None
                          ) -> _H2Protocol:
    """A TLS + HTTP/2 connection to the tunnel at `peer`, verified to be `expected`, ready for streams.

    `make_socket` decides where the connection starts: a tunnel passes one that creates the socket in
    the source pod's network namespace, so the connection leaves through the pod's own interface.
    """
    sock = make_socket() if make_socket is not None else marked_socket(
        socket.AF_INET6 if ":" in peer[0] else socket.AF_INET)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, peer), timeout)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=context, server_hostname="", limit=READ_CHUNK), timeout)
    except BaseException:
        sock.close()
        raise
    try:
        expect_identity(writer.get_extra_info("ssl_object"), expected)
    except IdentityError:
        writer.close()
        raise
    h2 = _H2Protocol(reader, writer, client_side=True)
    h2.start()
    h2.reader_task = asyncio.create_task(_client_reader(h2))
    return h2


async def open_stream(h2: _H2Protocol, authority: str, timeout: float = 10.0) -> HboneStream:
    """A CONNECT stream to `authority` on an open connection; ConnectionRefusedError unless answered 200."""
    stream_id = h2.conn.get_next_available_stream_id()
    stream = _Stream(response=asyncio.get_running_loop().create_future(), inbound=asyncio.Queue())
    h2.streams[stream_id] = stream
    h2.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    h2.flush()
    assert stream.response is not None and stream.inbound is not None
    status = await asyncio.wait_for(stream.response, timeout)
    if status != 200:
        h2.streams.pop(stream_id, None)
        raise ConnectionRefusedError(f"HBONE CONNECT {authority}: status {status}")
    return HboneStream(h2, stream_id, stream.inbound)


async def hbone_connect(peer: tuple[str, int], authority: str, context: ssl.SSLContext, expected: SpiffeId,
                        timeout: float = 10.0) -> HboneStream:
    """One stream on its own new connection (the pool shares connections; this is the simple form)."""
    h2 = await open_connection(peer, context, expected, timeout)
    try:
        return await open_stream(h2, authority, timeout)
    except BaseException:
        h2.writer.close()
        raise


@dataclass
class HbonePool:
    """HTTP/2 connections to peer tunnels, shared by many CONNECT streams (as ztunnel pools them).

    Keyed by (peer address, expected identity); the client certificate comes from `context()` when a
    connection opens (so a renewed certificate is used by new connections only). A connection takes at
    most `max_streams` concurrent streams; then another one opens.
    """

    context: Callable[[], ssl.SSLContext]
    max_streams: int = MAX_STREAMS
    make_socket: Callable[[], socket.socket] | None = None
    keepalive: float = 30.0  # seconds between PINGs; a PING unanswered for as long closes the connection
    connections: dict[tuple[tuple[str, int], SpiffeId], list[_H2Protocol]] = field(default_factory=dict)

    async def connect(self, peer: tuple[str, int], authority: str, expected: SpiffeId,
                      timeout: float = 10.0) -> HboneStream:
        key = (peer, expected)
        live = [c for c in self.connections.get(key, []) if not c.closed.is_set()]
        self.connections[key] = live
        chosen = next((c for c in live if c.conn.open_outbound_streams < self.max_streams), None)
        if chosen is None:
            chosen = await open_connection(peer, self.context(), expected, timeout, self.make_socket)
            chosen.keepalive_task = asyncio.create_task(_keepalive(chosen, self.keepalive))
            live.append(chosen)
        return await open_stream(chosen, authority, timeout)

    async def close(self) -> None:
        """GOAWAY on every connection, then close them."""
        for connections in self.connections.values():
            for h2 in connections:
                if h2.keepalive_task is not None:
                    h2.keepalive_task.cancel()
                h2.conn.close_connection()
                h2.flush()
                h2.writer.close()
        self.connections.clear()


async def _keepalive(h2: _H2Protocol, interval: float) -> None:
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
            h2.closed.set()
            h2.writer.close()
            return


async def _client_reader(h2: _H2Protocol) -> None:
    try:
        while data := await h2.reader.read(READ_CHUNK):
            for event in h2.conn.receive_data(data):
                stream = h2.streams.get(getattr(event, "stream_id", 0) or 0)
                if isinstance(event, ResponseReceived) and stream is not None and stream.response is not None:
                    status = int(dict(_text(event.headers)).get(":status", "0"))
                    if not stream.response.done():
                        stream.response.set_result(status)
                elif isinstance(event, DataReceived) and stream is not None and stream.inbound is not None:
                    stream.inbound.put_nowait(event.data)
                elif isinstance(event, StreamEnded) and stream is not None and stream.inbound is not None:
                    stream.inbound.put_nowait(None)
                elif isinstance(event, StreamReset) and stream is not None:
                    if stream.response is not None and not stream.response.done():
                        stream.response.set_result(0)
                    if stream.inbound is not None:
                        stream.inbound.put_nowait(None)
                elif isinstance(event, WindowUpdated):
                    h2.window_updated(event)
                elif isinstance(event, PingAckReceived):
                    h2.pings_acked += 1
                    h2.ping_acked.set()
            h2.flush()
    except (ConnectionError, OSError, ssl.SSLError, ProtocolError):
        pass
    finally:
        h2.closed.set()
        for stream in h2.streams.values():
            stream.window_open.set()
            if stream.response is not None and not stream.response.done():
                stream.response.set_result(0)
            if stream.inbound is not None:
                stream.inbound.put_nowait(None)
