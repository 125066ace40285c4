"""A stand-in for the agent's CNI socket: HTTP over a unix socket answering each path as the test says, and
recording what the plugin sent."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any


@dataclass
class FakeAgent:
    socket_path: str
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # path -> (status, body)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hold: threading.Event | None = None  # set: answer; unset: keep the plugin waiting


@contextmanager
def fake_agent(directory: Path) -> Iterator[FakeAgent]:
    agent = FakeAgent(str(directory / "cni.sock"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, body: dict[str, Any]) -> None:
            agent.requests.append((self.path, body))
            if agent.hold is not None:
                agent.hold.wait(10)
            status, answer = agent.answers.get(self.path, (200, {}))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer({})

        def do_POST(self) -> None:
            self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    server = socketserver.ThreadingUnixStreamServer(agent.socket_path, Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        if agent.hold is not None:
            agent.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
