"""Slow peers on the HBONE listener: whatever stalls (the handshake: test_tls_refusals.py; the preface,
the first CONNECT, a header block trickled byte by byte) is closed within the target's timeout, counted,
and the listener goes on serving honest clients meanwhile."""

from __future__ import annotations

import asyncio
import time

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame

from tests.security.hostile import REQUEST_TIMEOUT, RawH2, Target

pytestmark = pytest.mark.root


async def closed_in_time(raw: RawH2, code: ErrorCodes) -> float:
    """The server's GOAWAY (with `code`) and close; the seconds it took."""
    started = time.monotonic()
    try:
        frame = await raw.goaway(timeout=REQUEST_TIMEOUT * 8)
    finally:
        raw.close()
    assert frame.error_code == code, frame
    return time.monotonic() - started


async def trickle(raw: RawH2, wire: bytes, stop: asyncio.Event) -> None:
    """One byte at a time, every 50 ms, until the server gives up (or the bytes run out)."""
    for at in range(len(wire)):
        if stop.is_set() or raw.writer.is_closing():
            return
        raw.writer.write(wire[at:at + 1])
        await asyncio.sleep(0.05)  # the attack is the pace itself


async def test_a_connection_silent_after_the_handshake_is_closed(served: Target) -> None:
    raw = await served.raw()
    await served.serves_honest_client()  # served while the silent one is held
    assert await closed_in_time(raw, ErrorCodes.NO_ERROR) < REQUEST_TIMEOUT * 4
    assert await served.counted("preface_timeout") == 1


async def test_a_connection_that_never_sends_a_connect_is_closed(served: Target) -> None:
    raw = await served.raw()
    raw.hello()  # a preface and SETTINGS, then nothing
    assert await closed_in_time(raw, ErrorCodes.ENHANCE_YOUR_CALM) < REQUEST_TIMEOUT * 4
    assert await served.counted("request_timeout") == 1
    await served.serves_honest_client()


async def test_a_first_connect_trickled_byte_by_byte_is_cut_off(served: Target) -> None:
    raw = await served.raw()
    raw.hello()
    stop = asyncio.Event()
    slow = asyncio.create_task(trickle(raw, raw.connect(1, f"127.0.0.1:{served.echo_port}").serialize(), stop))
    try:
        await served.serves_honest_client()
        assert await closed_in_time(raw, ErrorCodes.ENHANCE_YOUR_CALM) < REQUEST_TIMEOUT * 4
    finally:
        stop.set()
        await slow
    assert await served.counted("request_timeout") == 1


async def test_a_later_connect_trickled_byte_by_byte_is_cut_off(served: Target) -> None:
    raw = await served.raw()
    raw.hello()
    authority = f"127.0.0.1:{served.echo_port}"
    raw.send(raw.connect(1, authority))
    await raw.frames(HeadersFrame, match=lambda frame: frame.stream_id == 1)  # an honest first stream
    stop = asyncio.Event()
    slow = asyncio.create_task(trickle(raw, raw.connect(3, authority).serialize(), stop))
    try:
        assert await closed_in_time(raw, ErrorCodes.ENHANCE_YOUR_CALM) < REQUEST_TIMEOUT * 4
    finally:
        stop.set()
        await slow
    assert await served.counted("header_timeout") == 1
    await served.serves_honest_client()


async def test_a_connection_without_streams_is_closed_after_the_idle_timeout(served: Target) -> None:
    served.idle_timeout = REQUEST_TIMEOUT
    raw = await served.raw()
    raw.hello()
    raw.send(raw.connect(1, f"127.0.0.1:{served.echo_port}"), raw.reset(1))  # one stream, gone at once
    assert await closed_in_time(raw, ErrorCodes.NO_ERROR) < REQUEST_TIMEOUT * 6
    await served.serves_honest_client()
