"""A few GET routes on a thread: the agent's health and metrics endpoints (no web framework needed), and the
bounded HTTP server they and the service health listeners share.

Every client of these ports may be hostile (a health check node port is open to whatever reaches the node), and
they live in the agent's own process, so a client must not be able to hold its threads, file descriptors or
memory. kube-proxy's Go `http.Server` (pkg/proxy/healthcheck, no timeouts set) relies on goroutines being cheap
and on Go's `DefaultMaxHeaderBytes` (1 MiB, then 431); a Python thread per idle connection is not cheap, so
`BoundedHTTPServer` adds what Go's `ReadHeaderTimeout` and `MaxHeaderBytes` would give, and a connection cap:

- the whole request head must arrive within `head_timeout` (a deadline, not a per-read timeout: a client
  trickling a byte at a time is cut too); then the connection is closed without an answer, as Go does;
- a head larger than `max_head_bytes` is answered 431 and the connection closed, without reading the rest;
- at most `max_connections` connections are served at once; a new one over the cap evicts the oldest that is
  still sending its head (an idle one: a prober sends its head at once, so it is the slowloris that goes), or,
  when all are answering, is closed at once.

What was turned away is counted by reason (`Refusals`).
"""

from __future__ import annotations

import contextlib
import enum
import io
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# a route answers (status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]

# the end of a request head: an empty line (a bare LF is accepted, as Go's and Python's parsers accept it)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Go's answer to a head over MaxHeaderBytes (net/http server.go), then the connection is closed
_TOO_LARGE_BODY = b"431 Request Header Fields Too Large"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Connection: close\r\nContent-Length: " + str(len(_TOO_LARGE_BODY)).encode() + b"\r\n\r\n"
              + _TOO_LARGE_BODY)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may take of a server. The defaults are far above what a load balancer's prober needs (one
    small GET at a time, sent at once) and bound an attacker to `max_connections` threads and
    `max_connections * max_head_bytes` of buffered heads per listener."""

    head_timeout: float = 5.0
    max_head_bytes: int = 64 * 1024
    max_connections: int = 64


DEFAULT_LIMITS = ConnectionLimits()
REFUSAL_REASONS = ("timed_out", "too_large", "evicted", "refused")


@dataclass
class Refusals:
    """Connections turned away, by reason (thread-safe; shared by the servers of one owner)."""

    _counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, reason: str) -> None:
        """Count one connection turned away for `reason` (one of REFUSAL_REASONS)."""
        with self._lock:
            self._counts[reason] += 1

    def counts(self) -> dict[str, int]:
        """The counts so far, every reason present."""
        with self._lock:
            return dict(self._counts)


class HeadOutcome(enum.Enum):
    """How reading a request head ended."""

    READ = "read"
    TOO_LARGE = "too_large"  # over max_head_bytes: answered 431
    TIMED_OUT = "timed_out"  # not all there by the deadline: closed without an answer
    CLOSED = "closed"  # the client closed or reset it (a TCP-connect probe does), or it was evicted


@dataclass(frozen=True)
class Head:
    """What `read_head` found: the head's bytes when `outcome` is READ."""

    outcome: HeadOutcome
    data: bytes = b""


def read_head(conn: socket.socket, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic) -> Head:
    """Read a request head from `conn` within `limits` (the bytes up to and including its empty line); anything
    after it is left unread."""
    deadline = clock() + limits.head_timeout
    buffered = bytearray()
    while True:
        end = _HEAD_END.search(buffered)
        if end is not None and end.end() <= limits.max_head_bytes:
            return Head(HeadOutcome.READ, bytes(buffered[:end.end()]))
        if len(buffered) >= limits.max_head_bytes:
            return Head(HeadOutcome.TOO_LARGE)
        remaining = deadline - clock()
        if remaining <= 0:
            return Head(HeadOutcome.TIMED_OUT)
        conn.settimeout(remaining)
        try:
            # never more than the limit (plus the empty line's bytes): the rest of a huge head stays unread
            chunk = conn.recv(min(65536, limits.max_head_bytes - len(buffered) + 4))
        except TimeoutError:
            return Head(HeadOutcome.TIMED_OUT)
        except OSError:
            return Head(HeadOutcome.CLOSED)
        if not chunk:
            return Head(HeadOutcome.CLOSED)
        buffered += chunk


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """A request handler that reads its head within the server's `ConnectionLimits` before parsing it."""

    server: BoundedHTTPServer

    def handle(self) -> None:
        limits = self.server.limits
        head = read_head(self.connection, limits)
        if self.server.mark_answering(self.request) is None:
            return  # evicted (counted then): its socket is shut down
        if head.outcome is HeadOutcome.TOO_LARGE:
            self.server.refusals.add("too_large")
            self.connection.settimeout(limits.head_timeout)
            with contextlib.suppress(OSError):  # the client went: nothing to tell
                self.connection.sendall(_TOO_LARGE)
            return
        if head.outcome is HeadOutcome.TIMED_OUT:
            self.server.refusals.add("timed_out")
        if head.outcome is not HeadOutcome.READ:
            return
        self.connection.settimeout(limits.head_timeout)  # writing a small answer to a client that never reads
        self.rfile = io.BytesIO(head.data)
        self.close_connection = True  # one request per connection (HTTP/1.0 answers, as before)
        self.handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose clients are bounded by `limits` (see the module's docstring)."""

    daemon_threads = True
    # socketserver's default backlog is 5: a burst of connections would leave a prober's SYN to be retried a
    # second later; Go listens with the kernel's somaxconn
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BoundedRequestHandler],
                 limits: ConnectionLimits = DEFAULT_LIMITS, refusals: Refusals | None = None) -> None:
        self.limits = limits
        self.refusals = refusals if refusals is not None else Refusals()
        self._lock = threading.Lock()
        # served connections in arrival order -> whether still reading the head (only those may be evicted)
        self._active: dict[socket.socket, bool] = {}
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        evicted: socket.socket | None = None
        refused = False
        with self._lock:
            if len(self._active) >= self.limits.max_connections:
                evicted = next((conn for conn, reading in self._active.items() if reading), None)
                if evicted is None:  # all answering (briefly): this one waits for nobody, it goes
                    refused = True
                else:
                    del self._active[evicted]
            if not refused:
                self._active[request] = True
        if refused:
            self.refusals.add("refused")
            self.shutdown_request(request)
            return
        if evicted is not None:
            self.refusals.add("evicted")
            with contextlib.suppress(OSError):  # wakes its thread's read, which then ends; its thread closes it
                evicted.shutdown(socket.SHUT_RDWR)
        super().process_request(request, client_address)

    def mark_answering(self, request: socket.socket) -> socket.socket | None:
        """Record that `request`'s head is read (it can no longer be evicted); None if it was evicted."""
        with self._lock:
            if request not in self._active:
                return None
            self._active[request] = False
            return request

    def close_request(self, request: Any) -> None:
        with self._lock:
            self._active.pop(request, None)
        super().close_request(request)


def respond(handler: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str], data: bytes) -> None:
    """Write one whole answer: the status, `headers` in order, Content-Length and the body."""
    handler.send_response(status)
    for header, value in headers.items():
        handler.send_header(header, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class RouteServer:
    """Serves `routes` (path -> Route) on (host, port) from a daemon thread; 404 for anything else. `headers`
    are added to every answer of a route (kube-proxy's health server sends `X-Content-Type-Options: nosniff`).
    Clients are bounded by `limits`."""

    def __init__(self, routes: Mapping[str, Route], host: str, port: int, name: str,
                 headers: Mapping[str, str] | None = None, limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        extra = dict(headers or {})

        class Handler(BoundedRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                status, kind, data = route()
                respond(self, status, {"Content-Type": kind, **extra}, data)

        self._server = BoundedHTTPServer((host, port), Handler, limits)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def start(self) -> RouteServer:
        self._thread.start()
        return self

    def refusals(self) -> dict[str, int]:
        """The connections this server turned away, by reason."""
        return self._server.refusals.counts()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
