"""A graceful GOAWAY drains an HBONE connection instead of cutting it (pure: two h2 connections in memory).

h2 alone ends a connection's state on any GOAWAY, sent or received: after it not even the open streams may
send DATA. A tunnel shutting down needs RFC 9113 6.8's drain: streams up to the GOAWAY's last id finish,
newer ones are refused (REFUSED_STREAM, safe to retry elsewhere), and only then does the connection close.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import GoAwayFrame

from nodeagent.tunnel.hbone.framing import HboneH2, PeerDraining, StreamRefused, h2_config

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


def pair() -> tuple[HboneH2, HboneH2]:
    """A connected client and server, settings exchanged."""
    client, server = HboneH2(h2_config(True)), HboneH2(h2_config(False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def open_stream(client: HboneH2, server: HboneH2, stream_id: int) -> list[object]:
    client.send_headers(stream_id, CONNECT)
    events: list[object] = list(server.receive_data(client.data_to_send()))
    server.send_headers(stream_id, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return events


def test_the_servers_drain_says_goaway_no_error_naming_the_last_stream_it_took() -> None:
    client, server = pair()
    open_stream(client, server, 1)
    open_stream(client, server, 3)
    server.drain()
    wire = server.data_to_send()
    frame, length = GoAwayFrame.parse_frame_header(memoryview(wire)[:9])
    frame.parse_body(memoryview(wire)[9:9 + length])
    assert isinstance(frame, GoAwayFrame)
    assert (frame.error_code, frame.last_stream_id) == (0, 3)
    server.drain()  # once only
    assert server.data_to_send() == b""


def test_open_streams_carry_data_both_ways_after_the_goaway() -> None:
    client, server = pair()
    open_stream(client, server, 1)
    server.drain()
    [draining] = client.receive_data(server.data_to_send())
    assert isinstance(draining, PeerDraining) and draining.last_stream_id == 1
    # Plain h2 would raise here: its state machine is CLOSED after any GOAWAY, sent or received.
    server.send_data(1, b"from the server", end_stream=True)
    client.send_data(1, b"from the client", end_stream=True)
    got_client = client.receive_data(server.data_to_send())
    got_server = server.receive_data(client.data_to_send())
    assert [e.data for e in got_client if isinstance(e, DataReceived)] == [b"from the server"]
    assert [e.data for e in got_server if isinstance(e, DataReceived)] == [b"from the client"]
    assert any(isinstance(e, StreamEnded) for e in got_client)
    assert any(isinstance(e, StreamEnded) for e in got_server)


def test_a_stream_that_crossed_the_goaway_is_refused_and_not_counted_as_abuse() -> None:
    client, server = pair()
    open_stream(client, server, 1)
    server.drain()
    server.data_to_send()  # the GOAWAY is on its way; the client has not read it yet
    client.send_headers(3, CONNECT)
    events = server.receive_data(client.data_to_send())
    assert not [e for e in events if isinstance(e, RequestReceived | StreamRefused)]
    answer = client.receive_data(server.data_to_send())
    [reset] = [e for e in answer if isinstance(e, StreamReset)]
    assert (reset.stream_id, reset.error_code) == (3, ErrorCodes.REFUSED_STREAM)
    # The first stream is untouched.
    server.send_data(1, b"still here")
    assert [e.data for e in client.receive_data(server.data_to_send()) if isinstance(e, DataReceived)] == [
        b"still here"]


def test_a_goaway_with_an_error_code_still_ends_the_connection() -> None:
    client, server = pair()
    open_stream(client, server, 1)
    server.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
    events = client.receive_data(server.data_to_send())
    assert [type(e) for e in events] == [ConnectionTerminated]
    try:
        client.send_data(1, b"x")
    except ProtocolError:
        pass
    else:
        raise AssertionError("DATA after an error GOAWAY must be refused")


def test_the_response_of_a_drained_connections_stream_still_arrives() -> None:
    client, server = pair()
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    server.drain()  # before the 200: the stream was taken (id 1 <= last), so it is answered
    server.send_headers(1, [(":status", "200")])
    events = client.receive_data(server.data_to_send())
    assert [type(e) for e in events] == [PeerDraining, ResponseReceived]
