"""Hostile clients of the health check node ports: many idle half-sent requests (slowloris), a flood of requests,
garbage request lines and oversized heads. Meanwhile a well-behaved prober keeps getting its answer promptly from
the Service's listener, the agent's /healthz (another server of the same process) stays answered, the process's
threads stay bounded, and what was turned away is counted.

Everything listens on 127.0.0.1 with ports the kernel picks (as the other service health unit tests).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from nodeagent.observability.health import HEALTH_HEADERS, HealthState, health_routes
from nodeagent.observability.http import DEFAULT_LIMITS, RouteServer
from nodeagent.observability.service_health import Listen, ServiceHealthServers, ServiceName

SERVICE = ServiceName("demo", "lb")
PROMPT = 2.0  # seconds a well-behaved probe may take while the attack goes on (LB probers time out after 5 s or so)


@dataclass
class Target:
    servers: ServiceHealthServers
    health: RouteServer

    @property
    def address(self) -> tuple[str, int]:
        (address,) = self.servers.addresses()[SERVICE]
        return address

    @property
    def healthz(self) -> tuple[str, int]:
        return "127.0.0.1", self.health.port


@pytest.fixture
def target() -> Iterator[Target]:
    servers = ServiceHealthServers(lambda: True)
    servers.sync_services({SERVICE: Listen(0, ("127.0.0.1",))})
    servers.sync_endpoints({SERVICE: 1})
    health = RouteServer(health_routes(HealthState()), "127.0.0.1", 0, "healthz-test", headers=HEALTH_HEADERS).start()
    try:
        yield Target(servers, health)
    finally:
        health.stop()
        servers.close()


def request(address: tuple[str, int], data: bytes, timeout: float = PROMPT) -> bytes:
    """Send `data` on a new connection and read until the server closes it (or `timeout` passes)."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The status code of an HTTP answer's first line; 0 for none."""
    parts = answer.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


PROBE = b"GET / HTTP/1.1\r\nHost: node\r\nUser-Agent: lb-prober\r\nConnection: close\r\n\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"


def assert_well_behaved_clients_served(target: Target, rounds: int = 10) -> list[float]:
    """The prober's answers (200: one local endpoint) and /healthz's, each within PROMPT; their latencies."""
    took = []
    for _ in range(rounds):
        started = time.monotonic()
        assert status_of(request(target.address, PROBE)) == 200
        assert status_of(request(target.healthz, HEALTHZ)) == 200
        took.append(time.monotonic() - started)
    assert max(took) < 2 * PROMPT, took
    return took


def hold_half_requests(address: tuple[str, int], count: int, stack: ExitStack) -> list[socket.socket]:
    """`count` connections that each send half a request line and then nothing (slowloris)."""
    held = []
    for _ in range(count):
        conn = stack.enter_context(socket.create_connection(address, timeout=5))
        conn.sendall(b"GET / HT")
        held.append(conn)
    return held


def closed_by_server(conn: socket.socket, timeout: float) -> bool:
    """Whether the server closes `conn` (EOF or reset) within `timeout`."""
    conn.settimeout(timeout)
    try:
        while conn.recv(65536):
            continue
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slowloris_neither_starves_the_prober_nor_grows_the_threads(target: Target) -> None:
    baseline = threading.active_count()
    idle = 4 * DEFAULT_LIMITS.max_connections
    with ExitStack() as stack:
        hold_half_requests(target.address, idle, stack)
        hold_half_requests(target.healthz, idle, stack)
        assert_well_behaved_clients_served(target)
        # idle connections cost no thread each: a bounded number serve (or wait for) requests
        assert threading.active_count() <= baseline + 2 * DEFAULT_LIMITS.max_connections + 4, \
            threading.active_count()
    assert target.servers.refusals()["evicted"] > 0
    assert target.health.refusals()["evicted"] > 0


def test_an_idle_connection_is_closed_after_the_head_timeout(target: Target) -> None:
    with ExitStack() as stack:
        (conn,) = hold_half_requests(target.address, 1, stack)
        started = time.monotonic()
        assert closed_by_server(conn, DEFAULT_LIMITS.head_timeout + 3), "the server gives up on a half request"
        assert time.monotonic() - started >= DEFAULT_LIMITS.head_timeout - 0.5
    assert target.servers.refusals()["timed_out"] == 1


def test_a_trickled_head_is_cut_at_the_head_timeout_however_slowly_it_comes(target: Target) -> None:
    """One byte a little before each read would time out: a per-read timeout alone never ends it."""
    with socket.create_connection(target.address, timeout=5) as conn:
        started = time.monotonic()
        closed = False
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_by_server(conn, 0.5):
                closed = True
                break
        assert closed, "never closed"
        assert time.monotonic() - started < DEFAULT_LIMITS.head_timeout + 3


def test_a_flood_of_requests_leaves_the_prober_served(target: Target) -> None:
    stop = threading.Event()
    answered: list[int] = []

    def flood(address: tuple[str, int], data: bytes) -> None:
        while not stop.is_set():
            try:
                answered.append(status_of(request(address, data, timeout=5)))
            except OSError:
                answered.append(0)

    flooders = [threading.Thread(target=flood, args=pair, daemon=True)
                for pair in ((target.address, PROBE), (target.healthz, HEALTHZ)) for _ in range(6)]
    for thread in flooders:
        thread.start()
    try:
        took = assert_well_behaved_clients_served(target, rounds=20)
    finally:
        stop.set()
        for thread in flooders:
            thread.join(timeout=10)
    assert len(answered) > 100 and answered.count(200) > len(answered) // 2, (len(answered), answered[:20])
    print(f"flood: {len(answered)} requests answered; prober max {max(took):.3f} s")


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\xff\xfe\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET " + b"/x" * 40000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\n\n",  # bare line feeds: accepted (as Go's server accepts them)
])
def test_garbage_is_refused_or_answered_and_the_prober_still_served(target: Target, garbage: bytes) -> None:
    try:
        answer = request(target.address, garbage)
    except ConnectionResetError:
        answer = b""
    assert status_of(answer) in {0, 200, 400, 414, 431, 505}, answer[:200]
    assert_well_behaved_clients_served(target, rounds=2)


def test_an_oversized_head_is_refused_with_431_before_it_is_all_read(target: Target) -> None:
    """kube-proxy's Go server answers 431 above its 1 MiB header limit; this one's bound is lower."""
    header = b"X-Big: " + b"a" * 60000 + b"\r\n"
    head = b"GET / HTTP/1.1\r\nHost: node\r\n" + header * 20 + b"\r\n"  # 1.2 MB in lines Python would take
    with socket.create_connection(target.address, timeout=5) as conn:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before all of it was sent
            conn.sendall(head)
        try:
            answer = conn.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert status_of(answer) in {431, 0}, answer[:200]
    assert target.servers.refusals()["too_large"] == 1
    assert_well_behaved_clients_served(target, rounds=2)
