"""Load endpoints for bench/hbone_lab.py, run inside lab pods (uvloop, protocol callbacks: little per-byte
and per-request Python, so the load tools cost the same under every tunnel variant).

    hbone_load.py serve --port P
        one port, two modes chosen by the first byte a connection sends:
        b"S"            sink: count every byte until EOF, answer the count (8 bytes, big-endian), close
        b"A"            acknowledging sink: answer the count (8 bytes) each time another MiB has arrived
                        (for paths that cannot carry a half-close, such as a plain TLS relay)
        b"E" + size(4)  echo: for every `size` bytes received, answer `size` bytes
    hbone_load.py rr --target HOST:PORT [--rate 1000] [--connections 16] [--size 1024] [--seconds 10]
                     [--warmup 1] [--new-connections]
        request/response at a fixed total rate; prints "start" when the measured window opens (after the
        warm-up), then one JSON line: requests, errors, achieved rate, latency percentiles in microseconds.
        Persistent connections by default (each one is one tunnel stream for the whole run, as fortio's
        keep-alive load behind Istio's published ztunnel figures); --new-connections opens a connection
        per request (connect + request + response + close, the latency includes the tunnel's stream setup).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, cast

SINK, ACKED, ECHO = b"S"[0], b"A"[0], b"E"[0]
MIB = 1 << 20
HEADER = 5  # b"E" + 4-byte size


class _Serve(asyncio.BufferedProtocol):
    """One accepted connection of `serve` (reads land in one reused buffer: no per-read allocation)."""

    def __init__(self) -> None:
        self.buffer = memoryview(bytearray(16 << 10))  # until the mode is known (a sink gets 1 MiB)
        self.transport: asyncio.Transport | None = None
        self.header = bytearray()
        self.mode = 0
        self.count = 0
        self.size = 0
        self.have = 0
        self.answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buffer[:nbytes]
        if not self.mode:
            if not self.header:
                self.header += data[:1]
                data = data[1:]
            if self.header[0] in (SINK, ACKED):
                self.mode = self.header[0]
                self.buffer = memoryview(bytearray(1 << 20))
            elif self.header[0] == ECHO:
                need = HEADER - len(self.header)
                self.header += data[:need]
                data = data[need:]
                if len(self.header) == HEADER:
                    self.mode, self.size = ECHO, int.from_bytes(self.header[1:], "big")
                    self.answer = b"r" * self.size
            else:
                assert self.transport is not None
                self.transport.close()
                return
        if self.mode == SINK:
            self.count += len(data)
        elif self.mode == ACKED:
            before, self.count = self.count, self.count + len(data)
            if before // MIB != self.count // MIB:
                assert self.transport is not None
                self.transport.write((self.count // MIB * MIB).to_bytes(8, "big"))
        elif self.mode == ECHO:
            self.have += len(data)
            while self.have >= self.size:
                self.have -= self.size
                assert self.transport is not None
                self.transport.write(self.answer)

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == SINK:
            self.transport.write(self.count.to_bytes(8, "big"))
        self.transport.close()
        return True


async def serve(port: int) -> None:
    """Serve both modes on 0.0.0.0:`port` until killed."""
    server = await asyncio.get_running_loop().create_server(_Serve, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


class _Client(asyncio.Protocol):
    """One request/response connection: the latency is taken in the callback that completes the response."""

    def __init__(self, size: int, done: asyncio.Future[None] | None = None) -> None:
        self.size, self.done = size, done
        self.transport: asyncio.Transport | None = None
        self.request = b"q" * size
        self.sent_ns = 0
        self.have = 0
        self.latencies: list[int] = []
        self.busy = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(b"E" + self.size.to_bytes(4, "big"))

    def send(self) -> bool:
        """Send one request; False (skipped) while the previous one is still unanswered."""
        if self.busy or self.transport is None or self.transport.is_closing():
            return False
        self.busy = True
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.request)
        return True

    def data_received(self, data: bytes) -> None:
        self.have += len(data)
        if self.have >= self.size:
            self.latencies.append(time.perf_counter_ns() - self.sent_ns)
            self.have -= self.size
            self.busy = False
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before the response"))


async def _connect(loop: asyncio.AbstractEventLoop, factory: Callable[[], _Client], host: str, port: int
                   ) -> tuple[asyncio.BaseTransport, _Client]:
    """A connected socket first, so no name resolution (a thread pool round trip) is timed."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return await loop.create_connection(factory, sock=sock)


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1] / 1000, 1),
            "mean": round(statistics.fmean(ordered) / 1000, 1)}


async def rr(host: str, port: int, rate: float, connections: int, size: int, seconds: float, warmup: float,
             new_connections: bool) -> dict[str, Any]:
    """Request/response at `rate` per second in total; see the module doc."""
    loop = asyncio.get_running_loop()
    measuring = False
    latencies: list[int] = []
    errors = skipped = 0
    pending: set[asyncio.Task[None]] = set()

    async def one_new() -> None:
        nonlocal errors
        done: asyncio.Future[None] = loop.create_future()
        started = time.perf_counter_ns()
        counted = measuring
        try:
            transport, protocol = await _connect(loop, lambda: _Client(size, done), host, port)
            protocol.send()
            await asyncio.wait_for(done, 10)
            if counted:
                latencies.append(time.perf_counter_ns() - started)
            transport.close()
        except (OSError, TimeoutError):
            errors += counted

    clients: list[_Client] = []
    if not new_connections:
        for _ in range(connections):
            clients.append((await _connect(loop, lambda: _Client(size), host, port))[1])
    interval = 1 / rate
    start = loop.time() + 0.01
    window_open, window_close = start + warmup, start + warmup + seconds
    tick = 0
    while (due := start + tick * interval) < window_close:
        if not measuring and due >= window_open:
            measuring = True
            for client in clients:
                client.latencies.clear()
            print("start", flush=True)
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if new_connections:
            task = asyncio.create_task(one_new())
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:  # request k goes on connection k mod C: each connection sends every C/rate seconds
            client = clients[tick % connections]
            if client.lost.done():
                raise ConnectionResetError("a persistent connection was closed by the path under test")
            if not client.send():
                skipped += measuring
        tick += 1
    if pending:
        await asyncio.wait(pending, timeout=10)
    for client in clients:
        latencies.extend(client.latencies)
        assert client.transport is not None
        client.transport.close()
    return {"mode": "new-connections" if new_connections else "persistent", "connections": connections,
            "size": size, "target_rate": rate, "seconds": seconds, "requests": len(latencies),
            "rate": round(len(latencies) / seconds, 1), "errors": errors, "skipped": skipped,
            "latency_us": _percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    r = sub.add_parser("rr")
    r.add_argument("--target", required=True, help="HOST:PORT")
    r.add_argument("--rate", type=float, default=1000)
    r.add_argument("--connections", type=int, default=16)
    r.add_argument("--size", type=int, default=1024)
    r.add_argument("--seconds", type=float, default=10)
    r.add_argument("--warmup", type=float, default=1)
    r.add_argument("--new-connections", action="store_true")
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    if args.command == "serve":
        run(serve(args.port))
        return
    host, _, port = args.target.rpartition(":")
    report = run(rr(host, int(port), args.rate, args.connections, args.size, args.seconds, args.warmup,
                    args.new_connections))
    print(json.dumps(report), flush=True)
    sys.exit(0 if report["requests"] else 1)


if __name__ == "__main__":
    main()
