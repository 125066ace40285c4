"""The tunnel's copy-saving h2 connection says and understands exactly what plain h2 does (pure)."""

from __future__ import annotations

import ssl

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

from nodeagent.tunnel.hbone.connection import HboneConnection
from nodeagent.tunnel.hbone.framing import Budget, HboneH2, violation_reason
from nodeagent.tunnel.hbone.limits import (
    CONTROL_BUDGET,
    FLOOD_WINDOW,
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    PING_BUDGET,
    SETTINGS_BUDGET,
    VIOLATIONS,
)
from nodeagent.tunnel.identity.tls import handshake_failure

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def script(conn: H2Connection) -> list[bytes]:
    """A client's output through a session: preface, a CONNECT, DATA (plain, padded, empty), a PING."""
    out = []
    conn.initiate_connection()
    out.append(conn.data_to_send())
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    conn.send_data(1, b"x" * 1000)
    conn.send_data(1, memoryview(b"y" * 3000)[1000:2000])
    out.append(conn.data_to_send())
    conn.send_data(1, b"padded", pad_length=7)
    out.append(conn.data_to_send(5))  # a partial read, then the rest
    out.append(conn.data_to_send())
    conn.ping(b"12345678")
    conn.send_data(1, b"", end_stream=True)
    out.append(conn.data_to_send())
    return out


def test_the_bytes_on_the_wire_are_h2s() -> None:
    ours = script(HboneH2(config=H2Configuration(client_side=True)))
    theirs = script(H2Connection(config=H2Configuration(client_side=True)))
    assert ours == theirs


def test_frames_are_parsed_as_h2_parses_them_however_the_bytes_are_cut() -> None:
    wire = b"".join(script(H2Connection(config=H2Configuration(client_side=True))))

    def events(server: H2Connection, step: int) -> list[tuple[str, int, bytes]]:
        server.initiate_connection()
        seen = []
        for at in range(0, len(wire), step):
            for event in server.receive_data(wire[at:at + step]):
                if isinstance(event, DataReceived):
                    seen.append(("data", event.flow_controlled_length, event.data))
                elif isinstance(event, (RequestReceived, StreamEnded)):
                    seen.append((type(event).__name__, event.stream_id, b""))
        return seen

    reference = events(H2Connection(config=H2Configuration(client_side=False)), len(wire))
    assert [e[0] for e in reference] == ["RequestReceived", "data", "data", "data", "data", "StreamEnded"]
    for step in (1, 7, 9, 100, len(wire)):
        assert events(HboneH2(config=H2Configuration(client_side=False)), step) == reference, step


# -- the server's screen against hostile peers (hbone.py's module doc), on the pure h2 layer


def server() -> HboneH2:
    conn = HboneH2(config=H2Configuration(client_side=False))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    conn.data_to_send()
    return conn


def client_bytes(*frames: Frame) -> bytes:
    return PREFACE + SettingsFrame(0).serialize() + b"".join(f.serialize() for f in frames)


def goaway_code(conn: HboneH2) -> int:
    sent = conn.data_to_send()
    frame, _ = Frame.parse_frame_header(memoryview(sent[-17:-8]))
    assert isinstance(frame, GoAwayFrame), sent
    frame.parse_body(memoryview(sent[-8:]))
    return frame.error_code


def violation(conn: HboneH2, wire: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        conn.receive_data(wire)
    return violation_reason(caught.value)


def test_an_oversized_header_frame_is_refused_from_its_frame_header_alone() -> None:
    conn = server()
    frame = HeadersFrame(1, data=b"\x00" * (MAX_HEADER_BLOCK + 1))
    frame.flags.add("END_HEADERS")
    assert violation(conn, client_bytes() + frame.serialize()[:9]) == "header_list_too_large"
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_continuations_are_counted_per_block() -> None:
    conn = server()
    wire = client_bytes(HeadersFrame(1, data=b""), *(ContinuationFrame(1) for _ in range(MAX_CONTINUATIONS + 1)))
    assert violation(conn, wire) == "continuation_flood"


@pytest.mark.parametrize(("frame", "budget", "reason"), [
    (PingFrame(0, opaque_data=b"12345678"), PING_BUDGET, "ping_flood"),
    (SettingsFrame(0), SETTINGS_BUDGET, "settings_flood"),
    (PriorityFrame(1, depends_on=0), CONTROL_BUDGET, "control_frame_flood")])
def test_control_frames_have_a_budget_per_window(frame: Frame, budget: int, reason: str) -> None:
    conn = server()
    conn.receive_data(client_bytes() + frame.serialize() * (budget - 1))  # the preface's SETTINGS is one too
    assert violation(conn, frame.serialize() * 2) == reason
    assert goaway_code(conn) == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_stream_over_the_limit_is_refused_alone() -> None:
    conn = server()
    encoder = Encoder()

    def connect(stream_id: int) -> HeadersFrame:
        frame = HeadersFrame(stream_id, data=encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")]))
        frame.flags.add("END_HEADERS")
        return frame

    conn.receive_data(client_bytes())
    conn.receive_data(SettingsFrame(0, flags=["ACK"]).serialize())  # our limit of 2 is in force
    conn.data_to_send()
    events = conn.receive_data(b"".join(connect(i).serialize() for i in (1, 3, 5)))
    assert [type(e).__name__ for e in events] == ["RequestReceived", "RequestReceived", "StreamRefused"]
    sent = conn.data_to_send()
    refusal, _ = Frame.parse_frame_header(memoryview(sent[:9]))
    refusal.parse_body(memoryview(sent[9:]))
    assert isinstance(refusal, RstStreamFrame) and refusal.stream_id == 5
    assert refusal.error_code == ErrorCodes.REFUSED_STREAM
    conn.reset_stream(1)
    events = conn.receive_data(connect(7).serialize())  # the HPACK state went on: the next one decodes
    assert isinstance(events[0], RequestReceived) and dict(events[0].headers)[b":authority"] == b"10.0.0.1:80"


def test_the_budget_window_restarts() -> None:
    budget = Budget(2)
    assert budget.spend() and budget.spend() and not budget.spend()
    budget.start -= FLOOD_WINDOW
    assert budget.spend()


def test_handshake_failures_are_named() -> None:
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_code = 10
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code = 20
    nocert = ssl.SSLError(1, "peer did not return a certificate")
    nocert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    version = ssl.SSLError(1, "unsupported protocol")
    version.reason = "UNSUPPORTED_PROTOCOL"
    stalled = ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the connection")
    assert [handshake_failure(e) for e in (expired, untrusted, nocert, version, stalled, ConnectionResetError())] == [
        "certificate_expired", "certificate_untrusted", "no_client_certificate", "tls_version",
        "handshake_timeout", "handshake_aborted"]
    assert all(handshake_failure(e) in VIOLATIONS for e in (expired, untrusted, nocert, version, stalled))


class FakeTransport:
    """Just enough of a transport for HboneConnection: collects what is written."""

    def __init__(self) -> None:
        self.out, self.closed = bytearray(), False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_the_header_list_limit_holds_before_the_peer_acknowledges_our_settings() -> None:
    """A block within the encoded cap that decodes past MAX_HEADER_LIST (but below h2's 64 KiB default) is
    refused on the connection's very first request, the peer's SETTINGS ACK not yet in."""
    connection = HboneConnection(client_side=False)
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    reasons: list[str] = []
    connection.on_violation = lambda reason, detail: reasons.append(reason)
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")] + [("x-b", "b" * 4000)] * 8)
    assert len(block) < MAX_HEADER_BLOCK
    frame = HeadersFrame(1, data=block)
    frame.flags.add("END_HEADERS")
    connection.receive(client_bytes(frame))
    assert reasons == ["header_list_too_large"] and transport.closed
