"""The README's two commands, as a new user runs them: from a fresh clone, and on this checkout.

The fresh-clone test clones the committed HEAD, runs setup there (a new .venv), and runs the demo
from the clone, so an install step that only exists on this machine's checkout shows up here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import leftovers, unique_lab_name

pytestmark = [pytest.mark.root, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env)


def assert_demo_output(output: str, lab: str) -> None:
    # The request crosses nodes: the client on node1 is answered by the server pod on node2.
    assert re.search(r"demo/client \(node1\) -> 10\.244\.2\.\d+:8080/TCP \[other node\]: answered by demo/echo-1 "
                     r"on node2, which saw peer 10\.244\.1\.\d+:\d+", output), output
    # Through the Service VIP with the mesh: captured, carried by both tunnels, the server sees the client.
    assert re.search(r"demo/client -> ClusterIP 10\.\d+\.\d+\.\d+:80 x8: answered by .*, which saw peer "
                     r"10\.244\.1\.2 \(TCP: captured", output), output
    counted = re.search(r"the tunnel on node1 counted (\d+) mTLS connections to demo/echo", output)
    assert counted and int(counted.group(1)) >= 8, output
    # The cluster as kubectl sees it through the lab API server, then one live kubectl change moving traffic.
    assert re.search(r"^\s+NAMESPACE\s+NAME\s+TYPE\s+CLUSTER-IP", output, re.M), output
    assert re.search(r"^\s+demo\s+pod/echo-1\s+1/1\s+Running", output, re.M), output
    assert "service/echo annotated" in output, output
    assert re.search(r"after: demo/client -> ClusterIP [\d.]+:80 x10: answered by demo/echo-0 10x \(the kubectl "
                     r"change took effect within [\d.]+ s", output), output
    assert f"lab '{lab}' removed" in output


def test_demo_command_shows_a_request_answered_on_the_other_node() -> None:
    lab = unique_lab_name()
    result = run(["bash", "scripts/demo.sh", "--lab", lab], ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_demo_output(result.stdout, lab)
    assert leftovers(lab, []) == []


@pytest.mark.timeout(900)  # a new environment is installed first (about 2 min on an idle machine)
def test_fresh_clone_sets_itself_up_and_runs_the_demo(tmp_path: Path) -> None:
    head = run(["git", "rev-parse", "HEAD"], ROOT, timeout=30)
    if head.returncode != 0:
        pytest.fail("the fresh-clone test needs a git checkout with a commit")
    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", str(ROOT), str(clone)], tmp_path, timeout=120).returncode == 0
    check = run(["bash", "scripts/setup.sh", "--check"], clone, timeout=60)
    assert check.returncode == 1 and "venv" in check.stderr, "a fresh clone has no environment yet"
    lab = unique_lab_name()
    result = run(["bash", "scripts/demo.sh", "--lab", lab], clone, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing nodeagent" in result.stderr
    assert_demo_output(result.stdout, lab)
    assert run(["bash", "scripts/setup.sh", "--check"], clone, timeout=60).returncode == 0, "setup is idempotent"
    assert leftovers(lab, []) == []
