"""Ordering and faults end to end on the lab's Kubernetes API, in both datapath modes with
the mesh on: kinds delivered in adversarial orders to a restarting agent, a 30 s API outage, a 410 storm,
an agent and a tunnel restarted under load. Traffic runs across every fault; the expectations are those of
the issue: no loss for Services whose endpoints did not change, no fail-open, convergence within one sync
period once the API is back, and an agent `/healthz` that never claims a sync it has not made.

One lab per mode (module scope); each case leaves the lab as it found it (faults cleared, agents and
tunnels running, annotations and policies removed). The storm runs before the outage on purpose: an outage
leaves every reflector's backoff near its 30 s cap for two minutes (client-go's rule), so a storm just after
it measures that backoff, not the relist.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from nodeagent.cli import run as run_command
from nodeagent.cluster.model import MESH_GROUP
from nodeagent.kernel.netns import in_netns
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import (
    AGENT_OWNER,
    TUNNEL_OWNER,
    agent_argv,
    captured,
    mesh_agent_args,
    spawn_owned,
    tunnel_argv,
)
from nodeagent.lab.demo import requests_from
from nodeagent.lab.state import locked
from tests.integration.conftest import wait_for
from tests.support.agent_labs import OUTSIDER, agent_healthz, api_fault, api_state, lab_with_agents, owner_process
from tests.support.tunnel import admin_dump, metrics, sample

pytestmark = pytest.mark.root

# A pod outside the mesh (its Service traffic goes through the agent's datapath, not a tunnel) and an enrolled
# pod under its own identity, which the DENY policy of the storm case names.
EXTRA = OUTSIDER + """
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: demo, labels: {app: intruder}}
spec:
  nodeName: node1
  serviceAccountName: intruder
  containers:
  - {name: sleep, command: [nodeagent, workload, idle]}
"""
# The lab's API server serves the policy kinds in the agent's group (where the agents and tunnels read them).
DENY_INTRUDER = {"apiVersion": f"{MESH_GROUP}/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "deny-intruder", "namespace": "demo"},
                 "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                          "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/intruder"]}}]}]}}
WEIGHTS = "nodeagent.io/endpoint-weights"

# Connections from inside a pod, one every `gap` seconds for `seconds` or until the file `stop` exists:
# [started, ok, answering pod or error].
LOOP = r"""
import json, os, socket, sys, time
target, seconds, gap, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
host, port = target.rsplit(":", 1)
out, end = [], time.monotonic() + seconds
while time.monotonic() < end and not os.path.exists(stop):
    started = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            s.sendall(b"loop\n")
            answer = json.loads(s.makefile("rb").readline())
        out.append([time.time(), True, answer["pod"]])
    except (OSError, ValueError, KeyError) as exc:
        out.append([time.time(), False, type(exc).__name__])
    time.sleep(gap)
print(json.dumps(out))
"""


class Loop:
    """A connection loop run by a process in `pod` against `target` (ip:port) on a thread; `results()` joins it.
    Times are wall-clock (time.time()), so they compare with the tests' own stamps and the agents'."""

    def __init__(self, lab: labs.Lab, pod: str, target: str, seconds: float, gap: float = 0.1) -> None:
        self.pod, self.target = pod, target
        self.out: list[list[Any]] = []
        self.error = ""
        plan = lab.plan.pod(pod)
        self.stop_file = Path(lab.record.directory) / f"loop-stop-{uuid.uuid4().hex}"  # this loop's alone
        argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                    ["python3", "-c", LOOP, target, str(seconds), str(gap), str(self.stop_file)])

        def run() -> None:
            result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True,
                                    timeout=seconds + 60, check=False)
            try:
                self.out.extend(json.loads(result.stdout))
            except ValueError:
                self.error = f"exit {result.returncode}: {result.stderr[-800:]}"

        self.thread = threading.Thread(target=run, name=f"loop-{pod}-{target}")
        self.thread.start()

    def stop(self) -> None:
        """End the loop after its current connection (before its `seconds` are up)."""
        self.stop_file.touch()

    def results(self) -> list[list[Any]]:
        self.thread.join()
        assert self.out, f"the loop {self.pod} -> {self.target} ran no connection: {self.error}"
        return self.out

    def failures(self) -> list[list[Any]]:
        return [r for r in self.results() if not r[1]]


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp(f"faults-{mode}"), EXTRA, mode, mesh=True) as lab:
        yield lab


@pytest.fixture(autouse=True)
def no_faults_left(lab: labs.Lab) -> Iterator[None]:
    yield
    api_fault(lab, "delay", {"seconds": 0})


def ip_of(lab: labs.Lab, pod: str) -> str:
    return str(lab.plan.pod(pod).pod.ip)


def vip(lab: labs.Lab) -> str:
    return f"{lab.cluster_ip('echo')}:80"


def sync_period(lab: labs.Lab, mode: str, node: str) -> float:
    """The agents' --sync-period: as agent_argv passes it, else `nodeagent run`'s default."""
    argv = agent_argv(lab, node, mode)
    if "--sync-period" in argv:
        return float(argv[argv.index("--sync-period") + 1])
    default = next(p.default for p in run_command.params if p.name == "sync_period")
    assert isinstance(default, float)
    return default


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def synced_at(healthz: dict[str, Any]) -> str:
    """When the agent's datapath last synced, from its /healthz body ("" before its first sync): kube-proxy's
    per-family `status` (its top-level `lastUpdated` is the current time whenever the answer is 200)."""
    last: str = healthz.get("status", {}).get("IPv4", {}).get("lastUpdated", "")
    return last


def kill(lab: labs.Lab, owner: str) -> None:
    process = owner_process(lab, owner)
    os.kill(process.pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(process.pid) or process.status() == psutil.STATUS_ZOMBIE, f"{owner} gone")


def start_agent(lab: labs.Lab, node: str, mode: str) -> None:
    with locked(lab.record.name):
        spawn_owned(labs.load(lab.record.name), node, AGENT_OWNER, "nodeagent",
                    agent_argv(lab, node, mode, mesh_agent_args(lab, node)), None)


def start_tunnel(lab: labs.Lab, node: str) -> None:
    with locked(lab.record.name):
        spawn_owned(labs.load(lab.record.name), node, TUNNEL_OWNER, "ztunnel", tunnel_argv(lab, node), None)


def tunnel_ready(lab: labs.Lab, node: str) -> bool:
    address = lab.plan.node(node).node.address
    out = subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, "python3", "-c",
                          "import sys,urllib.request,urllib.error\n"
                          "try: print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())\n"
                          "except urllib.error.HTTPError as e: print(e.read().decode())\n"
                          "except OSError: print('{}')", f"http://{address}:15021/healthz/ready"],
                         capture_output=True, text=True, check=False, timeout=20).stdout
    try:
        return json.loads(out).get("ready") is True
    except ValueError:
        return False


def api_listening(lab: labs.Lab) -> bool:
    """Whether the lab's API server accepts connections (a TCP connect from its own namespace)."""
    netns = f"/run/netns/{labs.api_server_plan(lab.plan, lab.topology).netns}"
    sock = in_netns(netns, socket.socket)
    try:
        sock.settimeout(1)
        sock.connect((str(lab.topology.api_server_address), 6443))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def relists(lab: labs.Lab) -> int:
    """How many relists after a 410 the agents and tunnels have logged so far."""
    logs = Path(lab.record.directory) / "logs"
    return sum(path.read_text(errors="replace").count("resource version expired, relisting")
               for path in logs.glob("*.log") if path.name.startswith(("agent.", "ztunnel.")))


class HealthSamples:
    """Polls `node`'s agent /healthz on a thread until stopped: (wall time, status, body)."""

    def __init__(self, lab: labs.Lab, node: str) -> None:
        self.samples: list[tuple[float, int, dict[str, Any]]] = []
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                asked = time.time()
                status, body = agent_healthz(lab, node)
                self.samples.append((asked, status, body))
                self._stop.wait(0.1)  # polling period

        self.thread = threading.Thread(target=run, name=f"healthz-{node}")
        self.thread.start()

    def stop(self) -> list[tuple[float, int, dict[str, Any]]]:
        self._stop.set()
        self.thread.join()
        return self.samples


def test_agent_restarted_into_adversarial_orders_loses_nothing_and_healthz_claims_no_sync_early(
        lab: labs.Lab, mode: str) -> None:
    """node1's agent is killed and restarted while the API server hands it, in one run, Pods before their
    Namespaces, EndpointSlices before their Services, Nodes late and the policy kinds last. Connections from
    an enrolled client (to the echo VIP and to echo-1) and from a pod outside the mesh (to the VIP, through
    the agent's own datapath) run across: none fails, since no endpoint changed. /healthz of the new run
    answers throughout: healthy within its grace period, no synced family before the first sync (it has made
    none) and the start's change queued; the first sync it reports is no earlier than the Services' list."""
    held = {"pods": 1.0, "namespaces": 2.5, "endpointslices": 0.0, "services": 2.5, "nodes": 3.5,
            "authorizationpolicies": 4.5, "peerauthentications": 4.5}  # seconds each kind is held
    run_before = admin_dump(lab, "node1")["control"]["agent_run"]
    # The loops run until the restart has settled (stopped then), bounded at 90 s: a fixed length would end
    # them before a slow restart does.
    loops = [Loop(lab, "demo/client", vip(lab), 90.0), Loop(lab, "demo/client", f"{ip_of(lab, 'demo/echo-1')}:8080",
                                                            90.0),
             Loop(lab, "plain/outsider", vip(lab), 90.0)]
    time.sleep(1.0)  # let the loops run before the kill (a workload pause, not a readiness wait)
    kill(lab, AGENT_OWNER + "node1")
    for plural, seconds in held.items():
        if seconds:
            api_fault(lab, "delay", {"seconds": seconds, "count": 2, "plural": plural})
    health = HealthSamples(lab, "node1")
    spawned = time.time()
    try:
        start_agent(lab, "node1", mode)
        wait_for(lambda: admin_dump(lab, "node1")["control"]["agent_run"] not in ("", run_before),
                 "the tunnel follows the new agent run", timeout=30)
        wait_for(lambda: bool(synced_at(agent_healthz(lab, "node1")[1])), "the new run's first sync",
                 timeout=30)
        # Until every held kind has been served (the policies last) and the run has settled.
        wait_for(lambda: time.time() > spawned + held["peerauthentications"] + 1
                 and agent_healthz(lab, "node1")[1].get("oldestQueued") == "", "the run settles", timeout=30)
        outlasted = all(loop.thread.is_alive() for loop in loops)
        time.sleep(2.0)  # traffic a moment past the settled restart (a workload pause, not a readiness wait)
    finally:
        samples = health.stop()
        for loop in loops:
            loop.stop()
    assert outlasted, "the loops must outlast the restart to prove anything"
    for loop in loops:
        assert loop.failures() == [], (loop.pod, loop.target, loop.failures())
    assert {p for _, _, p in loops[0].results()} == {"demo/echo-0", "demo/echo-1"}
    assert {p for _, _, p in loops[2].results()} == {"demo/echo-0", "demo/echo-1"}
    answered = [(t, status, body) for t, status, body in samples if status]
    before_sync = [(t, status, body) for t, status, body in answered if not synced_at(body)]
    assert before_sync, f"the new run answered /healthz before its first sync: {samples[:5]}"
    for t, status, body in before_sync:
        assert status == 200 and body["oldestQueued"], (t, status, body)  # within grace, the start's change waits
    first = min(stamp(synced_at(body)) for _, _, body in answered if synced_at(body))
    assert first >= spawned + held["services"], "a sync reported before the Services were listed"
    # The synced run tells the truth: healthy, its last sync stamped, nothing left waiting.
    status, body = agent_healthz(lab, "node1")
    assert status == 200 and synced_at(body) and body["oldestQueued"] == "", body
    assert captured(lab, "demo/client") and captured(lab, "demo/intruder")
    served = {p["ip"] for p in admin_dump(lab, "node1")["pods"]}
    assert {ip_of(lab, "demo/client"), ip_of(lab, "demo/echo-0"), ip_of(lab, "demo/intruder")} <= served, served


def test_a_410_storm_loses_no_traffic_and_a_deny_policy_keeps_denying(lab: labs.Lab) -> None:
    """A DENY AuthorizationPolicy made with kubectl (echo refuses demo/intruder), then a 410 storm: every watch
    expired, and (after a write no one watches) history compacted under dropped watches so that each resume
    meets 410, twice each. The agents
    and tunnels relist every time; the client's connections to the echo VIP all succeed, the intruder's to
    either echo pod all fail, each one denied by policy at the serving tunnel (never fail-open)."""
    path = Path(lab.record.directory) / "deny-intruder.json"
    path.write_text(json.dumps(DENY_INTRUDER))
    echo0, echo1 = f"{ip_of(lab, 'demo/echo-0')}:8080", f"{ip_of(lab, 'demo/echo-1')}:8080"
    created = labs.kubectl(lab.record.name, ["create", "-f", str(path)], capture=True, timeout=20)
    assert created.returncode == 0, created.stderr
    try:
        for node, target in (("node2", echo1), ("node1", echo0)):
            before = sample(metrics(lab, node), "nodeagent_tunnel_policy_denials_total")
            wait_for(lambda node=node, target=target, before=before:  # type: ignore[misc]
                     bool(Loop(lab, "demo/intruder", target, 0.1).failures())
                     and sample(metrics(lab, node), "nodeagent_tunnel_policy_denials_total") > before,
                     f"the policy is in force on {node}", timeout=20)
        denials = {node: sample(metrics(lab, node), "nodeagent_tunnel_policy_denials_total")
                   for node in ("node1", "node2")}
        watches = api_state(lab)["openWatches"]
        loops = [Loop(lab, "demo/client", vip(lab), 12.0), Loop(lab, "demo/intruder", echo1, 12.0, gap=0.2),
                 Loop(lab, "demo/intruder", echo0, 12.0, gap=0.2)]
        time.sleep(0.5)  # a workload pause before the storm
        for round_ in range(4):
            seen = relists(lab)
            if round_ % 2 == 0:
                api_fault(lab, "expire-watches")
            else:  # a write nobody watches, then compaction: every client's version is too old to resume from
                made = labs.kubectl(lab.record.name, ["create", "configmap", f"storm-{round_}", "-n", "plain"],
                                    capture=True, timeout=20)
                assert made.returncode == 0, made.stderr
                api_fault(lab, "compact")
                api_fault(lab, "drop-watches")
            wait_for(lambda seen=seen: relists(lab) > seen  # type: ignore[misc]
                     and api_state(lab)["openWatches"] >= watches,
                     f"everyone relisted and watches again (round {round_ + 1})", timeout=30)
        assert all(loop.thread.is_alive() for loop in loops), "the loops must outlast the storm"
        client, to_echo1, to_echo0 = (loop.results() for loop in loops)
        assert [r for r in client if not r[1]] == [], "the client lost connections in the storm"
        assert {p for _, _, p in client} == {"demo/echo-0", "demo/echo-1"}
        assert [r for r in to_echo1 + to_echo0 if r[1]] == [], "fail-open: the intruder got through"
        # Every refusal was the serving tunnel's policy decision, not some other breakage.
        assert sample(metrics(lab, "node2"), "nodeagent_tunnel_policy_denials_total") - denials["node2"] \
            >= len(to_echo1)
        assert sample(metrics(lab, "node1"), "nodeagent_tunnel_policy_denials_total") - denials["node1"] \
            >= len(to_echo0)
    finally:
        labs.kubectl(lab.record.name, ["delete", "-f", str(path)], capture=True, timeout=20)
        labs.kubectl(lab.record.name, ["delete", "configmap", "-n", "plain", "--ignore-not-found", "storm-1",
                                       "storm-3"], capture=True, timeout=20)
    wait_for(lambda: not Loop(lab, "demo/intruder", echo1, 0.1).failures(), "the intruder admitted again")


def test_a_30s_api_outage_loses_no_traffic_healthz_stays_truthful_and_a_change_after_converges(
        lab: labs.Lab, mode: str) -> None:
    """The API server goes away for 30 s (restart on the same port) while connections run through the mesh and
    through the agent's datapath: none fails. Meanwhile both agents report healthy with nothing queued (no
    change can reach them). Once it is back, a canary weight set with kubectl (echo-1 weight 0) moves the mesh's
    traffic to echo-0 and node1's agent reports a sync after the change, both within one sync period."""
    period = sync_period(lab, mode, "node1")
    loops = [Loop(lab, "demo/client", vip(lab), 36.0), Loop(lab, "plain/outsider", vip(lab), 36.0)]
    time.sleep(1.0)  # a workload pause before the fault
    api_fault(lab, "restart", {"downSeconds": 30})
    wait_for(lambda: not api_listening(lab), "the API server is down")
    during: list[tuple[str, int, dict[str, Any]]] = []
    while not api_listening(lab):
        for node in ("node1", "node2"):
            during.append((node, *agent_healthz(lab, node)))
        assert len(during) < 400, "the API server did not come back"
        time.sleep(0.5)  # the polling period of the outage's samples
    back = time.time()
    assert len(during) >= 10, "sampled /healthz during the outage"
    for node, status, body in during:
        assert status == 200 and synced_at(body) and body["oldestQueued"] == "", (node, status, body)
    changed = 0.0
    try:
        deadline = time.monotonic() + 20
        while labs.kubectl(lab.record.name, ["annotate", "svc", "echo", "-n", "demo", "--overwrite",
                                             f'{WEIGHTS}={{"echo-0": 100, "echo-1": 0}}'],
                           capture=True, timeout=20).returncode != 0:
            assert time.monotonic() < deadline, f"no kubectl annotate {time.time() - back:.0f} s after the API's return"
            time.sleep(0.2)  # polling a condition with a deadline
        changed = time.time()
        took = wait_for(lambda: set(requests_from(lab, "demo/client", vip(lab), 6)) == {"demo/echo-0"},
                        "the mesh follows the canary weight", timeout=period)
        wait_for(lambda: stamp(synced_at(agent_healthz(lab, "node1")[1]) or "1970-01-01T00:00:00+00:00")
                 > changed, "node1's agent synced the change", timeout=max(1.0, period - took))
        for loop in loops:
            assert loop.failures() == [], (loop.pod, loop.target, loop.failures())
    finally:
        labs.kubectl(lab.record.name, ["annotate", "svc", "echo", "-n", "demo", f"{WEIGHTS}-"], capture=True,
                     timeout=20)
        for loop in loops:
            loop.thread.join()
    wait_for(lambda: set(requests_from(lab, "demo/client", vip(lab), 8)) == {"demo/echo-0", "demo/echo-1"},
             "both backends again", timeout=period)


def test_agent_and_tunnel_restarted_under_load_fail_closed_and_recover_within_the_bound(
        lab: labs.Lab, mode: str) -> None:
    """node2's agent and tunnel are killed together and restarted (on the API source, as the DaemonSets would be)
    while connections run: echo-1's capture stays, so connections to it fail while its tunnel is down (fail
    closed, never around the mesh) and all succeed from 10 s after the kill (the documented bound). Connections
    that never touch node2 (client to echo-0) lose nothing; node2's agent reports its new run's sync."""
    to_echo1 = Loop(lab, "demo/client", f"{ip_of(lab, 'demo/echo-1')}:8080", 15.0)
    to_echo0 = Loop(lab, "demo/client", f"{ip_of(lab, 'demo/echo-0')}:8080", 15.0)
    time.sleep(1.0)  # a workload pause
    killed = time.time()
    kill(lab, TUNNEL_OWNER + "node2")
    kill(lab, AGENT_OWNER + "node2")
    assert captured(lab, "demo/echo-1"), "the capture stays while the agent and the tunnel are away"
    start_agent(lab, "node2", mode)
    start_tunnel(lab, "node2")
    results = to_echo1.results()
    failures = [started for started, ok, _ in results if not ok]
    after = [ok for started, ok, _ in results if started > killed + 10.0]
    assert failures, "connections failed while the tunnel was down (fail closed)"
    assert after and all(after), f"every connection 10 s after the kill succeeded: {results}"
    assert {p for _, ok, p in results if ok} == {"demo/echo-1"}
    assert to_echo0.failures() == []
    wait_for(lambda: tunnel_ready(lab, "node2"), "node2's tunnel ready")
    status, body = agent_healthz(lab, "node2")
    assert status == 200 and stamp(synced_at(body)) > killed, body
    assert captured(lab, "demo/echo-1")
