"""The tunnel's copy-saving h2 connection says and understands exactly what plain h2 does (pure)."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded

from nodeagent.ztunnel.hbone import _H2


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
    ours = script(_H2(config=H2Configuration(client_side=True)))
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
        assert events(_H2(config=H2Configuration(client_side=False)), step) == reference, step
