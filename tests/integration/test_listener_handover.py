"""Handing a port over between two tunnels (root: a network namespace of the test's own): with
`migrate_requests_on_close`, connections queued on a closing SO_REUSEPORT listener move to the listener
that stays instead of being reset, which a rollout's old tunnel closing its pod listeners relies on."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netns import Namespaces, OpenNetns, listening_socket, migrate_requests_on_close

pytestmark = pytest.mark.root
PORT = 15999


@pytest.fixture
def netns() -> Iterator[tuple[Namespaces, OpenNetns]]:
    name = f"natest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    namespaces = Namespaces()
    opened = namespaces.open(name)
    try:
        namespaces.run(opened, lambda: subprocess.run(["ip", "link", "set", "lo", "up"], check=True))
        yield namespaces, opened
    finally:
        opened.close()
        namespaces.close()
        subprocess.run(["ip", "netns", "del", name], check=True)


def handover(namespaces: Namespaces, netns: OpenNetns) -> tuple[int, int]:
    """Two listeners share PORT; 64 clients connect (none accepted yet); the first listener closes. Returns
    (connections the second listener then accepts, clients whose connection was reset)."""
    old = listening_socket(netns, PORT, reuse_port=True, namespaces=namespaces)
    new = listening_socket(netns, PORT, reuse_port=True, namespaces=namespaces)
    clients: list[socket.socket] = []
    try:
        def connect() -> socket.socket:
            client = socket.create_connection(("127.0.0.1", PORT), timeout=2)
            client.setblocking(False)
            return client

        clients = [namespaces.run(netns, connect) for _ in range(64)]
        old.close()
        new.setblocking(False)
        accepted: list[socket.socket] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                accepted.append(new.accept()[0])
        reset = 0
        for client in clients:
            try:
                client.recv(1)
            except ConnectionResetError:
                reset += 1
            except BlockingIOError:
                pass
        for sock in accepted:
            sock.close()
        return len(accepted), reset
    finally:
        for client in clients:
            client.close()
        old.close()
        new.close()


def test_queued_connections_move_to_the_listener_that_stays(netns: tuple[Namespaces, OpenNetns]) -> None:
    namespaces, opened = netns
    assert migrate_requests_on_close(opened, namespaces)
    accepted, reset = handover(namespaces, opened)
    assert (accepted, reset) == (64, 0)


def test_without_it_the_closing_listeners_queue_is_reset(netns: tuple[Namespaces, OpenNetns]) -> None:
    """The failure the setting prevents (a fresh namespace has it off), so the test above can fail."""
    namespaces, opened = netns
    accepted, reset = handover(namespaces, opened)
    assert reset > 0 and accepted + reset == 64
