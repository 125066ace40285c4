"""Two tunnels on one node during a rollout (no root): the newest gets the state, the older keeps its stream
and gets the removals, a pod stays capturable while either serves it, and the older takes over if the
newest leaves (istio-cni's ztunnel server behaves so)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.control.api import control_pb2
from nodeagent.control.assignments import Assignment
from nodeagent.control.server import ControlServer
from tests.support.control_tunnel import Tunnel

ECHO = Assignment("demo/echo-0", "10.244.1.2", "demo", "echo", "/run/netns/echo-0")
WEB = Assignment("demo/web-0", "10.244.1.3", "demo", "web", "/run/netns/web-0")


def until(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    control = ControlServer("node1").start(str(tmp_path / "control.sock"))
    try:
        yield control
    finally:
        control.stop()


def uids(update: control_pb2.TunnelUpdate) -> list[str]:
    return sorted(a.uid for a in update.add)


def test_the_newest_tunnel_gets_the_state_and_the_older_keeps_its_stream_for_removals(
        server: ControlServer, tmp_path: Path) -> None:
    server.publish({ECHO.uid: ECHO})
    old = Tunnel(str(tmp_path / "control.sock"))
    try:
        first = old.next()
        assert first.full_state and uids(first) == [ECHO.uid]
        new = Tunnel(str(tmp_path / "control.sock"))
        try:
            taken = new.next()
            assert taken.full_state and uids(taken) == [ECHO.uid]
            until(lambda: len(server._streams) == 2)  # the old stream was not ended
            server.publish({ECHO.uid: ECHO, WEB.uid: WEB})
            assert uids(new.next()) == [WEB.uid]
            assert old.quiet(), "an added pod goes to the newest tunnel only"
            server.publish({WEB.uid: WEB})
            assert list(new.next().remove) == [ECHO.uid]
            assert list(old.next().remove) == [ECHO.uid], "the older tunnel releases a deleted pod too"
        finally:
            new.close()
    finally:
        old.close()


def test_a_pod_stays_capturable_while_either_tunnel_serves_it(server: ControlServer, tmp_path: Path) -> None:
    server.publish({ECHO.uid: ECHO})
    old = Tunnel(str(tmp_path / "control.sock"))
    new: Tunnel | None = None
    try:
        old.ack(old.next(), [ECHO.uid])
        until(lambda: server.served(ECHO))
        new = Tunnel(str(tmp_path / "control.sock"))
        update = new.next()
        # The new tunnel has not acknowledged yet: the old one still serves the pod, so it stays captured.
        assert server.served(ECHO)
        old.close()
        until(lambda: len(server._streams) == 1)
        assert not server.served(ECHO), "nobody acknowledges it now"
        new.ack(update, [ECHO.uid])
        until(lambda: server.served(ECHO))
    finally:
        if new is not None:
            new.close()
        old.close()


def test_the_older_tunnel_takes_over_with_a_full_state_when_the_newest_leaves(
        server: ControlServer, tmp_path: Path) -> None:
    server.publish({ECHO.uid: ECHO})
    old = Tunnel(str(tmp_path / "control.sock"))
    try:
        old.next()
        new = Tunnel(str(tmp_path / "control.sock"))
        new.next()
        until(lambda: len(server._streams) == 2)
        server.publish({ECHO.uid: ECHO, WEB.uid: WEB})  # the old tunnel does not hear of WEB...
        assert uids(new.next()) == [WEB.uid]
        new.close()
        # ...so when the newest leaves it gets everything again, as a full state.
        taken = old.next()
        assert taken.full_state and uids(taken) == [ECHO.uid, WEB.uid]
    finally:
        old.close()


def test_each_tunnel_says_its_pod_uid_and_the_newest_comes_last(server: ControlServer, tmp_path: Path) -> None:
    """Where the eBPF capture's hook goes on a real node: the newest tunnel's pod cgroup, by its UID."""
    server.publish({ECHO.uid: ECHO})
    old = Tunnel(str(tmp_path / "control.sock"))
    new: Tunnel | None = None
    try:
        old.ack(old.next(), [ECHO.uid], pod_uid="uid-old")
        until(lambda: server.tunnel_pod_uids() == ["uid-old"])
        new = Tunnel(str(tmp_path / "control.sock"))
        new.ack(new.next(), [ECHO.uid], pod_uid="uid-new")
        until(lambda: server.tunnel_pod_uids() == ["uid-old", "uid-new"])
        new.close()
        until(lambda: server.tunnel_pod_uids() == ["uid-old"])
    finally:
        if new is not None:
            new.close()
        old.close()
