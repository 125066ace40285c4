"""A rollout of node1's tunnel in the lab, under load, in both capture modes: the new tunnel starts beside
the old one (SO_REUSEPORT in every pod), the old one gets SIGTERM and drains (listeners closed at once,
GOAWAY to its HBONE peers, open connections given the drain deadline), and no connection of a loop running
throughout fails. A connection that finishes within the deadline is untouched; one still open at the
deadline is closed and counted. This is how the tunnel DaemonSet rolls (maxSurge 1, maxUnavailable 0),
as ztunnel's does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from nodeagent.kernel.netns import run_in
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import TUNNEL_OWNER, spawn_owned, tunnel_argv
from nodeagent.lab.state import locked
from tests.integration.conftest import wait_for
from tests.support.agent_labs import lab_with_agents, owner_process
from tests.support.mesh_loops import Held, connection_loop

pytestmark = pytest.mark.root
NEXT_OWNER = "ztunnel-next/"  # the rollout's new tunnel (recorded, so `lab down` stops it too)
DRAIN = 5.0  # the tunnels' --drain-deadline (the default)


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("rollout"), "", str(request.param), mesh=True) as lab:
        yield lab


def ip_of(lab: labs.Lab, pod: str) -> str:
    return str(lab.plan.pod(pod).pod.ip)


def next_tunnel_argv(lab: labs.Lab, node: str) -> list[str]:
    """The same tunnel again, with its node-level ports moved: in a cluster each tunnel pod has its own
    network namespace for those (the DaemonSet's pods are not hostNetwork); lab tunnels share the node's."""
    argv = tunnel_argv(lab, node)
    address = lab.plan.node(node).node.address
    moved = {"--readiness-address": f"{address}:15121", "--metrics-address": f"{address}:15120"}
    for index, flag in enumerate(argv[:-1]):
        if flag in moved:
            argv[index + 1] = moved[flag]
    return [*argv, "--admin-address", "127.0.0.1:15100"]


def readiness(lab: labs.Lab, node: str, port: int) -> bool:
    address = lab.plan.node(node).node.address
    script = ("import json,sys,urllib.request\n"
              "try: print(json.loads(urllib.request.urlopen(sys.argv[1],timeout=2).read()).get('ready'))\n"
              "except Exception: print(False)")
    done = run_in(lab.plan.node(node).netns, ["python3", "-c", script, f"http://{address}:{port}/healthz/ready"])
    return done.stdout.strip() == "True"


def tunnel_log_tail(lab: labs.Lab, lines: int = 40) -> str:
    """The last warnings and errors of both node1 tunnels (what a failed rollout is read from)."""
    out = []
    for name in ("ztunnel.node1.log", "ztunnel-next.node1.log"):
        path = lab.record.directory / "logs" / name
        text = path.read_text().splitlines() if path.exists() else []
        out += [f"{name}: {line[:300]}" for line in text if '"warning"' in line or '"error"' in line
                or "drain" in line][-lines:]
    return "\n".join(out)


def test_a_rollout_under_a_connection_loop_fails_no_connection(lab: labs.Lab) -> None:
    old = owner_process(lab, TUNNEL_OWNER + "node1")
    # Connections: to a pod on the same node (node1's tunnel on both ends) and across to node2.
    loops = [connection_loop(lab, "demo/client", f"{ip_of(lab, pod)}:8080", 16.0)
             for pod in ("demo/echo-0", "demo/echo-1")]
    finishes = Held(lab, "demo/client", ip_of(lab, "demo/echo-1"), 8080)
    lingers = Held(lab, "demo/client", ip_of(lab, "demo/echo-0"), 8080)
    started_next = False
    try:
        assert json.loads(finishes.exchange("before"))["echo"] == "before"
        assert json.loads(lingers.exchange("before"))["echo"] == "before"
        time.sleep(1.0)  # a workload pause: the loops run before the rollout starts
        with locked(lab.record.name):
            spawn_owned(labs.load(lab.record.name), "node1", NEXT_OWNER, "ztunnel", next_tunnel_argv(lab, "node1"),
                        None)
        started_next = True
        wait_for(lambda: readiness(lab, "node1", 15121), "the new tunnel ready beside the old one", timeout=60)
        # The DaemonSet controller deletes the old pod once the new one is ready: the kubelet's SIGTERM.
        os.kill(old.pid, signal.SIGTERM)
        termed = time.monotonic()
        wait_for(lambda: not readiness(lab, "node1", 15021), "the old tunnel stops answering readiness",
                 timeout=5)
        # Within the deadline the held connection still works, through the old (draining) tunnel.
        assert json.loads(finishes.exchange("during"))["echo"] == "during"
        finishes.close()
        wait_for(lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE, "the old tunnel exits",
                 timeout=DRAIN + 15)
        exited = time.monotonic() - termed
        # The connection still open at the deadline was closed then (not left hanging, not cut at once).
        assert lingers.exchange("after") == "", "the lingering connection was closed at the deadline"
        for thread, _ in loops:
            thread.join()
    finally:
        finishes.close()
        lingers.close()
    for _, results in loops:
        assert results and all(ok for _, ok, _ in results), (
            [r for r in results if not r[1]], termed, tunnel_log_tail(lab))
        assert any(started > termed + 0.5 for started, _, _ in results), "the loop outlasted the SIGTERM"
    assert DRAIN - 0.5 <= exited <= DRAIN + 10, exited
    log = (lab.record.directory / "logs" / "ztunnel.node1.log").read_text()
    drained = [json.loads(line) for line in log.splitlines() if '"tunnel drained"' in line][-1]
    assert drained["closed_at_deadline"] >= 1 and drained["finished"] >= 1, drained
    assert started_next
