"""A few GET routes on a thread: the agent's health and metrics endpoints (no web framework needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# a route answers (status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]


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
    are added to every answer of a route (kube-proxy's health server sends `X-Content-Type-Options: nosniff`)."""

    def __init__(self, routes: Mapping[str, Route], host: str, port: int, name: str,
                 headers: Mapping[str, str] | None = None) -> None:
        extra = dict(headers or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                status, kind, data = route()
                respond(self, status, {"Content-Type": kind, **extra}, data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def start(self) -> RouteServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
