"""HBONE's HTTP/2 layer: h2's connection with fewer copies of each byte, and a screen on every frame.

`h2` does all framing and flow control. `HboneH2` is h2's connection with frames parsed from a view of the
buffered bytes and serialized frames sent as they are (`patches` lists the h2 internals this relies on).
Its frame buffer (`ScreenedFrameBuffer`) screens each frame as soon as its 9-byte header is in, before
its body is buffered: the size caps and per-window budgets of `limits`, which close the connection with
a `Violation` (the server's module doc tells what each guards against). `HboneH2` also refuses a stream
over MAX_CONCURRENT_STREAMS alone where h2 would end the connection, and bounds WINDOW_UPDATEs by the
frames sent. Both sides' connections are one; the server counts and logs what it refuses (`server`).
"""

from __future__ import annotations

import time
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import Event
from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameDataMissingError,
    FrameTooLargeError,
    ProtocolError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.frame_buffer import FrameBuffer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import Frame, GoAwayFrame

from nodeagent.tunnel.hbone import patches
from nodeagent.tunnel.hbone.limits import (
    CONTROL_BUDGET,
    FLOOD_WINDOW,
    MAX_CONTINUATIONS,
    MAX_CONTROL_FRAME,
    MAX_HEADER_BLOCK,
    PING_BUDGET,
    SETTINGS_BUDGET,
)

_HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING = 0x1, 0x3, 0x4, 0x5, 0x6  # frame types, RFC 9113 6
_WINDOW_UPDATE, _CONTINUATION = 0x8, 0x9


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


class Budget:
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


class StreamRefused(Event):
    """A stream the server refused with REFUSED_STREAM before it reached the application (not h2's)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class PeerDraining(Event):
    """The peer sent a graceful GOAWAY (NO_ERROR): its streams up to `last_stream_id` go on, no new one opens
    on this connection (not h2's: h2 would end the connection's state at once)."""

    def __init__(self, last_stream_id: int) -> None:
        self.last_stream_id = last_stream_id


def h2_config(client_side: bool) -> H2Configuration:
    """The configuration of both sides' connections: str headers, validated on the way in."""
    return H2Configuration(client_side=client_side, header_encoding="utf-8", validate_inbound_headers=True)


class ScreenedFrameBuffer(FrameBuffer):
    """h2's frame buffer, parsing each frame from a view of the buffered bytes instead of from a copy
    of them (hyperframe copies a frame's body out of the view it is given; one copy per byte fewer).

    It also screens every frame but DATA as soon as its 9-byte header is in: a header block or control
    frame over its size cap is refused before its body is waited for (so never buffered), and the
    control-frame budgets are spent once per whole frame (see the server's module doc). DATA frames pass
    with one comparison: flow control bounds them."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self.block = 0  # encoded bytes of the header block being received
        self.continuations = 0
        self.pings, self.settings = Budget(PING_BUDGET), Budget(SETTINGS_BUDGET)
        self.control = Budget(CONTROL_BUDGET)

    def header_pending(self) -> bool:
        """A header block is under way: CONTINUATIONs are awaited, or the buffered partial frame is a
        HEADERS / CONTINUATION (or too short to tell)."""
        data = self._data
        return bool(self._headers_buffer) or (len(data) > 0 and (len(data) < 4 or data[3] in (_HEADERS,
                                                                                                _CONTINUATION)))

    def preface_pending(self) -> bool:
        """The server is still waiting for (part of) the client's connection preface."""
        return self._preamble_len > 0

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


class HboneH2(H2Connection):
    """h2's connection with fewer copies of each byte: frames parsed from a view (`ScreenedFrameBuffer`),
    and serialized frames kept as they are until sent instead of appended to one growing bytearray and
    copied out again (one frame per send, the usual case, goes out as the very bytes hyperframe made).

    Making one installs the hyperframe specialisations (`patches.install`, idempotent): this is where
    HBONE work starts on either side, so importing the tunnel changes nothing in hyperframe."""

    def __init__(self, config: H2Configuration) -> None:
        patches.install()
        super().__init__(config=config)
        self.incoming_buffer: ScreenedFrameBuffer = ScreenedFrameBuffer(server=not config.client_side)
        self._frames: list[bytes] = []
        self._admit = False  # _receive_headers_frame: take a stream over the limit, to refuse it alone
        self.sent_frames = 0  # frames we sent: what the peer's WINDOW_UPDATEs may answer
        self.window_updates = 0
        self.streams_opened = 0  # by the peer (not its highest id: a peer may jump straight to 2^31 - 1)
        self.drain_last: int | None = None  # we sent a graceful GOAWAY: peer streams above this are refused
        self.peer_drain_last: int | None = None  # the peer's graceful GOAWAY: its last stream id

    def drain(self) -> None:
        """Send a graceful GOAWAY (NO_ERROR, last stream: the highest the peer opened) without ending the
        connection's state: the streams already open finish, a stream the peer opens after it is refused
        with REFUSED_STREAM (RFC 9113 6.8 and 8.7: safe to retry elsewhere). h2's `close_connection` would
        refuse to send even the open streams' DATA afterwards."""
        if self.drain_last is not None:
            return
        self.drain_last = self.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id, frame.error_code, frame.additional_data = self.drain_last, 0, b"draining"
        self._frames.append(frame.serialize())

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Frame], list[Event]]:
        """A graceful GOAWAY (NO_ERROR) is the peer draining: its open streams go on (h2 would clear its
        send buffer and close the state machine, cutting them); any other code is h2's connection end."""
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        last = frame.last_stream_id
        self.peer_drain_last = last if self.peer_drain_last is None else min(last, self.peer_drain_last)
        return [], [PeerDraining(self.peer_drain_last)]

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
        draining = self.drain_last is not None and frame.stream_id > self.drain_last
        if not draining and self.open_inbound_streams < self.local_settings.max_concurrent_streams:
            return super()._receive_headers_frame(frame)
        self._admit = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._admit = False
        self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        kept = [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]
        # A stream opened after our GOAWAY crossed it on the wire: refused, not counted against the peer.
        return frames, kept if draining else [*kept, StreamRefused(frame.stream_id)]

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
