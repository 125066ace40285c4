"""`nodeagent inspect` against a real lab, in both modes: an enrolled and a non-enrolled pod, the
capture shown as the kernel holds it (checked against iptables-save / bpftool read here independently), a rule
deleted by hand flagged as drift while the agent is stopped (and read from the kernel alone, said so), and the
JSON valid against the documented schema. One lab per mode (module-scoped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from nodeagent.lab import cgroups
from nodeagent.lab import lab as labs
from tests.integration.conftest import wait_for
from tests.support.agent_labs import OUTSIDER, lab_with_agents

pytestmark = pytest.mark.root
NODEAGENT = str(Path(sys.executable).with_name("nodeagent"))

EXTRA = OUTSIDER + """
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: demo}
spec:
  selector: {app: nobody}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: demo, labels: {app: guarded}}
spec:
  nodeName: node2
  containers:
  - name: echo
    command: [nodeagent, workload, serve, --port, "8080"]
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: demo}
spec:
  selector: {app: guarded}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: guarded}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
"""


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("inspect"), EXTRA, mode, mesh=True) as lab:
        yield lab


def inspect(lab: labs.Lab, pod: str, *args: str) -> tuple[int, str]:
    result = subprocess.run([NODEAGENT, "inspect", "--lab", lab.record.name, "--pod", pod, *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout + result.stderr


def report(lab: labs.Lab, pod: str) -> tuple[int, dict[str, Any]]:
    code, out = inspect(lab, pod, "-o", "json")
    assert code in (0, 3), out
    document: dict[str, Any] = json.loads(out)
    jsonschema.validate(document, json.loads(resources.files("nodeagent.inspect").joinpath("schema.json").read_text()))
    return code, document


def pod_netns(lab: labs.Lab, pod: str) -> str:
    return lab.plan.pod(pod).netns


def pod_cgroup(lab: labs.Lab, pod: str) -> Path:
    return cgroups.path_of(lab.plan.pod(pod).cgroup)


def saved_rules(lab: labs.Lab, pod: str, backend: str) -> set[tuple[str, str]]:
    """(table, rule) of ours, as iptables-save prints them in the pod's namespace."""
    out = set()
    for table in ("mangle", "nat"):
        text = subprocess.run(["ip", "netns", "exec", pod_netns(lab, pod), f"iptables-{backend}-save", "-t", table],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        out |= {(table, line) for line in text.splitlines() if line.startswith("-A") and "NODEAGENT_" in line}
    return out


def cgroup_programs(cgroup: Path) -> set[tuple[str, int]]:
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True,
                           timeout=30, check=True).stdout
    return {(str(p["name"]), int(p["id"])) for p in json.loads(shown or "[]") if str(p["name"]).startswith("nm_")}


def agent_process(lab: labs.Lab, node: str) -> psutil.Process:
    record = labs.load(lab.record.name).record
    shim = next(p.pid for p in reversed(record.processes) if p.owner == f"agent/{node}")
    children = psutil.Process(shim).children(recursive=True)
    return next(c for c in children if " run " in f" {' '.join(c.cmdline())} ")



def test_an_enrolled_pod_shows_its_identity_capture_tunnel_and_paths(lab: labs.Lab, mode: str) -> None:
    code, doc = report(lab, "demo/client")
    assert code == 0 and doc["drift"] == [] and not doc["drifted"]
    assert doc["identity"] == "spiffe://cluster.local/ns/demo/sa/client" and doc["enrolled"]
    assert "nodeagent.io/mesh=enabled" in doc["enrollment_reason"]
    assert doc["source"] == "agent" and doc["mesh_state"] == "captured" and doc["datapath_mode"] == mode
    assert doc["node"] == "node1" and doc["ips"] == [str(lab.plan.pod("demo/client").pod.ip)]
    capture = doc["capture"]
    assert capture["status"] == "installed" and capture["mechanism"] == mode
    if mode == "iptables":
        shown = {(r["table"], r["rule"]) for r in capture["rules"]}
        assert shown == saved_rules(lab, "demo/client", capture["backend"])
        assert any("--to-ports 15001" in rule for _, rule in shown)
    else:
        shown_programs = {(p["name"], p["prog_id"]) for p in capture["programs"] if p["where"].startswith("cgroup")}
        assert shown_programs == cgroup_programs(pod_cgroup(lab, "demo/client"))
        assert {"nm_connect4", "nm_sockops"} <= {name for name, _ in shown_programs}
        assert any(entry.startswith("nm_config[") for entry in capture["map_entries"])
    tunnel = doc["tunnel"]
    assert tunnel["served"] and sorted(tunnel["listeners"]) == [15001, 15006, 15008]
    assert tunnel["certificate_subject"] == doc["identity"] and tunnel["certificate_expiry"]
    paths = {p["frontend"]: p for p in doc["services"]}
    cluster = paths["10.96.0.10:80/TCP"]
    assert cluster["verdict"].startswith("captured") and len(cluster["endpoints"]) == 2
    assert abs(sum(e["probability"] for e in cluster["endpoints"]) - 1) < 1e-6
    # Port 53 is DNS for both captures (the tunnel's proxy answers).
    dns = paths["10.96.0.10:53/UDP"]["verdict"]
    assert dns.startswith("captured (the tunnel's DNS proxy"), dns


def test_a_pod_outside_the_mesh_has_no_capture_and_no_drift(lab: labs.Lab) -> None:
    code, doc = report(lab, "plain/outsider")
    assert code == 0 and doc["drift"] == []
    assert not doc["enrolled"] and "neither pod nor namespace" in doc["enrollment_reason"]
    assert doc["capture"]["status"] == "absent" and doc["capture"]["mechanism"] == "none"
    assert doc["capture"]["rules"] == [] and doc["capture"]["programs"] == []
    assert not doc["tunnel"]["served"]
    assert all(not p["verdict"].startswith("captured") for p in doc["services"])
    assert saved_rules(lab, "plain/outsider", "nft") == set()


def _break_capture(lab: labs.Lab, mode: str) -> str:
    """Delete one piece of the client's capture by hand; returns what the drift must name."""
    if mode == "iptables":
        subprocess.run(["ip", "netns", "exec", pod_netns(lab, "demo/client"), "iptables-nft", "-t", "nat", "-D",
                        "NODEAGENT_OUTPUT", "!", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "mark", "!", "--mark",
                        "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001"], check=True, timeout=30)
        return "--to-ports 15001"
    cgroup = pod_cgroup(lab, "demo/client")
    prog_id = next(i for name, i in cgroup_programs(cgroup) if name == "nm_connect4")
    subprocess.run(["bpftool", "cgroup", "detach", str(cgroup), "connect4", "id", str(prog_id)], check=True,
                   timeout=30)
    return "nm_connect4"


def test_a_rule_deleted_by_hand_is_drift_read_from_the_kernel_while_the_agent_is_stopped(
        lab: labs.Lab, mode: str) -> None:
    agent = agent_process(lab, "node1")
    agent.send_signal(signal.SIGSTOP)  # it would repair the capture within seconds
    try:
        named = _break_capture(lab, mode)
        code, out = inspect(lab, "demo/client")
        assert code == 3, out
        assert "Read from:  kernel" in out and "the agent is not running" in out
        assert any(line.lstrip().startswith("!!") and named in line for line in out.splitlines()), out
        code, doc = report(lab, "demo/client")
        assert code == 3 and doc["source"] == "kernel" and doc["capture"]["status"] == "drifted"
        assert any(d["where"] == "capture" and d["change"] == "missing" and named in d["detail"]
                   for d in doc["drift"])
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_for(lambda: report(lab, "demo/client")[0] == 0, "the agent repairs the capture and inspect sees no drift",
             timeout=30.0)


def test_the_node_view_lists_every_pod_and_the_service_view_its_frontends(lab: labs.Lab, mode: str) -> None:
    result = subprocess.run([NODEAGENT, "inspect", "--lab", lab.record.name, "--node", "node1", "-o", "json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    pods = {p["pod"]: p for p in json.loads(result.stdout)["pods"]}
    assert {"demo/client", "demo/echo-0", "plain/outsider"} <= set(pods)
    assert pods["demo/client"]["capture"]["status"] == "installed" and not pods["plain/outsider"]["enrolled"]
    result = subprocess.run([NODEAGENT, "inspect", "--lab", lab.record.name, "--service", "demo/echo-nodeport",
                             "-o", "json"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    paths = json.loads(result.stdout)
    assert {p["kind"] for p in paths} == {"ClusterIP", "NodePort"}
    assert all(len(p["endpoints"]) == 2 for p in paths)
    if mode == "iptables":
        assert all(p["live"] == "present" for p in paths)


def test_the_agents_health_and_metrics_endpoints_parse(lab: labs.Lab, mode: str) -> None:
    """/healthz and /livez (kube-proxy's JSON plus the wait's timestamps), /proxyMode and /metrics, read inside
    the node (never from the root namespace), the metrics through Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    from nodeagent.kernel.netns import in_netns

    node = lab.plan.node("node1")

    def get(path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{node.node.address}{path}", timeout=5) as answer:
                    return answer.status, answer.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        return in_netns(f"/run/netns/{node.netns}", fetch)

    for path in (":10256/healthz", ":10256/livez"):
        status, body = get(path)
        health = json.loads(body)
        assert status == 200 and health["lastUpdated"].startswith("20") and health["proxyMode"] == mode
        assert health["oldestQueued"] == "" and health["gracePeriodSeconds"] > 0
    assert get(":10249/proxyMode") == (200, mode)
    status, text = get(":10249/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert status == 200
    assert {"kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "nodeagent_sync_proxy_rules_failures", "nodeagent_proxy_mode_info"} <= set(families)
    assert any(s.value >= 1 for s in families["kubeproxy_sync_proxy_rules_duration_seconds"].samples
               if s.name.endswith("_count") and s.labels == {"ip_family": "IPv4"})
    assert any(s.value >= 1 for s in families["kubeproxy_network_programming_duration_seconds"].samples
               if s.name.endswith("_count")), "the first sync's programming duration is recorded"
    if mode == "iptables":  # the datapath's size after its last full sync
        nat = [s.value for s in families["kubeproxy_sync_proxy_rules_iptables_total"].samples
               if s.labels == {"table": "nat", "ip_family": "IPv4"}]
        assert nat and nat[0] > 10, nat
    else:
        services = [s.value for s in families["nodeagent_sync_proxy_map_entries"].samples
                    if s.labels.get("map") == "na_services"]
        assert services and services[0] >= 3, services


def cluster_ip(lab: labs.Lab, service: str) -> str:
    from nodeagent.state.once import snapshot_of_manifests

    state = snapshot_of_manifests(lab.record.manifests_path.parent, "node1")
    return next(str(info.cluster_ips[0]) for name, info in state.service_ports.items()
                if f"{name.namespace}/{name.name}" == service)


def traced(lab: labs.Lab, source: str, destination: str, *args: str) -> dict[str, Any]:
    result = subprocess.run([NODEAGENT, "trace", "--lab", lab.record.name, "--from", source, "--to", destination,
                             "--probe", "-o", "json", *args], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if document["probe"]["confirmed"] else 3), result.stdout + result.stderr
    return document


@pytest.mark.parametrize(("source", "service", "port", "outcome", "captured"), [
    ("demo/client", "demo/echo", 80, "connected", True),  # ClusterIP, through the tunnels
    ("plain/outsider", "demo/echo", 80, "connected", False),  # ClusterIP, the node's translation
    ("plain/outsider", "node1", 30080, "connected", False),  # NodePort on the node's address
    ("demo/client", "node1", 30080, "connected", True),  # NodePort, captured: the tunnel resolves it
    ("plain/outsider", "demo/nobody", 80, "refused", False),  # no endpoints: REJECT / ECONNREFUSED
    ("demo/client", "demo/nobody", 80, "refused", True),  # no endpoints: the tunnel closes it
    ("demo/client", "demo/guarded", 80, "denied", True),  # DENY policy at the destination tunnel
])
def test_trace_predictions_are_confirmed_by_a_real_connection(lab: labs.Lab, mode: str, source: str, service: str,
                                                               port: int, outcome: str, captured: bool) -> None:
    address = str(lab.plan.node(service).node.address) if service == "node1" else cluster_ip(lab, service)
    for _ in range(3):  # a few connections: the probabilities pick different endpoints
        document = traced(lab, source, f"{address}:{port}")
        trace, probe = document["trace"], document["probe"]
        assert document["mode"] == mode
        assert trace["outcome"] == outcome and trace["captured"] is captured
        assert probe["confirmed"], probe["reasons"]
        assert probe["answered"] is (outcome == "connected")
        if outcome == "connected" and mode == "iptables" and not captured:
            assert any(key.startswith("KUBE-SEP-") and value >= 1 for key, value in probe["counters"].items())
        if outcome == "connected" and captured:
            assert probe["counters"]["tunnel connections opened"] >= 1
        if outcome == "denied":
            assert probe["counters"]["policy denials on node2"] >= 1
    if outcome == "denied":
        assert all("denied by DENY policy demo/deny-client" in hop["verdict"] for hop in trace["hops"])


def test_bad_input_is_one_line_and_a_non_zero_exit(lab: labs.Lab) -> None:
    for args, message in ((["--pod", "demo/nobody"], "no pod demo/nobody in the cluster"),
                          (["--pod", "demo/echo-1", "--node", "node1"], "runs on node node2, not node1")):
        result = subprocess.run([NODEAGENT, "inspect", "--lab", lab.record.name, *args], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert os.path.exists(f"/run/netns/{pod_netns(lab, 'demo/client')}")
