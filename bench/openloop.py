"""Open-loop request/response load for bench/tunnel_lab.py, run as its own process inside the client pod
(its network namespace and cgroup), against the echo mode of bench/hbone_load.py's `serve`.

Open loop, without coordinated omission: request k is due at start + k/rate whatever happened to the
earlier ones, and its latency is measured from that due time, not from when it was sent, so a stalled
path is charged for the requests that queue up behind the stall (a closed-loop client would send fewer of
them and report a rosier tail). How late each request actually left is reported apart ("lateness"): when
that grows, the generator itself is the bottleneck and the run says so.

    openloop.py persistent --target HOST:PORT [--rate 1000] [--connections 16] [--size 1024]
                           [--seconds 10] [--warmup 1]
        --connections connections opened before the schedule starts; request k goes on connection
        k mod C and is written at once even if that connection's previous request is still unanswered
        (pipelined: the echo answers in order, so answer j of a connection completes its request j)
    openloop.py new --target HOST:PORT [--rate 300] [--size 1024] [--seconds 10] [--warmup 1]
        one new connection per request: connect, send the request, read the answer, close

Prints "start" when the first measured request is due (after --warmup), then one JSON line once every
measured request has completed or failed: counts, latency from the due time, service time (from the
actual send), lateness, all in microseconds, and the generator's own CPU over the measured window.
No imports from the project, so the process starts fast and costs the same under every variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

ECHO = b"E"
REQUEST_TIMEOUT_S = 10.0


def due_ns(start_ns: int, k: int, rate: float) -> int:
    """When request k of a schedule opened at `start_ns` at `rate` per second is due (monotonic ns)."""
    return start_ns + round(k * 1e9 / rate)


def measured_range(rate: float, warmup: float, seconds: float) -> range:
    """The request indices of the measured window: due in [warmup, warmup + seconds) after the start."""
    return range(round(warmup * rate), round((warmup + seconds) * rate))


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in µs of `samples_ns` (nearest rank: the sample at index floor(q * n));
    {} when there is none."""
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p99.9": at(0.999),
            "max": round(ordered[-1] / 1000, 1), "mean": round(sum(ordered) / len(ordered) / 1000, 1)}


@dataclass
class Outcome:
    """One measured request: due, sent and completed times (monotonic ns; completed 0 if it failed)."""

    due: int
    sent: int
    completed: int = 0
    error: str = ""


def summarize(outcomes: Sequence[Outcome], seconds: float) -> dict[str, Any]:
    """Counts and percentiles of the measured requests: latency from the due time (what the module doc
    promises), service time from the send, lateness of the send."""
    done = [o for o in outcomes if o.completed and not o.error]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {"scheduled": len(outcomes), "completed": len(done), "errors": sum(errors.values()),
            "errors_by_kind": errors, "rate": round(len(done) / seconds, 1),
            "latency_us": percentiles([o.completed - o.due for o in done]),
            "service_us": percentiles([o.completed - o.sent for o in done]),
            "lateness_us": percentiles([max(0, o.sent - o.due) for o in outcomes if o.sent])}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _connected_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking socket (no name resolution, which would be a thread pool round trip)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Pipelined(asyncio.Protocol):
    """A persistent connection: requests written as they fall due, answers matched to them in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.request = b"q" * size
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[Outcome | None] = deque()  # None: a warm-up request, not measured
        self.have = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(ECHO + self.size.to_bytes(4, "big"))

    def send(self, outcome: Outcome | None) -> None:
        assert self.transport is not None
        self.waiting.append(outcome)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.have += len(data)
        now = time.monotonic_ns()
        while self.have >= self.size and self.waiting:
            self.have -= self.size
            outcome = self.waiting.popleft()
            if outcome is not None:
                outcome.completed = now

    def connection_lost(self, exc: Exception | None) -> None:
        for outcome in self.waiting:
            if outcome is not None:
                outcome.error = type(exc).__name__ if exc else "ClosedBeforeAnswer"
        self.waiting.clear()
        if not self.lost.done():
            self.lost.set_result(None)


class _OneShot(asyncio.Protocol):
    """A new connection's single exchange: the request on connect, done once the whole answer is in."""

    def __init__(self, size: int, outcome: Outcome | None, done: asyncio.Future[None]) -> None:
        self.size, self.outcome, self.done = size, outcome, done
        self.have = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(ECHO + self.size.to_bytes(4, "big") + b"q" * self.size)

    def data_received(self, data: bytes) -> None:
        self.have += len(data)
        if self.have >= self.size and not self.done.done():
            if self.outcome is not None:
                self.outcome.completed = time.monotonic_ns()
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before the answer"))


@dataclass
class _Run:
    """The state of one run of the schedule."""

    host: str
    port: int
    rate: float
    size: int
    window: range
    outcomes: list[Outcome] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    cpu_started: float = 0.0

    def outcome(self, k: int, due: int, sent: int) -> Outcome | None:
        """The record of request k if it is measured (printing "start" at the first one), else None."""
        if k not in self.window:
            return None
        if k == self.window.start:
            self.cpu_started = _cpu_s()
            print("start", flush=True)
        record = Outcome(due, sent)
        self.outcomes.append(record)
        return record

    async def one_new(self, outcome: Outcome | None) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                sock = await _connected_socket(loop, self.host, self.port)
                transport, _ = await loop.create_connection(lambda: _OneShot(self.size, outcome, done), sock=sock)
                await done
        except (OSError, TimeoutError) as exc:
            if outcome is not None:
                outcome.error = type(exc).__name__
        finally:
            if transport is not None:
                transport.close()


async def run(mode: str, host: str, port: int, rate: float, connections: int, size: int, seconds: float,
              warmup: float) -> dict[str, Any]:
    """The schedule of the module doc; the summary of its measured window."""
    loop = asyncio.get_running_loop()
    state = _Run(host, port, rate, size, measured_range(rate, warmup, seconds))
    clients: list[_Pipelined] = []
    if mode == "persistent":
        for _ in range(connections):
            sock = await _connected_socket(loop, host, port)
            clients.append((await loop.create_connection(lambda: _Pipelined(size), sock=sock))[1])
    start = time.monotonic_ns() + 10_000_000
    k, end = 0, state.window.stop
    while k < end:
        now = time.monotonic_ns()
        while k < end and (due := due_ns(start, k, rate)) <= now:  # all that fell due, late ones included
            outcome = state.outcome(k, due, time.monotonic_ns())
            if clients:
                client = clients[k % len(clients)]
                if client.lost.done():
                    raise ConnectionResetError("a persistent connection was closed by the path under test")
                client.send(outcome)
            else:
                task = loop.create_task(state.one_new(outcome))
                state.tasks.add(task)
                task.add_done_callback(state.tasks.discard)
            k += 1
        if k < end:
            await asyncio.sleep(max(0.0, (due_ns(start, k, rate) - time.monotonic_ns()) / 1e9))
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while any(not o.completed and not o.error for o in state.outcomes) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # the last answers are in flight; each request has its own timeout
    if state.tasks:
        await asyncio.wait(state.tasks, timeout=REQUEST_TIMEOUT_S)
    cpu = _cpu_s() - state.cpu_started
    for o in state.outcomes:
        if not o.completed and not o.error:
            o.error = "Timeout"
    for client in clients:
        assert client.transport is not None
        client.transport.close()
    elapsed = (time.monotonic_ns() - due_ns(start, state.window.start, rate)) / 1e9
    return {"mode": mode, "connections": connections if clients else None, "size": size, "target_rate": rate,
            "seconds": seconds, **summarize(state.outcomes, seconds),
            "generator_cpu_s": round(cpu, 3), "generator_vcpu": round(cpu / elapsed, 3) if elapsed > 0 else 0.0}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line of the module doc."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["persistent", "new"])
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--connections", type=int, default=16, help="persistent connections")
    parser.add_argument("--size", type=int, default=1024, help="bytes of each request and each answer")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="scheduled but not measured, first")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.connections < 1 or args.size < 1:
        parser.error("--rate, --seconds, --connections and --size must be positive")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a stalled path holds many connections open
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]
    host, _, port = args.target.rpartition(":")
    report = runner(run(args.mode, host, int(port), args.rate, args.connections, args.size, args.seconds,
                        args.warmup))
    print(json.dumps(report), flush=True)
    sys.exit(0 if report["completed"] else 1)


if __name__ == "__main__":
    main()
