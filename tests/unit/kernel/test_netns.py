"""kernel.netns: sockets made in another namespace from the calling thread, and the thread always back home."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netns import (
    Namespaces,
    NamespaceSwitchError,
    client_socket,
    in_netns,
    listening_socket,
    netns_cookie,
)
from tests.support.netns import scratch_netns

SO_NETNS_COOKIE = 71


def cookie_of(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns("na-nsw") as name:
        yield name


def test_a_socket_is_made_in_the_pod_namespace_and_the_thread_comes_back(netns: str) -> None:
    home = thread_netns()
    namespaces = Namespaces()
    pod = namespaces.open(netns)
    try:
        sock = client_socket(pod, 0x539, namespaces=namespaces)
        with sock:
            assert cookie_of(sock) == netns_cookie(netns) != netns_cookie("/proc/self/ns/net")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
            assert not sock.getblocking()
        assert thread_netns() == home
        # no thread was started for it (in_netns would have made one)
        before = threading.active_count()
        listener = listening_socket(pod, 0, namespaces=namespaces, reuse_port=True)
        with listener:
            assert threading.active_count() == before
            assert cookie_of(listener) == netns_cookie(netns)
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            # a second listener on the same port: allowed only because both set SO_REUSEPORT
            port = listener.getsockname()[1]
            with listening_socket(pod, port, namespaces=namespaces, reuse_port=True):
                pass
            with pytest.raises(OSError):
                listening_socket(pod, port, namespaces=namespaces)
        assert thread_netns() == home
    finally:
        pod.close()
        namespaces.close()


def test_an_error_inside_still_brings_the_thread_back(netns: str) -> None:
    home = thread_netns()
    namespaces = Namespaces()
    pod = namespaces.open(netns)
    try:
        def fail() -> None:
            raise ValueError("inside")

        with pytest.raises(ValueError, match="inside"):
            namespaces.run(pod, fail)
        assert thread_netns() == home
    finally:
        pod.close()
        namespaces.close()


def test_another_thread_falls_back_to_a_helper_thread(netns: str) -> None:
    namespaces = Namespaces()
    pod = namespaces.open(netns)
    seen: list[int] = []
    try:
        def other() -> None:
            before = thread_netns()
            seen.append(namespaces.run(pod, thread_netns))
            seen.append(before == thread_netns())

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert seen == [in_netns(netns, thread_netns), True]
    finally:
        pod.close()
        namespaces.close()


def test_not_getting_back_is_reported_as_its_own_error(netns: str) -> None:
    # In a thread of its own: the thread is left in the test namespace, as the tunnel's would be, and ends.
    outcome: list[BaseException] = []

    def stranded() -> None:
        namespaces = Namespaces()
        pod = namespaces.open(netns)
        os.close(namespaces._home)  # the way home is gone
        try:
            namespaces.run(pod, lambda: None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            pod.close()

    worker = threading.Thread(target=stranded)
    worker.start()
    worker.join()
    assert len(outcome) == 1 and isinstance(outcome[0], NamespaceSwitchError)
    assert "could not return" in str(outcome[0])
