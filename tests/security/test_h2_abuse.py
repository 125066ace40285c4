"""HTTP/2 abuse by an authenticated peer (a compromised workload holds a valid certificate): each flood
or malformed sequence is refused (the stream with REFUSED_STREAM, or the connection with a GOAWAY and
the right code), counted by reason, bounded in what it cost, and an honest client is served afterwards.
Floods are bounded by count, not time: each case is a few hundred frames."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from nodeagent.kernel.netns import client_socket
from nodeagent.tunnel.hbone.client import open_connection, open_stream
from nodeagent.tunnel.hbone.limits import (
    CONTROL_BUDGET,
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    MAX_PENDING_OPENS,
    MAX_STREAMS,
    PING_BUDGET,
    REFUSED_BUDGET,
    RESET_BUDGET,
    SETTINGS_BUDGET,
)
from tests.security.hostile import CLIENT_ID, SERVER_ID, RawH2, Target

pytestmark = pytest.mark.root


async def started(served: Target) -> RawH2:
    raw = await served.raw()
    raw.hello()
    return raw


def answered(stream_id: int) -> object:
    """match= for the response HEADERS of `stream_id`."""
    return lambda frame: frame.stream_id == stream_id


async def goaway(raw: RawH2, code: ErrorCodes) -> GoAwayFrame:
    try:
        frame = await raw.goaway()
    finally:
        raw.close()
    assert frame.error_code == code, frame
    return frame


async def test_rapid_reset_cancels_every_upstream_connect_and_closes_the_connection(served: Target) -> None:
    served.gate = asyncio.Event()  # a slow upstream: every connect waits, as a rapid reset wants them to
    raw = await started(served)
    flood = RESET_BUDGET + 50
    for n in range(flood):
        stream_id = 2 * n + 1
        raw.send(raw.connect(stream_id, f"127.0.0.1:{served.echo_port}"), raw.reset(stream_id))
    frame = await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert frame.last_stream_id <= 2 * flood
    assert await served.counted("rapid_reset") == 1
    assert served.peak <= MAX_PENDING_OPENS, "upstream connects in flight stay bounded"
    assert served.connects <= RESET_BUDGET + 1, "a reset stream's connect is cancelled before it starts"
    for _ in range(100):  # the cancelled connects unwind within a few loop turns
        if not served.inflight:
            break
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    assert served.inflight == 0
    served.gate.set()
    await served.serves_honest_client()


async def test_streams_reset_right_after_their_response_count_as_premature(served: Target) -> None:
    """The rapid reset variant that lets each connect finish: open, take the 200, reset at once (in
    rounds of the stream limit, so the flood takes a few round trips)."""
    raw = await started(served)
    authority = f"127.0.0.1:{served.echo_port}"
    ids = iter(range(1, 1 << 20, 2))
    for _ in range(RESET_BUDGET // MAX_STREAMS + 1):
        batch = [next(ids) for _ in range(MAX_STREAMS)]
        raw.send(*(raw.connect(i, authority) for i in batch))
        for i in batch:
            await raw.frames(HeadersFrame, match=answered(i))
        raw.send(*(raw.reset(i) for i in batch))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("rapid_reset") == 1
    await served.serves_honest_client()


async def test_a_header_block_of_endless_continuations_is_cut_short(served: Target) -> None:
    raw = await started(served)
    block = raw.block([(":method", "CONNECT"), (":authority", f"127.0.0.1:{served.echo_port}")])
    raw.send(raw.headers(1, block[:4], end_headers=False))
    raw.send(*(raw.continuation(1) for _ in range(MAX_CONTINUATIONS * 4)))  # empty, never END_HEADERS
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("continuation_flood") == 1
    await served.serves_honest_client()


async def test_a_header_block_growing_past_its_cap_in_continuations_is_cut_short(served: Target) -> None:
    raw = await started(served)
    raw.send(raw.headers(1, b"", end_headers=False))
    chunk = b"\x00" * 4096
    raw.send(*(raw.continuation(1, chunk) for _ in range(MAX_HEADER_BLOCK // len(chunk) + 2)))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("continuation_flood") == 1
    await served.serves_honest_client()


async def test_a_settings_flood_closes_the_connection(served: Target) -> None:
    raw = await started(served)
    raw.send(*(SettingsFrame(0) for _ in range(SETTINGS_BUDGET + 20)))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("settings_flood") == 1
    await served.serves_honest_client()


async def test_a_ping_flood_closes_the_connection(served: Target) -> None:
    raw = await started(served)
    raw.send(*(raw.ping(n) for n in range(PING_BUDGET + 20)))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("ping_flood") == 1
    await served.serves_honest_client()


async def test_an_oversized_header_frame_is_refused_before_it_is_buffered(served: Target) -> None:
    raw = await started(served)
    block = raw.block([(":method", "CONNECT"), (":authority", f"127.0.0.1:{served.echo_port}"),
                       ("x-big", "v" * (MAX_HEADER_BLOCK + 1024))], huffman=False)
    frame = raw.headers(1, block)
    wire = frame.serialize()
    raw.send(wire[:9 + 100])  # the frame header announces the size: refused before the body arrives
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("header_list_too_large") == 1
    await served.serves_honest_client()


async def test_an_hpack_bomb_is_refused(served: Target) -> None:
    """A small encoded block that decodes huge (one 4 KB header indexed once, then referenced): hpack's
    max_header_list_size, enforced by h2, catches it."""
    raw = await started(served)
    fields = [(":method", "CONNECT"), (":authority", f"127.0.0.1:{served.echo_port}")]
    block = raw.block(fields + [("x-bomb", "b" * 4000)] * 40)
    assert len(block) < MAX_HEADER_BLOCK
    raw.send(raw.headers(1, block))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("header_list_too_large") == 1
    await served.serves_honest_client()


async def test_streams_over_the_limit_are_refused_alone_and_the_others_go_on(served: Target) -> None:
    raw = await started(served)
    authority = f"127.0.0.1:{served.echo_port}"
    ids = [2 * n + 1 for n in range(MAX_STREAMS)]
    raw.send(*(raw.connect(i, authority) for i in ids))
    for i in ids:
        await raw.frames(HeadersFrame, match=answered(i))  # every allowed stream gets its 200
    over = ids[-1] + 2
    raw.send(raw.connect(over, authority))
    refusal = (await raw.frames(RstStreamFrame, match=answered(over)))[-1]
    assert isinstance(refusal, RstStreamFrame) and refusal.error_code == ErrorCodes.REFUSED_STREAM
    assert await served.counted("max_streams") == 1
    raw.send(raw.data(ids[0], b"the first stream still works"))
    echoed = (await raw.frames(DataFrame, match=answered(ids[0])))[-1]
    assert isinstance(echoed, DataFrame) and echoed.data == b"the first stream still works"
    raw.close()
    await served.serves_honest_client()


async def test_a_peer_pushing_past_the_stream_limit_is_closed(served: Target) -> None:
    served.gate = asyncio.Event()  # keep the allowed streams connecting: they stay open
    raw = await started(served)
    authority = f"127.0.0.1:{served.echo_port}"
    raw.send(*(raw.connect(2 * n + 1, authority) for n in range(MAX_STREAMS + REFUSED_BUDGET + 10)))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("refused_stream_flood") == 1
    assert served.violations("max_streams") >= REFUSED_BUDGET
    served.gate.set()
    await served.serves_honest_client()


@pytest.mark.parametrize(("first", "second"), [((2,), ()), ((5,), (3,)), ((1,), (1,))],
                         ids=["even", "lower", "reused"])
async def test_a_bad_stream_id_closes_the_connection(served: Target, first: tuple[int, ...],
                                                     second: tuple[int, ...]) -> None:
    raw = await started(served)
    authority = f"127.0.0.1:{served.echo_port}"
    for stream_id in first + second:
        raw.send(raw.connect(stream_id, authority))
    await goaway(raw, ErrorCodes.PROTOCOL_ERROR)
    assert await served.counted("stream_id") == 1
    await served.serves_honest_client()


async def test_the_last_stream_id_is_served_and_nothing_after_it(served: Target) -> None:
    """Stream-id exhaustion: the highest id (2^31 - 1) is a valid stream; the peer has no id left, and
    wrapping around to a low one is refused."""
    raw = await started(served)
    authority = f"127.0.0.1:{served.echo_port}"
    last = (1 << 31) - 1
    raw.send(raw.connect(last, authority))
    await raw.frames(HeadersFrame, match=answered(last))
    raw.send(raw.connect(1, authority))
    await goaway(raw, ErrorCodes.PROTOCOL_ERROR)
    assert await served.counted("stream_id") == 1
    await served.serves_honest_client()


async def test_a_window_update_flood_closes_the_connection(served: Target) -> None:
    """WINDOW_UPDATEs answer the data we send: far more of them than frames we sent is a flood."""
    raw = await started(served)
    raw.send(*(WindowUpdateFrame(0, window_increment=1) for _ in range(CONTROL_BUDGET + 100)))
    await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
    assert await served.counted("window_update_flood") == 1
    await served.serves_honest_client()


async def test_an_attack_on_one_connection_leaves_the_others_streams_alone(served: Target) -> None:
    """An honest stream open on its own connection carries on through another peer's floods."""
    honest = await open_connection(("127.0.0.1", served.port), served.pki.client(), SERVER_ID, timeout=5,
                                   make_socket=lambda: client_socket(served.netns, 0))
    try:
        stream = await open_stream(honest, f"127.0.0.1:{served.echo_port}", timeout=5)
        await stream.write(b"before")
        assert await asyncio.wait_for(stream.read(), 5) == b"before"
        raw = await started(served)
        raw.send(*(raw.ping(n) for n in range(PING_BUDGET + 20)))
        await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        raw = await started(served)
        for n in range(RESET_BUDGET + 20):
            raw.send(raw.connect(2 * n + 1, f"127.0.0.1:{served.echo_port}"), raw.reset(2 * n + 1))
        await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        await stream.write(b"after")
        assert await asyncio.wait_for(stream.read(), 5) == b"after"
        stream.close()
    finally:
        honest.writer.close()


async def test_a_refusal_is_logged_naming_the_peer_and_its_identity(served: Target) -> None:
    with structlog.testing.capture_logs() as logs:
        raw = await started(served)
        raw.send(*(raw.ping(n) for n in range(PING_BUDGET + 20)))
        await goaway(raw, ErrorCodes.ENHANCE_YOUR_CALM)
        await served.counted("ping_flood")
    entries = [e for e in logs if e["event"] == "hbone protocol violation"]
    assert len(entries) == 1, logs
    assert entries[0]["reason"] == "ping_flood" and entries[0]["identity"] == str(CLIENT_ID)
    assert entries[0]["peer"].startswith("('127.0.0.1', ") and entries[0]["log_level"] == "warning"
