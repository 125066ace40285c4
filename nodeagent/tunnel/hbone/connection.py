"""One HTTP/2 connection carrying HBONE streams over a TLS transport, either side: the streams' state and
the data path (what `server` and `client` build on).

The data path runs in protocol callbacks, not in tasks over StreamReader/StreamWriter: a TLS read is
decrypted into one reused buffer, handed to h2, and each DATA frame is written to its stream's TCP
transport in the same callback; bytes read from a TCP transport become DATA frames in the callback
that read them. That saves the stream buffers' copies and a task switch per hop (bench/hbone_lab.py).
Backpressure is per stream, so one slow stream never stalls the others on its connection:
- inbound (peer -> local): a frame is written to the local transport at once; while that transport is
  above its high-water mark the stream's bytes are not acknowledged, so the peer's stream window (4 MiB)
  bounds what waits here, and the connection's other streams keep flowing;
- outbound (local -> peer): a local transport is paused while its stream has no window left, or while
  the TLS transport is above its high-water mark.
A bad stream is reset alone; the connection and its other streams go on. A half-close travels as
END_STREAM / write_eof.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import structlog
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

from nodeagent.tunnel.hbone.framing import HboneH2, PeerDraining, StreamRefused, h2_config, violation_reason
from nodeagent.tunnel.hbone.limits import (
    ACK_BATCH,
    CONNECTION_WINDOW,
    MAX_CONTROL_FRAME,
    MAX_FRAME,
    MAX_HEADER_LIST,
    MAX_STREAMS,
    SEND_FRAME,
    SOCKET_MARK,
    STREAM_WINDOW,
    TLS_READ_BUFFER,
    TLS_WRITE_HIGH,
)
from nodeagent.tunnel.hbone.request import header_text

log = structlog.get_logger("nodeagent.tunnel.hbone.connection")


@dataclass(eq=False)
class StreamState:
    """One CONNECT stream's state on our side of a connection."""

    id: int
    sending: bool = False  # HEADERS are out (client: the CONNECT; server: the 200): DATA may follow
    pending: deque[bytes | memoryview] = field(default_factory=deque)  # outbound, waiting for window
    pending_bytes: int = 0
    eof: bool = False  # the local side finished sending: END_STREAM once `pending` is out
    end_sent: bool = False
    remote_ended: bool = False
    unacked: int = 0  # inbound bytes taken but not yet acknowledged to the peer (see _deliver)
    sent: int = 0  # bytes from the local side, toward the peer
    received: int = 0  # bytes from the peer, to the local side
    local: LocalSide | None = None  # the TCP connection this stream carries (server: upstream; client: spliced)
    discard: bool = False  # the local connection is gone: inbound bytes are acknowledged and dropped
    early: list[bytes] = field(default_factory=list)  # server: DATA that came before the upstream was up
    inbound: asyncio.Queue[bytes | None] | None = None  # HboneStream.read, when not spliced
    response: asyncio.Future[int] | None = None
    writable: asyncio.Event = field(default_factory=asyncio.Event)  # nothing pending, TLS not paused
    done: asyncio.Future[None] | None = None  # resolved when the stream is finished or aborted
    born: float = 0.0  # server: loop time of its HEADERS (a reset soon after is premature, see on_reset)


def nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY, as ztunnel and Envoy set it on every connection: a CONNECT, its 200 and small
    request/response exchanges must not wait for Nagle's delayed ACK (40 ms a round on Linux). asyncio sets
    it only on sockets made with proto IPPROTO_TCP (ours are made with 0), and uvloop, measured, not on the
    sockets handed to it with sock= (a CONNECT round: 43 ms on asyncio, 2.9 ms on uvloop, 1.3 ms with it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LocalSide(asyncio.Protocol):
    """The plain TCP side of one stream; every callback goes straight to the stream's connection."""

    def __init__(self, h2: HboneConnection, stream: StreamState) -> None:
        self.h2, self.stream = h2, stream
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.write_paused = False
        self.keep: object = None  # the StreamWriter this connection came from (its __del__ would close it)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.h2.send_local(self.stream, data)

    def eof_received(self) -> bool:
        self.h2.local_eof(self.stream)
        return True  # half-close: the other direction goes on

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.h2.local_writable(self.stream)

    def connection_lost(self, exc: Exception | None) -> None:
        self.h2.local_lost(self.stream, exc)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()


class HboneConnection(asyncio.BufferedProtocol):
    """One HTTP/2 connection over a TLS transport (either side); see the module doc for the data path."""

    def __init__(self, client_side: bool) -> None:
        self.conn = HboneH2(config=h2_config(client_side))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamState] = {}
        self.closed = asyncio.Event()
        self.keepalive_task: asyncio.Task[None] | None = None
        self.ping_acked = asyncio.Event()
        self.pings_acked = 0
        self.write_paused = False
        self.on_request: Callable[[RequestReceived], None] | None = None  # the server's CONNECT handler
        # The server's guard (serve_connection): a stream the peer reset, one refused over the limits, a
        # connection error (reason, detail), and a check after each read (header blocks in progress).
        self.on_reset: Callable[[int, StreamState | None], None] | None = None
        self.on_refused: Callable[[int], None] | None = None
        self.on_violation: Callable[[str, str], None] | None = None
        self.on_received: Callable[[], None] | None = None
        self.keep: object = None  # the StreamWriter this connection came from (its __del__ would close it)
        self.buffer = memoryview(bytearray(TLS_READ_BUFFER))

    @property
    def writer(self) -> asyncio.Transport:
        """The TLS transport (get_extra_info, close), named as the stream writer it replaced."""
        assert self.transport is not None
        return self.transport

    # -- the TLS transport's callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        nodelay(transport)
        self.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH)
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                                   SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                                   SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                                   SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        # h2 applies our header list limit only once the peer acknowledges the SETTINGS (64 KiB until then);
        # a peer may send its first requests before that, so the decoder holds them to it from the start.
        self.conn.decoder.max_header_list_size = MAX_HEADER_LIST
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.receive(self.buffer[:nbytes])

    def eof_received(self) -> bool:
        return False  # the peer is done: close, connection_lost ends every stream

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self.streams.values()):
            self.abort(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.writable.clear()
            if stream.local is not None:
                stream.local.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            self.pump(stream)

    # -- h2

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def receive(self, data: bytes | memoryview) -> None:
        """Feed bytes from the peer to h2 and act on every event, then send what h2 has to say."""
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:  # h2 queued a GOAWAY with the error's code: it goes out, then the close
            if self.on_violation is not None:
                self.on_violation(violation_reason(exc), str(exc))
            else:
                log.warning("hbone protocol error", reason=str(exc))
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._deliver(event)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        self.pump(stream)
                else:
                    for stream in list(self.streams.values()):
                        self.pump(stream)
            elif isinstance(event, StreamEnded):
                self._remote_end(event.stream_id)
            elif isinstance(event, RequestReceived) and self.on_request is not None:
                self.on_request(event)
            elif isinstance(event, ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.response is not None and not stream.response.done():
                    stream.response.set_result(int(dict(header_text(event.headers)).get(":status", "0")))
            elif isinstance(event, StreamReset):
                gone = self.streams.pop(event.stream_id, None)
                if gone is not None:
                    self.abort(gone)
                    self._close_if_drained()
                if self.on_reset is not None and event.remote_reset:
                    self.on_reset(event.stream_id, gone)
            elif isinstance(event, PingAckReceived):
                self.pings_acked += 1
                self.ping_acked.set()
            elif isinstance(event, ConnectionTerminated) and self.transport is not None:
                self.transport.close()  # h2 sends nothing more after a GOAWAY: end the connection's streams
            elif isinstance(event, StreamRefused) and self.on_refused is not None:
                self.on_refused(event.stream_id)
            elif isinstance(event, PeerDraining):
                self._peer_draining(event.last_stream_id)
        if self.on_received is not None:
            self.on_received()
        self.flush()

    @property
    def draining(self) -> bool:
        """Either side sent a graceful GOAWAY: no new stream opens here; the open ones finish, then it closes."""
        return self.conn.drain_last is not None or self.conn.peer_drain_last is not None

    def drain(self) -> None:
        """Graceful GOAWAY to the peer (`HboneH2.drain`); the connection closes once its last stream ends."""
        if self.closed.is_set() or self.transport is None or self.transport.is_closing():
            return
        self.conn.drain()
        self.flush()
        self._close_if_drained()

    def _peer_draining(self, last_stream_id: int) -> None:
        """Streams we opened above the peer's last one were never processed (RFC 9113 6.8): they end as
        refused, so the caller may retry them elsewhere; the rest go on."""
        for stream_id in [i for i in self.streams if i > last_stream_id and i % 2 == 1]:
            gone = self.streams.pop(stream_id)
            self.abort(gone)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams and not self.closed.is_set():
            self.goaway(ErrorCodes.NO_ERROR, "drained")

    def goaway(self, code: ErrorCodes, debug: str = "") -> None:
        """GOAWAY (last stream: the highest the peer opened), then close once it is written."""
        with contextlib.suppress(ProtocolError):
            self.conn.close_connection(error_code=code, additional_data=debug.encode()[:MAX_CONTROL_FRAME])
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _deliver(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        length = event.flow_controlled_length
        data = event.data
        if stream is None or stream.discard:
            self.conn.acknowledge_received_data(length, event.stream_id)  # the connection window comes back
        elif stream.local is not None:
            assert stream.local.transport is not None
            stream.local.transport.write(data)
            stream.received += len(data)
            stream.unacked += length
            # Acknowledged in batches (h2 sends WINDOW_UPDATE only at half a window anyway), and not while
            # the local transport is above its high-water mark: then on resume_writing.
            if stream.unacked >= ACK_BATCH and not stream.local.write_paused:
                self.conn.acknowledge_received_data(stream.unacked, stream.id)
                stream.unacked = 0
        elif stream.inbound is not None:
            stream.inbound.put_nowait(data)  # acknowledged as it is read (HboneStream.read)
            stream.received += len(data)
            if length > len(data):
                self.conn.acknowledge_received_data(length - len(data), stream.id)  # padding
        else:
            stream.early.append(data)  # the upstream is still being connected
            stream.received += len(data)
            stream.unacked += length

    def _remote_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        if stream.local is not None:
            assert stream.local.transport is not None
            if stream.local.transport.can_write_eof() and not stream.local.transport.is_closing():
                stream.local.transport.write_eof()
        elif stream.inbound is not None:
            stream.inbound.put_nowait(None)
        self._maybe_finish(stream)

    def pump(self, stream: StreamState) -> None:
        """Send the stream's pending bytes as far as the windows allow; END_STREAM after the last."""
        if not stream.sending or self.write_paused:
            return
        conn, pending, sent = self.conn, stream.pending, False
        try:
            while pending:
                window = min(conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size, SEND_FRAME)
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) <= window:
                    pending.popleft()
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    chunk, pending[0] = view[:window], view[window:]
                stream.pending_bytes -= len(chunk)
                last = stream.eof and not pending
                conn.send_data(stream.id, chunk, end_stream=last)
                stream.end_sent |= last
                sent = True
            if not pending and stream.eof and not stream.end_sent:
                conn.end_stream(stream.id)
                stream.end_sent = sent = True
        except (StreamClosedError, ProtocolError):  # reset meanwhile: nothing more goes out on it
            pending.clear()
            stream.pending_bytes = 0
            stream.end_sent = True
        if sent:
            self.flush()
        if not pending:
            if not stream.writable.is_set():
                stream.writable.set()
            if stream.local is not None and stream.local.reading_paused:
                stream.local.resume_reading()
        if stream.end_sent and stream.remote_ended:
            self._maybe_finish(stream)

    # -- calls from the local side of a stream

    def send_local(self, stream: StreamState, data: bytes | memoryview) -> None:
        """Bytes the local side sent: out as DATA now, or held (and the local side paused) for window."""
        if stream.end_sent or self.closed.is_set():
            return
        stream.pending.append(data)
        stream.pending_bytes += len(data)
        stream.sent += len(data)
        self.pump(stream)
        if stream.pending or self.write_paused:
            stream.writable.clear()
            if stream.local is not None:
                stream.local.pause_reading()

    def local_eof(self, stream: StreamState) -> None:
        stream.eof = True
        self.pump(stream)

    def local_writable(self, stream: StreamState) -> None:
        """The local transport drained: acknowledge what it took meanwhile, so the peer may send more."""
        if stream.unacked and stream.id in self.streams:
            self.conn.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
            self.flush()

    def local_lost(self, stream: StreamState, exc: Exception | None) -> None:
        """The local connection closed: an error resets the stream; else inbound bytes are dropped."""
        stream.local = None
        if stream.id not in self.streams:
            return
        if exc is not None or not stream.eof:
            self.reset(stream.id)
            return
        stream.discard = True
        if stream.unacked:
            self.local_writable(stream)
        self._maybe_finish(stream)

    # -- stream life

    def attach(self, stream: StreamState, local: LocalSide) -> None:
        """Carry `stream` over `local` (a connected transport): hand it what arrived before."""
        stream.local = local
        assert local.transport is not None
        for data in stream.early:
            local.transport.write(data)
        stream.early.clear()
        if stream.inbound is not None:  # read by nobody yet: the queue's chunks go first
            while not stream.inbound.empty():
                chunk = stream.inbound.get_nowait()
                if chunk is not None:
                    local.transport.write(chunk)
                    stream.unacked += len(chunk)
            stream.inbound = None
        if stream.remote_ended and local.transport.can_write_eof():
            local.transport.write_eof()
        if not local.write_paused:
            self.local_writable(stream)
        self.pump(stream)

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """RST_STREAM `stream_id`; the connection and its other streams go on."""
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self.conn.reset_stream(stream_id, code)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.abort(stream)
        self.flush()
        self._close_if_drained()

    def _maybe_finish(self, stream: StreamState) -> None:
        if stream.end_sent and stream.remote_ended and self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if stream.unacked:  # the stream is closed: this gives back the connection's window only
                self.conn.acknowledge_received_data(stream.unacked, stream.id)
                stream.unacked = 0
                self.flush()
            if stream.local is not None and stream.local.transport is not None:
                stream.local.transport.close()  # both directions are done; buffered bytes are still written
            if stream.done is not None and not stream.done.done():
                stream.done.set_result(None)
            self._close_if_drained()

    def abort(self, stream: StreamState) -> None:
        """The stream is gone (reset, or its connection ended): close its local side, wake its waiters."""
        stream.end_sent = stream.remote_ended = True
        if stream.unacked and not self.closed.is_set():  # held back for a slow reader: the connection's window
            self.conn.acknowledge_received_data(stream.unacked, stream.id)  # must not shrink for good
            stream.unacked = 0
        stream.early.clear()
        stream.pending.clear()
        stream.writable.set()
        if stream.local is not None and stream.local.transport is not None:
            stream.local.transport.close()
        if stream.response is not None and not stream.response.done():
            stream.response.set_result(0)
        if stream.inbound is not None:
            stream.inbound.put_nowait(None)
        if stream.done is not None and not stream.done.done():
            stream.done.set_result(None)


def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               protocol: LocalSide | HboneConnection) -> tuple[bytes, bool]:
    """Move a connection made with the streams API onto `protocol`: (bytes the reader had buffered, EOF
    seen). The caller feeds those to the protocol after it is set up."""
    protocol.keep = writer
    transport = cast(asyncio.Transport, writer.transport)
    pending: bytearray = reader._buffer  # type: ignore[attr-defined]  # read, but consumed by nobody yet
    buffered = bytes(pending)
    pending.clear()
    eof = reader.at_eof()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if not transport.is_reading():  # the stream protocol pauses reading when its buffer is full
        transport.resume_reading()
    return buffered, eof



def marked_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket in this process's network namespace, with the tunnel's mark."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
    sock.setblocking(False)
    return sock
