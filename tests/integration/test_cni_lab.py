"""nodeagent-cni in the lab, in both capture modes: a pod created after the lab is up, the way a runtime
creates one (its sandbox, then the CNI chain: the lab's bridge step, then the real plugin file as a process,
then the pod's process), has its very first connection captured; with node1's agent down the sandbox fails
(the pod's process never starts) unless the plugin is configured to let it through.

The pod's IP never reaches the API server (the lab has no kubelet to publish it): without the plugin's
announcement the agent would never capture this pod at all, so the capture seen here is the plugin's doing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from nodeagent.lab import lab as labs
from nodeagent.lab import sandbox
from nodeagent.lab.agents import AGENT_OWNER, agent_argv, mesh_agent_args, spawn_owned
from nodeagent.lab.state import locked
from tests.integration.conftest import wait_for
from tests.support.agent_labs import agent_healthz, lab_with_agents, owner_process
from tests.support.tunnel import metrics, sample

pytestmark = pytest.mark.root

# The pod's process: one connection at once, its answer (or error) on stdout, then it idles.
FIRST = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"first\n")
        print(json.dumps({"ok": True, "answer": json.loads(s.makefile("rb").readline())}), flush=True)
except (OSError, ValueError) as exc:
    print(json.dumps({"ok": False, "error": repr(exc)}), flush=True)
time.sleep(3600)
"""


def cni_socket(lab: labs.Lab) -> str:
    return str(lab.record.directory / "cni.node1.sock")


def node1_agent_with_cni(lab: labs.Lab, mode: str) -> None:
    """Restart node1's agent serving nodeagent-cni (the DaemonSet's agent passes --cni-socket)."""
    agent = owner_process(lab, AGENT_OWNER + "node1")
    os.kill(agent.pid, signal.SIGTERM)
    wait_for(lambda: not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE, "the agent stopped")
    with locked(lab.record.name):
        spawn_owned(labs.load(lab.record.name), "node1", AGENT_OWNER, "nodeagent",
                    agent_argv(lab, "node1", mode, [*mesh_agent_args(lab, "node1"), "--cni-socket", cni_socket(lab)]),
                    None)
    wait_for(lambda: agent_healthz(lab, "node1")[0] == 200, "node1's agent synced", timeout=90)
    wait_for(lambda: os.path.exists(cni_socket(lab)), "the CNI socket", timeout=30)


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[labs.Lab]:
    mode = str(request.param)
    with lab_with_agents(tmp_path_factory.mktemp("cni"), "", mode, mesh=True) as lab:
        node1_agent_with_cni(lab, mode)
        yield lab


def create_pod_object(lab: labs.Lab, name: str) -> str:
    """The Pod in the API server (bound to node1, in the enrolled namespace demo); its UID."""
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "demo"},
                "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "lab"}]}}
    path = lab.record.directory / f"{name}.json"
    path.write_text(json.dumps(manifest))
    # kubectl runs in the API server's namespace: the file is read there, from the same filesystem
    done = labs.kubectl(lab.record.name, ["create", "-f", str(path), "-o", "json"], capture=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["metadata"].get("uid", ""))


def first_answer(lab: labs.Lab, pod: str) -> dict[str, object]:
    log = lab.record.directory / "logs" / f"demo.{pod}.sandbox.log"
    found: list[dict[str, object]] = []

    def answered() -> bool:
        lines = [line for line in (log.read_text().splitlines() if log.exists() else []) if line.startswith("{")]
        found[:] = [json.loads(lines[0])] if lines else []
        return bool(found)

    wait_for(answered, f"{pod}'s first connection", timeout=30)
    return found[0]


def test_an_enrolled_pods_very_first_connection_is_captured(lab: labs.Lab) -> None:
    uid = create_pod_object(lab, "cni-first")
    before = sample(metrics(lab, "node1"), "istio_tcp_connections_opened_total", reporter="source")
    started = time.monotonic()
    plan, outcome = sandbox.create(lab, "demo", "cni-first", "node1", {"agentSocket": cni_socket(lab),
                                                                        "timeoutSeconds": 60}, uid)
    assert outcome.ok, (outcome.result, outcome.stderr)
    assert outcome.result["ips"] == [{"address": f"{plan.pod.ip}/32", "gateway": outcome.result["ips"][0]["gateway"],
                                      "interface": 0}], "prevResult passed through"
    took = time.monotonic() - started
    # The runtime starts the pod's process only now; it connects at once.
    sandbox.start(lab, plan, ["python3", "-c", FIRST, str(lab.plan.pod("demo/echo-1").pod.ip), "8080"])
    answer = first_answer(lab, "cni-first")
    assert answer["ok"], answer
    after = sample(metrics(lab, "node1"), "istio_tcp_connections_opened_total", reporter="source")
    assert after == before + 1, "the pod's first connection went through node1's tunnel"
    assert took < 30, took


def test_with_the_agent_down_the_sandbox_fails_unless_configured_to_start_anyway(lab: labs.Lab) -> None:
    agent = owner_process(lab, AGENT_OWNER + "node1")
    mode = next(agent.cmdline()[i + 1] for i, arg in enumerate(agent.cmdline()) if arg == "--mode")
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE, "the agent gone")
    try:
        uid = create_pod_object(lab, "cni-closed")
        _, outcome = sandbox.create(lab, "demo", "cni-closed", "node1", {"agentSocket": cni_socket(lab),
                                                                          "timeoutSeconds": 3}, uid)
        assert not outcome.ok and outcome.result["code"] == 11, outcome.result  # try again later
        assert "uncaptured" in str(outcome.result["msg"])
        uid = create_pod_object(lab, "cni-open")
        _, outcome = sandbox.create(lab, "demo", "cni-open", "node1", {
            "agentSocket": cni_socket(lab), "timeoutSeconds": 3, "onAgentUnreachable": "allow"}, uid)
        assert outcome.ok and "cni-open" in outcome.stderr and "allow" in outcome.stderr
    finally:
        with locked(lab.record.name):
            spawn_owned(labs.load(lab.record.name), "node1", AGENT_OWNER, "nodeagent",
                        agent_argv(lab, "node1", mode, [*mesh_agent_args(lab, "node1"), "--cni-socket",
                                                        cni_socket(lab)]), None)
        wait_for(lambda: agent_healthz(lab, "node1")[0] == 200, "node1's agent back", timeout=90)
