"""HBONE: one TCP connection tunnelled as one HTTP/2 CONNECT stream over mutual TLS (DESIGN §4).

`h2` does all framing and flow control; this module decides what a CONNECT means and moves bytes:
- **server** (15008): a CONNECT whose `:authority` is `ip:port` gets an upstream TCP connection; 200
  only once it is up, 503 if it cannot be made, 401 when policy denies, 400 for anything that is not
  a classic CONNECT to an address. Bytes flow both ways with backpressure; a half-close travels as
  END_STREAM / write_eof.
- **client**: opens the TLS connection (checking the server's SPIFFE ID), sends the CONNECT, waits for
  200, then carries a local stream.
Windows are ztunnel's: 4 MiB per stream, 16 MiB per connection. A bad stream is reset alone; the
connection and its other streams go on.

Hostile peers (the server side, every cost bounded; each refusal is logged naming the peer and counted
through `violation(reason)`, the tunnel's nodeagent_hbone_protocol_violations_total{reason}):
- TLS (`serve_tls`): the handshake is the server's own, so a refused one is seen and named (tls.py:
  TLS < 1.3, no client certificate, untrusted chain, expired / not yet valid leaf, stalled handshake);
  then ALPN h2 and the trust domain (`peer_identity`).
- h2 4.x already bounds: the decoded header list (hpack's max_header_list_size, the HPACK-bomb guard;
  h2 applies our 16 KiB only once the peer acknowledged our SETTINGS, we set it from the first byte),
  64 CONTINUATION frames per block, frames beyond SETTINGS_MAX_FRAME_SIZE, even / decreasing stream ids
  (connection errors, RFC 9113 5.1.1), and closed streams remembered (2^16). What it lacks is added here:
  - the *encoded* header block is capped (`MAX_HEADER_BLOCK`, `MAX_CONTINUATIONS`) when each frame's
    header arrives, before its body is buffered: h2's 64-frame cap alone lets a block reach 64 x our
    16 MiB frame size (CVE-2024-27316 class, "CONTINUATION flood"); any other non-DATA frame is capped at
    `MAX_CONTROL_FRAME` bytes;
  - SETTINGS, PING and other control frames (and empty DATA frames) are budgeted per `FLOOD_WINDOW`:
    each is answered or processed at once, so a flood is CPU and queued ACKs (CVE-2019-9512, -9515,
    -9518; Envoy bounds the same with max_outbound_control_frames and
    max_consecutive_inbound_frames_with_empty_payload, nghttp2 with its queued-ACK limit);
    WINDOW_UPDATEs are bounded by what we sent (Envoy's max_inbound_window_update_frames_per_data_frame_sent);
  - a stream over MAX_CONCURRENT_STREAMS is refused alone (REFUSED_STREAM; RFC 9113 5.1.2 allows it,
    h2 would end the whole connection), as is one while `MAX_PENDING_OPENS` upstream connects are
    in flight; too many refusals per window close the connection;
  - rapid reset (CVE-2023-44487): a stream reset by the peer before its 200 cancels its upstream
    connect at once; a reset then or within `PREMATURE_RESET` of the stream's HEADERS is premature, and
    more than `RESET_BUDGET` premature resets per window close the connection (GOAWAY
    ENHANCE_YOUR_CALM), as rust h2's max_pending_accept_reset_streams (ztunnel's stack) and Envoy's
    premature-reset check (overload.premature_reset_*, 1.24.11 / 1.27.1 and later) do;
  - slowloris: no complete CONNECT within `REQUEST_TIMEOUT` of the handshake (no preface, a trickled
    first request), or a header block still incomplete `REQUEST_TIMEOUT` after its first byte, closes
    the connection; a connection without streams for `IDLE_TIMEOUT` is closed with GOAWAY NO_ERROR
    (Envoy's HCM idle_timeout, 1 h by default).

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
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameDataMissingError,
    FrameTooLargeError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe import frame as _hyperframe_frame
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import Frame

from nodeagent.ca.identity import IdentityError, SpiffeId
from nodeagent.tunnel.identity.tls import PeerRefused, expect_identity, handshake_failure, peer_identity

log = structlog.get_logger("nodeagent.tunnel.hbone.protocol")


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

_padded_data_body = _hyperframe_frame.DataFrame.serialize_body


def _data_body(self: _hyperframe_frame.DataFrame) -> Any:
    """An unpadded DATA frame's body is its data: no join into a new bytes (serialize() prepends the
    header, the one copy left). Same bytes on the wire; padded frames take hyperframe's own path."""
    if "PADDED" in self.flags:
        return _padded_data_body(self)
    return self.data


_hyperframe_frame.DataFrame.serialize_body = _data_body  # type: ignore[method-assign]


def _data_repr(self: _hyperframe_frame.DataFrame) -> str:
    """A DATA frame as h2's trace log shows it, formatted for every frame received, logging or not (a
    tenth of the tunnel's work per small message): the stream and the body's length only."""
    return f"DataFrame(stream_id={self.stream_id}, length={len(self.data)})"


_hyperframe_frame.DataFrame.__repr__ = _data_repr  # type: ignore[method-assign,assignment]

STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = (1 << 24) - 1  # the largest frame we accept (RFC 9113's maximum): peers may send whole reads
SEND_FRAME = 256 << 10  # the largest frame we send: a TCP read (uvloop and asyncio read up to 256 KiB)
MAX_HEADER_LIST = 16 << 10
MAX_STREAMS = 100
SOCKET_MARK = 0x539  # every socket the tunnel opens toward the network (excluded from capture)
READ_CHUNK = 256 << 10
TLS_READ_BUFFER = 256 << 10
TLS_WRITE_HIGH = 1 << 20  # above this much unsent TLS data, local transports stop being read
ACK_BATCH = 64 << 10  # received bytes acknowledged together (at most this much per stream held back)

# Bounds on what a peer may make the server do (see the module doc; the server side's reasons are VIOLATIONS).
MAX_HEADER_BLOCK = MAX_HEADER_LIST + 256  # encoded bytes of one header block, padding included
MAX_CONTINUATIONS = 16  # CONTINUATION frames per header block (h2 allows 64, each up to MAX_FRAME)
MAX_CONTROL_FRAME = 16 << 10  # payload of any frame but DATA and header blocks (a GOAWAY's debug data)
FLOOD_WINDOW = 10.0  # seconds over which the budgets below are counted
PING_BUDGET = 100  # PINGs per window (a keepalive is one per 30 s; each is answered at once)
SETTINGS_BUDGET = 100  # SETTINGS frames per window (a peer sends one, plus its ACKs)
CONTROL_BUDGET = 1000  # other non-DATA frames but RST_STREAM / WINDOW_UPDATE, and empty DATA frames
RESET_BUDGET = 2 * MAX_STREAMS  # streams the peer resets prematurely, per window
PREMATURE_RESET = 1.0  # a stream reset by the peer within this many seconds of its HEADERS is premature (Envoy's
                       # overload.premature_reset_min_stream_lifetime_seconds default)
REFUSED_BUDGET = 2 * MAX_STREAMS  # streams refused (over the stream limits), per window
MAX_PENDING_OPENS = MAX_STREAMS  # upstream connects in flight per connection
HANDSHAKE_TIMEOUT = 10.0  # a TLS handshake not done by then is aborted
REQUEST_TIMEOUT = 10.0  # the first CONNECT after the handshake, and any header block, complete by then
IDLE_TIMEOUT = 3600.0  # a connection without streams this long is closed (GOAWAY NO_ERROR)

# Every `reason` the server reports, for the metric's documentation and the tests.
VIOLATIONS = (
    # TLS and identity (tls.handshake_failure, tls.PeerRefused)
    "tls_version", "no_client_certificate", "certificate_untrusted", "certificate_expired",
    "certificate_not_yet_valid", "handshake_timeout", "handshake_aborted", "tls_handshake", "alpn", "identity",
    "trust_domain",
    # HTTP/2
    "preface", "preface_timeout", "request_timeout", "header_timeout", "header_list_too_large",
    "continuation_flood", "frame_too_large", "settings_flood", "ping_flood", "control_frame_flood",
    "empty_frame_flood", "window_update_flood", "rapid_reset", "max_streams", "refused_stream_flood",
    "stream_id", "flow_control", "protocol_error",
)
_HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING = 0x1, 0x3, 0x4, 0x5, 0x6  # frame types, RFC 9113 6
_WINDOW_UPDATE, _CONTINUATION = 0x8, 0x9

# (peer identity, destination "ip:port") -> True (allowed), False (401: denied by policy), or the HTTP
# status to refuse the CONNECT with (400: not a target this listener serves; 503: not serving yet)
Policy = Callable[[SpiffeId, str], "bool | int"]


class ConnectRefused(ConnectionRefusedError):
    """The peer tunnel answered a CONNECT with a status other than 200 (`status` 0: the stream was reset)."""

    def __init__(self, authority: str, status: int) -> None:
        super().__init__(f"HBONE CONNECT {authority}: status {status}")
        self.status = status
# (peer identity, "ip:port", abort) at the 200 -> called with (request bytes, response bytes) when the stream
# ends; `abort()` resets the stream (a policy that changed now denies it)
Observe = Callable[[SpiffeId, str, Callable[[], None]], Callable[[int, int], None]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# How the server reaches an upstream: a connected socket (the fast path), or a stream pair.
Connect = Callable[[str, int], Awaitable["socket.socket | Streams"]]


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


class Violation(DenialOfServiceError):
    """A peer exceeded one of our bounds: h2 answers with GOAWAY `error_code` (ENHANCE_YOUR_CALM unless
    said otherwise), the connection closes, `reason` is counted."""

    def __init__(self, reason: str, detail: str, code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        super().__init__(detail)
        self.reason = reason
        self.error_code = code


def violation_reason(exc: ProtocolError) -> str:
    """The metric's `reason` for a connection error, ours (`Violation`) or one h2 found."""
    if isinstance(exc, Violation):
        return exc.reason
    text = str(exc)
    if isinstance(exc, DenialOfServiceError):
        return "header_list_too_large"  # h2 raises it for hpack's OversizedHeaderListError only
    if isinstance(exc, StreamIDTooLowError) or "stream ID" in text or "Trailers" in text:
        return "stream_id"  # an even id, a lower one, or HEADERS again on an open CONNECT stream
    if isinstance(exc, TooManyStreamsError):
        return "max_streams"
    if isinstance(exc, FrameTooLargeError):
        return "frame_too_large"
    if isinstance(exc, FlowControlError):
        return "flow_control"
    if "preamble" in text:
        return "preface"
    return "protocol_error"


class _Budget:
    """At most `limit` events per FLOOD_WINDOW seconds: a fixed window, exact enough against floods and
    one comparison per event."""

    __slots__ = ("count", "limit", "start")

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.start = limit, 0, time.monotonic()

    def spend(self) -> bool:
        """Count one event; False once the window's budget is exceeded."""
        now = time.monotonic()
        if now - self.start >= FLOOD_WINDOW:
            self.start, self.count = now, 0
        self.count += 1
        return self.count <= self.limit


class _StreamRefused(Event):
    """A stream the server refused with REFUSED_STREAM before it reached the application (not h2's)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


def _config(client_side: bool) -> H2Configuration:
    return H2Configuration(client_side=client_side, header_encoding="utf-8", validate_inbound_headers=True)


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, parsing each frame from a view of the buffered bytes instead of from a copy
    of them (hyperframe copies a frame's body out of the view it is given; one copy per byte fewer).

    It also screens every frame but DATA as soon as its 9-byte header is in: a header block or control
    frame over its size cap is refused before its body is waited for (so never buffered), and the
    control-frame budgets are spent once per whole frame (see the module doc). DATA frames pass with
    one comparison: flow control bounds them."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self.block = 0  # encoded bytes of the header block being received
        self.continuations = 0
        self.pings, self.settings = _Budget(PING_BUDGET), _Budget(SETTINGS_BUDGET)
        self.control = _Budget(CONTROL_BUDGET)

    def header_pending(self) -> bool:
        """A header block is under way: CONTINUATIONs are awaited, or the buffered partial frame is a
        HEADERS / CONTINUATION (or too short to tell)."""
        data = self._data
        return bool(self._headers_buffer) or (len(data) > 0 and (len(data) < 4 or data[3] in (_HEADERS,
                                                                                                _CONTINUATION)))

    def _screen(self, kind: int, length: int) -> None:
        """Size caps, checked on the frame header alone (so before the body is buffered)."""
        if kind in (_HEADERS, _PUSH_PROMISE):
            if length > MAX_HEADER_BLOCK:
                raise Violation("header_list_too_large", f"a {length}-byte HEADERS frame (at most {MAX_HEADER_BLOCK})")
        elif kind == _CONTINUATION:
            if self.block + length > MAX_HEADER_BLOCK:
                raise Violation("continuation_flood", f"a header block past {MAX_HEADER_BLOCK} bytes in CONTINUATIONs")
        elif length > MAX_CONTROL_FRAME:
            raise Violation("frame_too_large", f"a {length}-byte frame of type {kind} (at most {MAX_CONTROL_FRAME})",
                            ErrorCodes.FRAME_SIZE_ERROR)

    def _count(self, frame: Frame, kind: int, length: int) -> None:
        """Spend the budgets of one whole non-DATA frame."""
        if kind in (_HEADERS, _PUSH_PROMISE):
            self.block, self.continuations = length, 0
        elif kind == _CONTINUATION:
            self.block += length
            self.continuations += 1
            if self.continuations > MAX_CONTINUATIONS:
                raise Violation("continuation_flood", f"more than {MAX_CONTINUATIONS} CONTINUATION frames in a block")
        elif kind == _PING:
            if not self.pings.spend():
                raise Violation("ping_flood", f"more than {PING_BUDGET} PINGs in {FLOOD_WINDOW:g} s")
        elif kind == _SETTINGS:
            if not self.settings.spend():
                raise Violation("settings_flood", f"more than {SETTINGS_BUDGET} SETTINGS in {FLOOD_WINDOW:g} s")
        elif kind != _RST_STREAM and kind != _WINDOW_UPDATE and not self.control.spend():
            # RST_STREAM is the streams' budget (rapid reset); WINDOW_UPDATE comes with the data we send
            raise Violation("control_frame_flood", f"more than {CONTROL_BUDGET} control frames in {FLOOD_WINDOW:g} s")

    def __next__(self) -> Frame:
        data = self._data
        if len(data) < 9:
            raise StopIteration
        with memoryview(data) as view:
            try:
                frame, length = Frame.parse_frame_header(view[:9])
            except (InvalidDataError, InvalidFrameError) as err:
                raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
            kind = frame.type
            if kind:
                self._screen(kind, length)
            if len(data) < length + 9:
                raise StopIteration
            self._validate_frame_length(length)
            if kind:
                self._count(frame, kind, length)
            elif not length and "END_STREAM" not in frame.flags and not self.control.spend():
                raise Violation("empty_frame_flood", f"more than {CONTROL_BUDGET} empty frames in {FLOOD_WINDOW:g} s")
            try:
                frame.parse_body(view[9:9 + length])
            except InvalidDataError as err:
                raise ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise FrameDataMissingError("Frame data missing or invalid") from err
        del data[:9 + length]
        parsed = self._update_header_buffer(frame)
        return parsed if parsed is not None else self.__next__()


class _H2(H2Connection):
    """h2's connection with fewer copies of each byte: frames parsed from a view (`_FrameBuffer`), and
    serialized frames kept as they are until sent instead of appended to one growing bytearray and
    copied out again (one frame per send, the usual case, goes out as the very bytes hyperframe made)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self._frames: list[bytes] = []
        self._admit = False  # _receive_headers_frame: take a stream over the limit, to refuse it alone
        self.sent_frames = 0  # frames we sent: what the peer's WINDOW_UPDATEs may answer
        self.window_updates = 0
        self.streams_opened = 0  # by the peer (not its highest id: a peer may jump straight to 2^31 - 1)

    def _receive_window_update_frame(self, frame: Any) -> tuple[list[Frame], list[Event]]:
        """h2's, after a bound on WINDOW_UPDATEs: each one makes us look at every stream with data to send,
        so a flood of them is CPU times the streams. A peer acknowledges what we send, so their number
        is bounded by ours, as Envoy bounds it (max_inbound_window_update_frames_per_data_frame_sent,
        10 by default; its check is 1 + 2 * (streams + 10 * DATA frames sent), here all frames sent)."""
        self.window_updates += 1
        if self.window_updates > CONTROL_BUDGET + 2 * (self.streams_opened + 10 * self.sent_frames):
            raise Violation("window_update_flood", f"{self.window_updates} WINDOW_UPDATEs for {self.sent_frames} "
                                                   "frames sent")
        return super()._receive_window_update_frame(frame)

    @property
    def open_inbound_streams(self) -> int:
        return 0 if self._admit else super().open_inbound_streams

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Frame], list[Event]]:
        """h2's, but a new stream over our MAX_CONCURRENT_STREAMS is refused alone (REFUSED_STREAM, which
        RFC 9113 5.1.2 allows) where h2 ends the connection, every other stream with it. The header block
        is decoded all the same: the HPACK state is the connection's."""
        if self.config.client_side or frame.stream_id in self.streams:
            return super()._receive_headers_frame(frame)
        self.streams_opened += 1
        if self.open_inbound_streams < self.local_settings.max_concurrent_streams:
            return super()._receive_headers_frame(frame)
        self._admit = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._admit = False
        self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        kept = [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]
        return frames, [*kept, _StreamRefused(frame.stream_id)]

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        self.sent_frames += len(frames)
        self._frames.extend(frame.serialize() for frame in frames)

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._data_to_send:  # written directly by h2 (the connection preface): it goes first
            self._frames.insert(0, bytes(self._data_to_send))
            self._data_to_send = bytearray()
        if amount is not None:
            self._data_to_send = bytearray(b"".join(self._frames))
            self._frames.clear()
            return super().data_to_send(amount)
        out = b"".join(self._frames)  # a single bytes is returned as itself, not copied
        self._frames.clear()
        return out

    def clear_outbound_data_buffer(self) -> None:
        super().clear_outbound_data_buffer()
        self._frames.clear()


@dataclass(eq=False)
class _Stream:
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
    local: _Local | None = None  # the TCP connection this stream carries (server: upstream; client: spliced)
    discard: bool = False  # the local connection is gone: inbound bytes are acknowledged and dropped
    early: list[bytes] = field(default_factory=list)  # server: DATA that came before the upstream was up
    inbound: asyncio.Queue[bytes | None] | None = None  # HboneStream.read, when not spliced
    response: asyncio.Future[int] | None = None
    writable: asyncio.Event = field(default_factory=asyncio.Event)  # nothing pending, TLS not paused
    done: asyncio.Future[None] | None = None  # resolved when the stream is finished or aborted
    born: float = 0.0  # server: loop time of its HEADERS (a reset soon after is premature, see on_reset)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY, as ztunnel and Envoy set it on every connection: a CONNECT, its 200 and small
    request/response exchanges must not wait for Nagle's delayed ACK (40 ms a round on Linux). asyncio sets
    it only on sockets made with proto IPPROTO_TCP (ours are made with 0), and uvloop, measured, not on the
    sockets handed to it with sock= (a CONNECT round: 43 ms on asyncio, 2.9 ms on uvloop, 1.3 ms with it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Local(asyncio.Protocol):
    """The plain TCP side of one stream; every callback goes straight to the stream's connection."""

    def __init__(self, h2: _Connection, stream: _Stream) -> None:
        self.h2, self.stream = h2, stream
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.write_paused = False
        self.keep: object = None  # the StreamWriter this connection came from (its __del__ would close it)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        _nodelay(transport)

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


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection over a TLS transport (either side); see the module doc for the data path."""

    def __init__(self, client_side: bool) -> None:
        self.conn = _H2(config=_config(client_side))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = asyncio.Event()
        self.keepalive_task: asyncio.Task[None] | None = None
        self.ping_acked = asyncio.Event()
        self.pings_acked = 0
        self.write_paused = False
        self.on_request: Callable[[RequestReceived], None] | None = None  # the server's CONNECT handler
        # The server's guard (serve_connection): a stream the peer reset, one refused over the limits, a
        # connection error (reason, detail), and a check after each read (header blocks in progress).
        self.on_reset: Callable[[int, _Stream | None], None] | None = None
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
        _nodelay(transport)
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
            self._abort(stream)
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
                    stream.response.set_result(int(dict(_text(event.headers)).get(":status", "0")))
            elif isinstance(event, StreamReset):
                gone = self.streams.pop(event.stream_id, None)
                if gone is not None:
                    self._abort(gone)
                if self.on_reset is not None and event.remote_reset:
                    self.on_reset(event.stream_id, gone)
            elif isinstance(event, PingAckReceived):
                self.pings_acked += 1
                self.ping_acked.set()
            elif isinstance(event, ConnectionTerminated) and self.transport is not None:
                self.transport.close()  # h2 sends nothing more after a GOAWAY: end the connection's streams
            elif isinstance(event, _StreamRefused) and self.on_refused is not None:
                self.on_refused(event.stream_id)
        if self.on_received is not None:
            self.on_received()
        self.flush()

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

    def pump(self, stream: _Stream) -> None:
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

    def send_local(self, stream: _Stream, data: bytes | memoryview) -> None:
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

    def local_eof(self, stream: _Stream) -> None:
        stream.eof = True
        self.pump(stream)

    def local_writable(self, stream: _Stream) -> None:
        """The local transport drained: acknowledge what it took meanwhile, so the peer may send more."""
        if stream.unacked and stream.id in self.streams:
            self.conn.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
            self.flush()

    def local_lost(self, stream: _Stream, exc: Exception | None) -> None:
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

    def attach(self, stream: _Stream, local: _Local) -> None:
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
            self._abort(stream)
        self.flush()

    def _maybe_finish(self, stream: _Stream) -> None:
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

    def _abort(self, stream: _Stream) -> None:
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


def _take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               protocol: _Local | _Connection) -> tuple[bytes, bool]:
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


async def _connect_local(connect: Connect, host: str, port: int, local: _Local) -> None:
    """Connect the upstream of a server stream onto `local` (before the 200 goes out)."""
    made = await connect(host, port)
    if isinstance(made, socket.socket):
        try:
            await asyncio.get_running_loop().create_connection(lambda: local, sock=made)
        except BaseException:
            made.close()
            raise
        return
    buffered, eof = _take_over(*made, local)
    if buffered:
        local.data_received(buffered)
    if eof:
        local.eof_received()


Violations = Callable[[str], None]  # counts one refusal by reason (the tunnel's protocol_violations counter)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, trust_domain: str,
                           policy: Policy, connect: Connect, observe: Observe | None = None,
                           violation: Violations | None = None, request_timeout: float = REQUEST_TIMEOUT,
                           idle_timeout: float | None = IDLE_TIMEOUT) -> None:
    """Serve one accepted TLS connection on 15008 until it ends.

    `connect(host, port)` reaches an upstream: a connected socket (the fast path, see
    `upstream_socket`) or a (reader, writer) pair (`open_upstream`). `observe(peer, target, abort)` is told of
    each stream that got its 200 and returns what to call with (request bytes, response bytes) when the
    stream ends (the tunnel's metrics and access log). `violation(reason)` is told of every refusal for
    a bound of the module doc (reasons: VIOLATIONS); each is also logged with the peer."""
    tls = writer.get_extra_info("ssl_object")
    peer = str(writer.get_extra_info("peername"))
    loop = asyncio.get_running_loop()
    try:
        identity = peer_identity(tls, trust_domain)
    except IdentityError as exc:
        reason = exc.reason if isinstance(exc, PeerRefused) else "identity"
        log.warning("hbone peer refused", peer=peer, reason=reason, detail=str(exc))
        if violation is not None:
            violation(reason)
        writer.close()
        return
    h2 = _Connection(client_side=False)
    tasks: set[asyncio.Task[None]] = set()
    opening: dict[int, asyncio.Task[None]] = {}  # stream id -> its upstream connect, until the 200
    resets, refusals = _Budget(RESET_BUDGET), _Budget(REFUSED_BUDGET)
    timer: asyncio.TimerHandle | None = None
    timer_reason = ""  # what the armed timer ends the connection for
    requested = False  # a complete CONNECT arrived (the first-request deadline is met)
    stopped = False  # closed for a violation: what is left of the peer's last read is not acted on

    def report(reason: str, detail: str, *, logged: bool = True) -> None:
        if logged:
            log.warning("hbone protocol violation", peer=peer, identity=str(identity), reason=reason, detail=detail)
        if violation is not None:
            violation(reason)

    def close_for(reason: str, detail: str, code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        report(reason, detail)
        h2.goaway(code, reason)

    def violated(reason: str, detail: str) -> None:  # a connection error h2 or our frame screen raised
        nonlocal stopped
        stopped = True
        report(reason, detail)

    def arm(delay: float, reason: str) -> None:
        nonlocal timer, timer_reason
        if timer is not None:
            timer.cancel()
        timer, timer_reason = loop.call_later(delay, expire), reason

    def disarm() -> None:
        nonlocal timer, timer_reason
        if timer is not None:
            timer.cancel()
        timer, timer_reason = None, ""

    def expire() -> None:
        nonlocal timer
        timer = None
        if h2.closed.is_set():
            return
        if timer_reason == "idle":
            if h2.streams or opening:  # not idle after all: look again a full period later
                arm(cast(float, idle_timeout), "idle")
                return
            log.info("hbone connection idle; closing", peer=peer, identity=str(identity), seconds=idle_timeout)
            h2.goaway(ErrorCodes.NO_ERROR, "idle")
        elif timer_reason == "first_request":
            preface = h2.conn.incoming_buffer._preamble_len > 0  # still waiting for the client's preface
            what = "preface" if preface else "complete CONNECT"
            close_for("preface_timeout" if preface else "request_timeout",
                      f"no {what} within {request_timeout:g} s of the handshake",
                      ErrorCodes.NO_ERROR if preface else ErrorCodes.ENHANCE_YOUR_CALM)
        else:
            close_for("header_timeout", f"a header block still incomplete after {request_timeout:g} s")

    def received() -> None:
        """After each read: a header block in progress must complete within request_timeout (a CONNECT
        trickled byte by byte); the first-request deadline stands until a CONNECT is complete."""
        if not requested:
            return
        pending = cast(_FrameBuffer, h2.conn.incoming_buffer).header_pending()
        if pending and timer_reason != "header":
            arm(request_timeout, "header")
        elif not pending and timer_reason == "header":
            if idle_timeout is not None:
                arm(idle_timeout, "idle")
            else:
                disarm()

    def refuse(stream_id: int, status: int) -> None:
        with contextlib.suppress(StreamClosedError, ProtocolError):
            h2.conn.send_headers(stream_id, [(":status", str(status))], end_stream=True)
        stream = h2.streams.pop(stream_id, None)
        if stream is not None:
            h2._abort(stream)  # early DATA gives its connection window back
        h2.flush()

    def refused(stream_id: int) -> None:
        """A stream refused over the limits (REFUSED_STREAM already sent): counted; a peer that keeps
        pushing past them is closed."""
        if stopped:
            return
        within = refusals.spend()
        # Each refusal is counted; only the window's first is logged (a flood must not become a log flood).
        report("max_streams", f"stream {stream_id} refused: {MAX_STREAMS} streams open or {MAX_PENDING_OPENS} "
                              "upstream connects in flight (more this window are counted, not logged)",
               logged=refusals.count == 1)
        if not within:
            close_for("refused_stream_flood", f"more than {REFUSED_BUDGET} streams refused in {FLOOD_WINDOW:g} s")

    def on_reset(stream_id: int, stream: _Stream | None) -> None:
        """The peer reset a stream: one still connecting upstream has its connect cancelled now (rapid
        reset's mechanism is making the server start work it then throws away). That reset, or one within
        PREMATURE_RESET of the HEADERS, is premature: too many per window close the connection."""
        task = opening.pop(stream_id, None)
        if task is not None:
            task.cancel()
        elif stream is None or loop.time() - stream.born >= PREMATURE_RESET:
            return
        if not stopped and not resets.spend():
            close_for("rapid_reset", f"more than {RESET_BUDGET} streams reset within {PREMATURE_RESET:g} s of "
                                     f"their HEADERS in {FLOOD_WINDOW:g} s")

    async def open_stream(stream: _Stream, destination: tuple[str, int]) -> None:
        target = f"{destination[0]}:{destination[1]}"
        try:
            admitted = policy(identity, target)
            if admitted is not True:
                status = 401 if admitted is False else int(admitted)
                refuse(stream.id, status)
                log.info("hbone stream refused", peer=str(identity), destination=target, status=status)
                return
            local = _Local(h2, stream)
            try:
                await _connect_local(connect, *destination, local)
            except OSError as exc:
                refuse(stream.id, 503)
                log.info("hbone upstream unreachable", peer=str(identity), destination=target, reason=str(exc))
                return
            except asyncio.CancelledError:  # reset by the peer meanwhile: the upstream must not outlive it
                if local.transport is not None:
                    local.transport.close()
                raise
        finally:
            opening.pop(stream.id, None)
        if h2.streams.get(stream.id) is not stream:  # reset while connecting
            if local.transport is not None:
                local.transport.close()
            return
        try:
            h2.conn.send_headers(stream.id, [(":status", "200")])
        except (StreamClosedError, ProtocolError):
            h2.reset(stream.id)
            return
        stream.sending = True
        if observe is not None:
            stream.done = loop.create_future()
        h2.attach(stream, local)
        h2.flush()
        if observe is not None and stream.done is not None:
            finished = observe(identity, target, lambda: h2.reset(stream.id))
            try:
                await stream.done
            finally:
                finished(stream.received, stream.sent)

    def on_request(event: RequestReceived) -> None:
        nonlocal requested
        if not requested:
            requested = True
            if idle_timeout is not None:
                arm(idle_timeout, "idle")
            else:
                disarm()
        if stopped or h2.transport is None or h2.transport.is_closing():
            return  # closed for a violation earlier in this read
        status, destination, reason = connect_verdict(_text(event.headers))
        if status:
            refuse(event.stream_id, status)
            log.info("hbone request refused", peer=str(identity), status=status, reason=reason)
            return
        assert destination is not None
        if len(opening) >= MAX_PENDING_OPENS:  # never more upstream connects in flight than streams allowed
            h2.reset(event.stream_id, ErrorCodes.REFUSED_STREAM)
            refused(event.stream_id)
            return
        stream = h2.streams[event.stream_id] = _Stream(event.stream_id, born=loop.time())
        task = asyncio.create_task(open_stream(stream, destination))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if not task.done():
            opening[event.stream_id] = task

    h2.on_request = on_request
    h2.on_reset, h2.on_refused, h2.on_violation, h2.on_received = on_reset, refused, violated, received
    arm(request_timeout, "first_request")
    buffered, eof = _take_over(reader, writer, h2)
    if buffered:
        h2.receive(buffered)
    if eof:
        writer.close()
    try:
        await h2.closed.wait()
    finally:
        disarm()
        for task in tasks:
            task.cancel()
        h2.connection_lost(None)
        writer.close()


class TlsListener:
    """An HBONE listener whose TLS handshakes are this process's own (see `serve_tls`); closes like an
    `asyncio.Server`: no new connection is accepted, those accepted go on."""

    def __init__(self, sock: socket.socket, accept: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
        self.sockets = [sock]
        self._accept = accept
        self._connections: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def __repr__(self) -> str:
        return f"<TlsListener {self.sockets[0].getsockname() if self.sockets else 'closed'} " \
               f"handshaking+serving={len(self._connections)}>"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: the listener stays, the next accept may succeed
                log.warning("hbone accept failed", listener=str(sock.getsockname()), reason=str(exc))
                await asyncio.sleep(0.1)  # back off from a tight loop on a persistent accept error
                continue
            task = loop.create_task(self._accept(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        sockets, self.sockets = self.sockets, []

        def close_sockets(_: object) -> None:
            for sock in sockets:
                sock.close()

        # Closed only once the accept loop has ended: the event loop unregisters the socket when the
        # cancelled accept completes, and a socket closed before that leaves a stale registration that a
        # new socket with the same descriptor then trips over (asyncio's selector loop).
        self._task.cancel()
        self._task.add_done_callback(close_sockets)

    async def wait_closed(self) -> None:
        """Return once the accept loop has ended (after `close`)."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def serve_tls(sock: socket.socket, context: ssl.SSLContext,
                    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], *,
                    handshake_timeout: float = HANDSHAKE_TIMEOUT, violation: Violations | None = None
                    ) -> TlsListener:
    """Serve the HBONE listener `sock`: each connection's TLS handshake (server side, `context`) is done
    here, then `handle(reader, writer)` gets the TLS stream (as `asyncio.start_server(ssl=...)` would).

    Doing the handshake ourselves is what makes a refused one visible: with `start_server(ssl=...)` a
    failed or stalled handshake never reaches the application (asyncio and uvloop report it only in
    debug mode). Each one is logged with the peer and counted by `violation(tls.handshake_failure(...))`;
    a handshake longer than `handshake_timeout` is aborted.

    Each accepted socket is handed to `connect_accepted_socket(ssl=...)`, which returns once the handshake
    is done or raises its failure. (Accepting with a plain protocol and upgrading with `start_tls` loses
    ClientHellos on uvloop, which starts reading an accepted connection even when its protocol paused it
    in connection_made: measured here, every one of 200 connections delivered its first bytes.)"""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def handshake(conn: socket.socket) -> None:
        try:
            peer = str(conn.getpeername())
        except OSError:
            peer = "?"
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, ssl=context,
                                                              ssl_handshake_timeout=handshake_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            reason = handshake_failure(exc)
            log.warning("hbone peer refused", peer=peer, reason=reason, detail=str(exc))
            if violation is not None:
                violation(reason)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        await handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    return TlsListener(sock, handshake)


def marked_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket in this process's network namespace, with the tunnel's mark."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, SOCKET_MARK)
    sock.setblocking(False)
    return sock


async def upstream_socket(host: str, port: int) -> socket.socket:
    """A connected TCP socket with the tunnel's mark (so capture rules never take it back in)."""
    sock = marked_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_upstream(host: str, port: int) -> Streams:
    """`upstream_socket` as a (reader, writer) pair."""
    return await asyncio.open_connection(sock=await upstream_socket(host, port), limit=READ_CHUNK)


@dataclass
class HboneStream:
    """The client end of one CONNECT stream: `splice` a local connection onto it (the fast path), or
    `read`/`write` it."""

    h2: _Connection
    stream_id: int
    inbound: asyncio.Queue[bytes | None]

    def _stream(self) -> _Stream:
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
        either side aborts; the bytes move in protocol callbacks (see the module doc). Returns (bytes
        sent toward the peer, bytes received from it)."""
        stream = self._stream()
        stream.done = asyncio.get_running_loop().create_future()
        local = _Local(self.h2, stream)
        buffered, eof = _take_over(reader, writer, local)
        self.h2.attach(stream, local)
        if buffered:
            local.data_received(buffered)
        if eof:
            local.eof_received()
        await stream.done
        return stream.sent, stream.received


async def open_connection(peer: tuple[str, int], context: ssl.SSLContext, expected: SpiffeId,
                          timeout: float = 10.0, make_socket: Callable[[], socket.socket] | None = None
                          ) -> _Connection:
    """A TLS + HTTP/2 connection to the tunnel at `peer`, verified to be `expected`, ready for streams.

    `make_socket` decides where the connection starts: a tunnel passes one that creates the socket in
    the source pod's network namespace, so the connection leaves through the pod's own interface.
    """
    sock = make_socket() if make_socket is not None else marked_socket(
        socket.AF_INET6 if ":" in peer[0] else socket.AF_INET)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, peer), timeout)
        transport, h2 = await asyncio.wait_for(loop.create_connection(
            lambda: _Connection(client_side=True), sock=sock, ssl=context, server_hostname="",
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


async def open_stream(h2: _Connection, authority: str, timeout: float = 10.0) -> HboneStream:
    """A CONNECT stream to `authority` on an open connection; ConnectionRefusedError unless answered 200."""
    if h2.closed.is_set():
        raise ConnectionResetError("hbone connection closed")
    stream_id = h2.conn.get_next_available_stream_id()
    response: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    stream = _Stream(stream_id, response=response, inbound=inbound)
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
    keepalive: float = 30.0  # seconds between PINGs; a PING unanswered for as long closes the connection
    connections: dict[PoolKey, list[_Connection]] = field(default_factory=dict)
    opening: dict[PoolKey, asyncio.Future[_Connection]] = field(default_factory=dict)

    async def connect(self, peer: tuple[str, int], authority: str, expected: SpiffeId,
                      timeout: float = 10.0) -> HboneStream:
        key = (peer, expected)
        while True:
            live = [c for c in self.connections.get(key, []) if not c.closed.is_set()]
            self.connections[key] = live
            chosen = next((c for c in live if c.conn.open_outbound_streams < self.max_streams), None)
            if chosen is not None:
                return await open_stream(chosen, authority, timeout)
            opening = self.opening.get(key)
            if opening is None or opening.done():
                opening = self.opening[key] = asyncio.ensure_future(self._open(key, timeout))
            await asyncio.shield(opening)

    async def _open(self, key: PoolKey, timeout: float) -> _Connection:
        try:
            h2 = await open_connection(key[0], self.context(), key[1], timeout, self.make_socket)
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


async def _keepalive(h2: _Connection, interval: float) -> None:
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
