"""The control socket's Inspect RPC: the agent's state as one JSON document (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.control.server import ControlServer
from nodeagent.inspect.agent_client import AgentUnreachable, query_agent


def test_inspect_answers_the_agents_state_and_the_control_view(tmp_path: Path) -> None:
    server = ControlServer("node1")
    asked: list[str] = []

    def status(pod: str) -> dict[str, object]:
        asked.append(pod)
        return {"mode": "iptables", "mesh_states": {"demo/client": "captured"}}

    server.inspect_status = status
    socket_path = str(tmp_path / "control.sock")
    server.start(socket_path)
    try:
        document = query_agent(socket_path, "demo/client")
    finally:
        server.stop()
    assert asked == ["demo/client"]
    assert document["mode"] == "iptables"
    assert document["mesh_states"] == {"demo/client": "captured"}
    assert document["control"]["node"] == "node1"
    assert document["control"]["tunnel_connected"] is False


def test_inspect_without_a_status_source_still_answers(tmp_path: Path) -> None:
    server = ControlServer("node1")
    socket_path = str(tmp_path / "control.sock")
    server.start(socket_path)
    try:
        document = query_agent(socket_path)
    finally:
        server.stop()
    assert document["control"]["agent_run"] == server.run


def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable, match=r"no agent answers on .*control\.sock"):
        query_agent(str(tmp_path / "control.sock"), timeout=1)
