"""hyperframe specialised for the tunnel's data path, and the h2 / hyperframe internals the tunnel relies on.

Three replacements inside hyperframe, each the same bytes or text at a bounded cost (measured with
bench/hbone_throughput.py):
- `hyperframe.frame._raw_data_repr`: h2 formats repr(frame) for its trace log on every received frame,
  logging or not, and hyperframe's repr hexlifies the whole body before cutting it to 20 characters: at
  64 KiB DATA frames that was a fifth of the tunnel's CPU. `short_hex` hexlifies only what it shows.
- `DataFrame.serialize_body`: an unpadded DATA frame's body is its data, not a join into a new bytes
  (`data_body`; padded frames take hyperframe's own path).
- `DataFrame.__repr__`: the stream and the body's length only (`data_repr`; a tenth of the tunnel's work
  per small message went into formatting frames nobody logs).

They are applied by `install()`, never at import: `framing.HboneH2` calls it as each connection is made,
so importing the tunnel changes nothing in hyperframe. `framing` also subclasses h2's FrameBuffer and
H2Connection, overriding or reading their private members. `INTERNALS` names every member the
replacements and the subclasses rely on, with the shape relied on; `problems()` and `check()` compare
the installed h2 and hyperframe against it (tests/unit/tunnel/hbone/test_patches.py runs them, beside
pyproject.toml's upper bounds on both packages).
"""

from __future__ import annotations

import binascii
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.frame_buffer import FrameBuffer
from hyperframe import frame as hyperframe_frame
from hyperframe.frame import DataFrame, Frame, HeadersFrame, WindowUpdateFrame

from nodeagent.errors import NodeAgentError


@dataclass(frozen=True)
class Originals:
    """hyperframe's own implementations of what `install()` replaces (padded DATA frames still use one)."""

    raw_data_repr: Callable[[bytes | None], str]
    data_serialize_body: Callable[[DataFrame], bytes]
    data_repr: Callable[[DataFrame], str]


# Read (not changed) at import: what install() replaces, kept for data_body's padded path and the tests.
HYPERFRAME = Originals(raw_data_repr=hyperframe_frame._raw_data_repr,
                       data_serialize_body=DataFrame.serialize_body,
                       data_repr=DataFrame.__repr__)


def short_hex(data: bytes | None) -> str:
    """hyperframe's frame-body repr, hexlifying only the 10 bytes it shows instead of the whole body."""
    if not data:
        return "None"
    shown = binascii.hexlify(data[:11]).decode("ascii")
    return "<hex:" + (shown[:20] + "..." if len(shown) > 20 else shown) + ">"


def data_body(self: DataFrame) -> Any:
    """An unpadded DATA frame's body is its data: no join into a new bytes (serialize() prepends the
    header, the one copy left). Same bytes on the wire; padded frames take hyperframe's own path."""
    if "PADDED" in self.flags:
        return HYPERFRAME.data_serialize_body(self)
    return self.data


def data_repr(self: DataFrame) -> str:
    """A DATA frame as h2's trace log shows it, formatted for every frame received, logging or not: the
    stream and the body's length only."""
    return f"DataFrame(stream_id={self.stream_id}, length={len(self.data)})"


def installed() -> bool:
    """All three replacements are in place."""
    return (hyperframe_frame._raw_data_repr is short_hex
            and DataFrame.__dict__.get("serialize_body") is data_body
            and DataFrame.__dict__.get("__repr__") is data_repr)


def install() -> None:
    """Put the replacements into hyperframe; idempotent (once in place, a call only looks)."""
    if installed():
        return
    hyperframe_frame._raw_data_repr = short_hex
    DataFrame.serialize_body = data_body  # type: ignore[method-assign]
    DataFrame.__repr__ = data_repr  # type: ignore[method-assign,assignment]


class InternalsChanged(NodeAgentError):
    """The installed h2 or hyperframe no longer has an internal the tunnel replaces or overrides."""


@dataclass(frozen=True)
class Internal:
    """One private member of h2 or hyperframe the tunnel relies on, and the shape it relies on."""

    name: str
    find: Callable[[], object]  # the member (AttributeError or KeyError: it is gone)
    parameters: tuple[str, ...] | None = None  # a callable's parameter names, in order
    kind: type | None = None  # an attribute's type
    why: str = ""


def _client() -> H2Connection:
    return H2Connection(config=H2Configuration(client_side=True))


def _property_getter(owner: type, name: str) -> object:
    member = inspect.getattr_static(owner, name)
    if not isinstance(member, property) or member.fget is None:
        raise AttributeError(f"{owner.__name__}.{name} is not a property")
    return member.fget


def _dispatched(frame_type: type[Frame], method: str) -> object:
    """The h2 method a received frame of `frame_type` is dispatched to, if it is `method` looked up on the
    connection (so an override in a subclass is the one called)."""
    handler = _client()._frame_dispatch_table[frame_type]
    if getattr(handler, "__func__", None) is not getattr(H2Connection, method):
        raise AttributeError(f"{frame_type.__name__} is no longer dispatched to H2Connection.{method}")
    return handler


INTERNALS: tuple[Internal, ...] = (
    # hyperframe: what install() replaces, and what the replacements use
    Internal("hyperframe.frame._raw_data_repr", lambda: HYPERFRAME.raw_data_repr, ("data",),
             why="replaced by short_hex: every frame's repr formats its body with it"),
    Internal("hyperframe.frame.DataFrame.serialize_body", lambda: HYPERFRAME.data_serialize_body, ("self",),
             why="replaced by data_body; padded DATA frames still go through it"),
    Internal("hyperframe.frame.Frame.__repr__", lambda: HYPERFRAME.data_repr, ("self",),
             why="DataFrame.__repr__ (inherited) is replaced by data_repr"),
    Internal("hyperframe.frame.Frame.serialize", lambda: Frame.serialize, ("self",),
             why="prepends the header to serialize_body()'s result, whatever buffer type that is"),
    Internal("hyperframe.frame.DataFrame.data", lambda: DataFrame(1).data, kind=bytes,
             why="data_body returns it as the body"),
    Internal("hyperframe.frame.DataFrame.flags", lambda: DataFrame(1).flags,
             why="data_body tells a padded frame by its PADDED flag"),
    Internal("hyperframe.frame.Frame.parse_frame_header", lambda: Frame.parse_frame_header, ("header", "strict"),
             why="framing.ScreenedFrameBuffer parses each frame header itself, from a view"),
    Internal("hyperframe.frame.Frame.parse_body", lambda: Frame.parse_body, ("self", "data"),
             why="framing.ScreenedFrameBuffer parses each frame body from a view"),
    # h2's frame buffer (framing.ScreenedFrameBuffer replaces its __next__)
    Internal("h2.frame_buffer.FrameBuffer.__init__", lambda: FrameBuffer.__init__, ("self", "server"),
             why="ScreenedFrameBuffer passes server= through"),
    Internal("h2.frame_buffer.FrameBuffer.__next__", lambda: FrameBuffer.__next__, ("self",),
             why="replaced whole by ScreenedFrameBuffer.__next__"),
    Internal("h2.frame_buffer.FrameBuffer._data", lambda: FrameBuffer(server=True)._data, kind=bytearray,
             why="the buffered bytes ScreenedFrameBuffer parses frames from"),
    Internal("h2.frame_buffer.FrameBuffer._headers_buffer", lambda: FrameBuffer(server=True)._headers_buffer,
             kind=list, why="a header block awaiting CONTINUATIONs (header_pending)"),
    Internal("h2.frame_buffer.FrameBuffer._preamble_len", lambda: FrameBuffer(server=True)._preamble_len,
             kind=int, why="the client preface not yet received (the server's preface timeout)"),
    Internal("h2.frame_buffer.FrameBuffer._validate_frame_length", lambda: FrameBuffer._validate_frame_length,
             ("self", "length"), why="ScreenedFrameBuffer.__next__ checks each frame's length with it"),
    Internal("h2.frame_buffer.FrameBuffer._update_header_buffer", lambda: FrameBuffer._update_header_buffer,
             ("self", "f"), why="ScreenedFrameBuffer.__next__ joins header blocks with it"),
    # h2's connection (framing.HboneH2 overrides or reads these)
    Internal("h2.connection.H2Connection.incoming_buffer", lambda: _client().incoming_buffer, kind=FrameBuffer,
             why="replaced by a ScreenedFrameBuffer"),
    Internal("h2.connection.H2Connection._data_to_send", lambda: _client()._data_to_send, kind=bytearray,
             why="h2 writes the preface there directly; HboneH2 keeps its frames apart"),
    Internal("h2.connection.H2Connection._prepare_for_sending", lambda: H2Connection._prepare_for_sending,
             ("self", "frames"), why="overridden: serialized frames are kept, not joined"),
    Internal("h2.connection.H2Connection.data_to_send", lambda: H2Connection.data_to_send, ("self", "amount"),
             why="overridden: what h2 wrote itself (the preface) goes first, then the kept frames"),
    Internal("h2.connection.H2Connection.clear_outbound_data_buffer",
             lambda: H2Connection.clear_outbound_data_buffer, ("self",), why="overridden: the kept frames too"),
    Internal("h2.connection.H2Connection.open_inbound_streams",
             lambda: _property_getter(H2Connection, "open_inbound_streams"), ("self",),
             why="overridden to admit a stream over the limit, so it is refused alone"),
    Internal("h2.connection.H2Connection._receive_headers_frame",
             lambda: _dispatched(HeadersFrame, "_receive_headers_frame"), ("frame",),
             why="overridden: REFUSED_STREAM over MAX_CONCURRENT_STREAMS"),
    Internal("h2.connection.H2Connection._receive_window_update_frame",
             lambda: _dispatched(WindowUpdateFrame, "_receive_window_update_frame"), ("frame",),
             why="overridden: WINDOW_UPDATEs bounded by the frames sent"),
    Internal("h2.connection.H2Connection.decoder.max_header_list_size",
             lambda: _client().decoder.max_header_list_size, kind=int,
             why="set from the first byte, before the peer acknowledges our SETTINGS"),
)


def problem(internal: Internal) -> str | None:
    """What is wrong with `internal` in the installed h2 / hyperframe, naming it; None when it is as relied on."""
    why = f" ({internal.why})" if internal.why else ""
    try:
        member = internal.find()
    except (AttributeError, KeyError) as exc:
        return f"{internal.name} is gone or moved: {exc}{why}"
    if internal.kind is not None and not isinstance(member, internal.kind):
        return f"{internal.name} is a {type(member).__name__}, not a {internal.kind.__name__}{why}"
    if internal.parameters is not None:
        if not callable(member):
            return f"{internal.name} is no longer callable{why}"
        found = tuple(inspect.signature(member).parameters)
        if found != internal.parameters:
            return f"{internal.name} takes ({', '.join(found)}), not ({', '.join(internal.parameters)}){why}"
    return None


def problems() -> list[str]:
    """Every internal that changed, each named (empty: h2 and hyperframe are as the tunnel relies on)."""
    return [found for internal in INTERNALS if (found := problem(internal)) is not None]


def check() -> None:
    """Raise InternalsChanged naming every internal that changed."""
    found = problems()
    if found:
        raise InternalsChanged("h2 / hyperframe internals the HBONE tunnel relies on changed:\n  " +
                               "\n  ".join(found))
