"""The HBONE server (port 15008): one TCP connection tunnelled per HTTP/2 CONNECT stream, over mutual TLS.

A CONNECT whose `:authority` is `ip:port` gets an upstream TCP connection; 200 only once it is up, 503
if it cannot be made, 401 when policy denies, 400 for anything that is not a classic CONNECT to an
address (`request.connect_verdict`). Bytes flow both ways with backpressure (`connection`'s module doc);
a half-close travels as END_STREAM / write_eof.

Hostile peers (the server side, every cost bounded; each refusal is logged naming the peer and counted
through `violation(reason)`, the tunnel's nodeagent_hbone_protocol_violations_total{reason}):
- TLS (`serve_tls`): the handshake is the server's own, so a refused one is seen and named (tls.py:
  TLS < 1.3, no client certificate, untrusted chain, expired / not yet valid leaf, stalled handshake);
  then ALPN h2 and the trust domain (`peer_identity`).
- h2 4.x already bounds: the decoded header list (hpack's max_header_list_size, the HPACK-bomb guard;
  h2 applies our 16 KiB only once the peer acknowledged our SETTINGS, we set it from the first byte),
  64 CONTINUATION frames per block, frames beyond SETTINGS_MAX_FRAME_SIZE, even / decreasing stream ids
  (connection errors, RFC 9113 5.1.1), and closed streams remembered (2^16). What it lacks is added here
  (`framing` screens each frame as its header arrives; `serve_connection` does the rest):
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
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import structlog
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.exceptions import ProtocolError, StreamClosedError

from nodeagent.ca.identity import IdentityError, SpiffeId
from nodeagent.tunnel.hbone.connection import HboneConnection, LocalSide, StreamState, marked_socket, take_over
from nodeagent.tunnel.hbone.framing import Budget
from nodeagent.tunnel.hbone.limits import (
    FLOOD_WINDOW,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_PENDING_OPENS,
    MAX_STREAMS,
    PREMATURE_RESET,
    READ_CHUNK,
    REFUSED_BUDGET,
    REQUEST_TIMEOUT,
    RESET_BUDGET,
)
from nodeagent.tunnel.hbone.request import connect_verdict, header_text
from nodeagent.tunnel.identity.tls import PeerRefused, handshake_failure, peer_identity

log = structlog.get_logger("nodeagent.tunnel.hbone.server")

# (peer identity, destination "ip:port") -> True (allowed), False (401: denied by policy), or the HTTP
# status to refuse the CONNECT with (400: not a target this listener serves; 503: not serving yet)
Policy = Callable[[SpiffeId, str], "bool | int"]
# (peer identity, "ip:port", abort) at the 200 -> called with (request bytes, response bytes) when the stream
# ends; `abort()` resets the stream (a policy that changed now denies it)
Observe = Callable[[SpiffeId, str, Callable[[], None]], Callable[[int, int], None]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# How the server reaches an upstream: a connected socket (the fast path), or a stream pair.
Connect = Callable[[str, int], Awaitable["socket.socket | Streams"]]
Violations = Callable[[str], None]  # counts one refusal by reason (the tunnel's protocol_violations counter)


async def _connect_local(connect: Connect, host: str, port: int, local: LocalSide) -> None:
    """Connect the upstream of a server stream onto `local` (before the 200 goes out)."""
    made = await connect(host, port)
    if isinstance(made, socket.socket):
        try:
            await asyncio.get_running_loop().create_connection(lambda: local, sock=made)
        except BaseException:
            made.close()
            raise
        return
    buffered, eof = take_over(*made, local)
    if buffered:
        local.data_received(buffered)
    if eof:
        local.eof_received()


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, trust_domain: str,
                           policy: Policy, connect: Connect, observe: Observe | None = None,
                           violation: Violations | None = None, request_timeout: float = REQUEST_TIMEOUT,
                           idle_timeout: float | None = IDLE_TIMEOUT, draining: asyncio.Event | None = None
                           ) -> None:
    """Serve one accepted TLS connection on 15008 until it ends.

    `connect(host, port)` reaches an upstream: a connected socket (the fast path, see
    `upstream_socket`) or a (reader, writer) pair (`open_upstream`). `observe(peer, target, abort)` is told of
    each stream that got its 200 and returns what to call with (request bytes, response bytes) when the
    stream ends (the tunnel's metrics and access log). `violation(reason)` is told of every refusal for
    a bound of the module doc (reasons: limits.VIOLATIONS); each is also logged with the peer. Once
    `draining` is set the connection drains: a graceful GOAWAY, its open streams finish, then it closes."""
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
    h2 = HboneConnection(client_side=False)
    tasks: set[asyncio.Task[None]] = set()
    opening: dict[int, asyncio.Task[None]] = {}  # stream id -> its upstream connect, until the 200
    resets, refusals = Budget(RESET_BUDGET), Budget(REFUSED_BUDGET)
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
            preface = h2.conn.incoming_buffer.preface_pending()
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
        pending = h2.conn.incoming_buffer.header_pending()
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
            h2.abort(stream)  # early DATA gives its connection window back
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

    def on_reset(stream_id: int, stream: StreamState | None) -> None:
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

    async def open_stream(stream: StreamState, destination: tuple[str, int]) -> None:
        target = f"{destination[0]}:{destination[1]}"
        try:
            admitted = policy(identity, target)
            if admitted is not True:
                status = 401 if admitted is False else int(admitted)
                refuse(stream.id, status)
                log.info("hbone stream refused", peer=str(identity), destination=target, status=status)
                return
            local = LocalSide(h2, stream)
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
        status, destination, reason = connect_verdict(header_text(event.headers))
        if status:
            refuse(event.stream_id, status)
            log.info("hbone request refused", peer=str(identity), status=status, reason=reason)
            return
        assert destination is not None
        if len(opening) >= MAX_PENDING_OPENS:  # never more upstream connects in flight than streams allowed
            h2.reset(event.stream_id, ErrorCodes.REFUSED_STREAM)
            refused(event.stream_id)
            return
        stream = h2.streams[event.stream_id] = StreamState(event.stream_id, born=loop.time())
        task = asyncio.create_task(open_stream(stream, destination))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if not task.done():
            opening[event.stream_id] = task

    h2.on_request = on_request
    h2.on_reset, h2.on_refused, h2.on_violation, h2.on_received = on_reset, refused, violated, received
    arm(request_timeout, "first_request")
    buffered, eof = take_over(reader, writer, h2)
    if buffered:
        h2.receive(buffered)
    if eof:
        writer.close()
    drain: asyncio.Task[bool] | None = None
    if draining is not None:  # the tunnel is shutting down: peers open their next streams elsewhere
        drain = asyncio.ensure_future(draining.wait())
        drain.add_done_callback(lambda waited: None if waited.cancelled() else h2.drain())
    try:
        await h2.closed.wait()
    finally:
        if drain is not None:
            drain.cancel()
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
