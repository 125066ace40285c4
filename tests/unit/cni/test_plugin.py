"""nodeagent-cni against the CNI spec (1.0/1.1) and a stand-in agent (no root): what a runtime sends, what it
must get back, and that an enrolled pod never starts uncaptured unless the configuration allows it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import conflist, plugin
from tests.support.cni_agent import FakeAgent, fake_agent

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
                {"address": "fd00:10:244:1::7/64", "interface": 0}]}
POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"


def env(command: str, **extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/cni-1",
            "CNI_IFNAME": "eth0", "CNI_ARGS": POD_ARGS, "CNI_PATH": "/opt/cni/bin", **extra}


def config(agent: FakeAgent | None, **fields: Any) -> str:
    doc = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "nodeagent-cni",
           "agentSocket": agent.socket_path if agent else "/nonexistent/cni.sock", "timeoutSeconds": 2,
           "prevResult": PREV, **fields}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def run(stdin: str, environ: dict[str, str]) -> tuple[int, dict[str, Any] | None, str]:
    warn = io.StringIO()
    code, out = plugin.run(stdin, environ, warn)
    return code, out, warn.getvalue()


def test_version_lists_what_it_speaks() -> None:
    code, out, _ = run('{"cniVersion": "1.1.0"}', {"CNI_COMMAND": "VERSION"})
    assert code == 0 and out == {"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                                               "1.1.0"]}


def test_add_tells_the_agent_the_sandbox_and_passes_the_previous_result_through(tmp_path: Path) -> None:
    with fake_agent(tmp_path) as agent:
        code, out, _ = run(config(agent), env("ADD"))
    assert code == 0 and out == {**PREV, "cniVersion": "1.0.0"}
    [(path, body)] = agent.requests
    assert path == "/v1/cni/add"
    assert body == {"containerId": "abc123", "netns": "/var/run/netns/cni-1", "ifname": "eth0",
                    "podNamespace": "demo", "podName": "web-0", "podUid": "u-1",
                    "ips": ["10.244.1.7", "fd00:10:244:1::7"]}


def test_add_waits_for_the_agent_before_answering(tmp_path: Path) -> None:
    """The sandbox's containers start only when ADD returns: it must not return before the agent answers."""
    with fake_agent(tmp_path) as agent:
        agent.hold = threading.Event()
        done: list[int] = []
        thread = threading.Thread(target=lambda: done.append(run(config(agent), env("ADD"))[0]))
        thread.start()
        thread.join(0.5)
        assert not done, "ADD returned before the agent answered"
        agent.hold.set()
        thread.join(5)
    assert done == [0]


@pytest.mark.parametrize(("status", "code"), [(503, plugin.TRY_AGAIN_LATER), (400, plugin.AGENT_REFUSED)])
def test_add_fails_when_the_agent_could_not_capture_the_pod(tmp_path: Path, status: int, code: int) -> None:
    with fake_agent(tmp_path) as agent:
        agent.answers["/v1/cni/add"] = (status, {"reason": "waiting-for-tunnel"})
        result, out, _ = run(config(agent), env("ADD"))
    assert result == 1 and out is not None and out["code"] == code and "demo/web-0" in out["msg"]
    assert out["cniVersion"] == "1.0.0"


def test_an_unreachable_agent_fails_the_sandbox_by_default() -> None:
    code, out, _ = run(config(None), env("ADD"))
    assert code == 1 and out is not None and out["code"] == plugin.TRY_AGAIN_LATER
    assert "uncaptured" in out["msg"]


def test_an_unreachable_agent_lets_the_pod_through_when_configured_and_says_so() -> None:
    code, out, warning = run(config(None, onAgentUnreachable="allow"), env("ADD"))
    assert code == 0 and out == {**PREV, "cniVersion": "1.0.0"}
    assert "demo/web-0" in warning and "allow" in warning


def test_a_slow_agent_is_unreachable_after_the_timeout(tmp_path: Path) -> None:
    with fake_agent(tmp_path) as agent:
        agent.hold = threading.Event()
        code, out, _ = run(config(agent, timeoutSeconds=0.3), env("ADD"))
    assert code == 1 and out is not None and out["code"] == plugin.TRY_AGAIN_LATER


def test_a_sandbox_that_is_no_kubernetes_pod_is_passed_through_without_the_agent() -> None:
    code, out, _ = run(config(None), env("ADD", CNI_ARGS="IgnoreUnknown=1"))
    assert code == 0 and out == {**PREV, "cniVersion": "1.0.0"}


def test_add_needs_a_previous_result_the_plugin_is_chained() -> None:
    code, out, _ = run(config(None, prevResult=None), env("ADD"))
    assert code == 1 and out is not None and out["code"] == plugin.INVALID_CONFIG and "chained" in out["msg"]


def test_del_succeeds_even_when_the_agent_is_gone() -> None:
    assert run(config(None), env("DEL")) == (0, None, "")


def test_del_tells_the_agent(tmp_path: Path) -> None:
    with fake_agent(tmp_path) as agent:
        assert run(config(agent), env("DEL", CNI_NETNS=""))[0] == 0
    assert [path for path, _ in agent.requests] == ["/v1/cni/del"]


def test_check_reports_an_enrolled_pod_that_is_not_captured(tmp_path: Path) -> None:
    with fake_agent(tmp_path) as agent:
        agent.answers["/v1/cni/check"] = (409, {"reason": "waiting-for-tunnel"})
        code, out, _ = run(config(agent), env("CHECK"))
        assert code == 1 and out is not None and "waiting-for-tunnel" in out["msg"]
        agent.answers["/v1/cni/check"] = (200, {"enrolled": True, "captured": True})
        assert run(config(agent), env("CHECK"))[:2] == (0, None)


def test_status_is_the_agents_and_needs_version_1_1(tmp_path: Path) -> None:
    with fake_agent(tmp_path) as agent:
        assert run(config(agent, cniVersion="1.1.0"), env("STATUS"))[:2] == (0, None)
        agent.answers["/v1/cni/status"] = (503, {"reason": "Pods and Namespaces not listed yet"})
        code, out, _ = run(config(agent, cniVersion="1.1.0"), env("STATUS"))
        assert code == 1 and out is not None and out["code"] == plugin.NOT_AVAILABLE
    code, out, _ = run(config(None, cniVersion="1.0.0"), env("STATUS"))
    assert out is not None and out["code"] == plugin.INCOMPATIBLE_VERSION
    code, out, _ = run(config(None, cniVersion="1.1.0"), env("STATUS"))
    assert out is not None and out["code"] == plugin.NOT_AVAILABLE


def test_gc_has_nothing_to_collect() -> None:
    assert run(config(None, cniVersion="1.1.0"), env("GC"))[:2] == (0, None)


@pytest.mark.parametrize(("stdin", "environ", "code", "names"), [
    ("{not json", env("ADD"), plugin.DECODE_FAILURE, "JSON"),
    (json.dumps({"cniVersion": "9.9.9"}), env("ADD"), plugin.INCOMPATIBLE_VERSION, "cniVersion"),
    (config(None, agentSocket="relative.sock"), env("ADD"), plugin.INVALID_CONFIG, "agentSocket"),
    (config(None, timeoutSeconds=0), env("ADD"), plugin.INVALID_CONFIG, "timeoutSeconds"),
    (config(None, timeoutSeconds=True), env("ADD"), plugin.INVALID_CONFIG, "timeoutSeconds"),
    (config(None, onAgentUnreachable="maybe"), env("ADD"), plugin.INVALID_CONFIG, "onAgentUnreachable"),
    (config(None, prevResult=[1]), env("ADD"), plugin.INVALID_CONFIG, "prevResult"),
    (config(None), env("ADD", CNI_NETNS=""), plugin.INVALID_ENV, "CNI_NETNS"),
    (config(None), env("ADD", CNI_ARGS="K8S_POD_NAME"), plugin.INVALID_ENV, "CNI_ARGS"),
    (config(None), env("BOGUS"), plugin.INVALID_ENV, "CNI_COMMAND"),
])
def test_bad_input_is_an_error_naming_the_field(stdin: str, environ: dict[str, str], code: int, names: str) -> None:
    result, out, _ = run(stdin, environ)
    assert result == 1 and out is not None and out["code"] == code
    assert names in out["msg"] + out.get("details", "")


def test_the_plugin_file_runs_on_a_bare_python_with_the_standard_library_only(tmp_path: Path) -> None:
    """The runtime runs it from the CNI bin directory on the node's own Python: no nodeagent, no venv."""
    copied = tmp_path / "nodeagent-cni"
    copied.write_text(Path(plugin.__file__).read_text())
    copied.chmod(0o755)
    done = subprocess.run([sys.executable, "-I", "-S", str(copied)], input='{"cniVersion": "1.0.0"}',
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supportedVersions"][-1] == "1.1.0"
    assert "import nodeagent" not in copied.read_text() and "from nodeagent" not in copied.read_text()


def test_the_installer_and_the_plugin_agree_on_the_plugins_name_and_versions() -> None:
    assert (conflist.PLUGIN_TYPE, conflist.SUPPORTED_VERSIONS) == (plugin.PLUGIN_TYPE, plugin.SUPPORTED_VERSIONS)
