"""The eBPF service datapath in a real lab: programs on each node's cgroup, real sockets in pods.

Marked `bcc`: the first load compiles bpf-src/sock_lb.c. Everything is attached to the lab's own
cgroups (never the root cgroup), pinned under the lab's scopes, and removed by `lab down`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.netns import command_in
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import AGENT_OWNER, start_agents
from nodeagent.lab.demo import request_from
from nodeagent.service.ebpf.desired import Backend, Frontend
from nodeagent.service.ebpf.maps import MapSync
from tests.integration.conftest import unique_lab_name
from tests.support.agent_labs import lab_with_agents

pytestmark = [pytest.mark.root, pytest.mark.bcc]

EXTRA = """
apiVersion: v1
kind: Service
metadata: {name: dns-np, namespace: demo}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{name: dns, port: 53, targetPort: 8081, nodePort: 30053, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  selector: {app: echo}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: demo}
spec:
  selector: {app: nothing-matches}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("ebpf-lab"), EXTRA, "ebpf", ["--min-sync-period", "0.1"]) as built:
        name = built.record.name
        yield built
    assert not list(Path("/sys/fs/bpf").glob(f"nodeagent/{name}-*")), "lab down removes the pins"



def in_pod(lab: labs.Lab, pod: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in the pod's network namespace and cgroup (where the programs apply)."""
    plan = lab.plan.pod(pod)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), ["python3", "-c", code, *args])
    return subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=30, check=False)


def test_no_iptables_rule_captures_cluster_ips(lab: labs.Lab) -> None:
    nat = subprocess.run(command_in(lab.plan.node("node1").netns, ["iptables-save", "-t", "nat"]),
                         capture_output=True, text=True, check=True).stdout
    assert lab.cluster_ip("echo") not in nat, "cluster IPs are translated at connect(), not by NAT rules"


def test_tcp_through_a_cluster_ip_reaches_both_backends(lab: labs.Lab) -> None:
    seen = Counter(request_from(lab, "demo/client", f"{lab.cluster_ip('echo')}:80")["pod"] for _ in range(40))
    assert set(seen) == {"demo/echo-0", "demo/echo-1"} and 8 <= seen["demo/echo-0"] <= 32, seen


def test_getpeername_shows_the_vip_and_the_server_sees_the_pod(lab: labs.Lab) -> None:
    code = ("import socket,sys,json;s=socket.create_connection((sys.argv[1],80),timeout=5);"
            "s.sendall(b'x\\n');a=json.loads(s.makefile().readline());print(s.getpeername()[0],a['local'])")
    result = in_pod(lab, "demo/client", code, lab.cluster_ip("echo"))
    assert result.returncode == 0, result.stderr
    peer, served_by = result.stdout.split()
    assert peer == lab.cluster_ip("echo"), "the application sees the address it dialed"
    assert served_by.split(":")[0] in {str(lab.plan.pod(p).pod.ip) for p in ("demo/echo-0", "demo/echo-1")}


def test_udp_reaches_both_backends_and_replies_come_from_the_vip(lab: labs.Lab) -> None:
    code = ("import socket,sys,json;out=[]\n"
            "for _ in range(30):\n"
            " s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
            " s.sendto(b'hi',(sys.argv[1],53));data,src=s.recvfrom(4096);out.append([json.loads(data)['pod'],src[0]])\n"
            "print(json.dumps(out))")
    result = in_pod(lab, "demo/client", code, lab.cluster_ip("echo"))
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert {pod for pod, _ in answers} == {"demo/echo-0", "demo/echo-1"}
    assert {src for _, src in answers} == {lab.cluster_ip("echo")}, "recvfrom reports the Service address"


def test_a_service_without_endpoints_refuses_connect_at_once(lab: labs.Lab) -> None:
    code = ("import socket,sys,time,errno;t=time.monotonic()\n"
            "try:\n socket.create_connection((sys.argv[1],80),timeout=5);print('connected')\n"
            "except OSError as e:\n print(errno.errorcode.get(e.errno), round(time.monotonic()-t,3))")
    result = in_pod(lab, "demo/client", code, lab.cluster_ip("nobody"))
    name, seconds = result.stdout.split()
    assert name == "ECONNREFUSED" and float(seconds) < 0.5, result.stdout


def test_affinity_pins_a_client(lab: labs.Lab) -> None:
    seen = {request_from(lab, "demo/client", f"{lab.cluster_ip('sticky')}:80")["pod"] for _ in range(15)}
    assert len(seen) == 1, seen


def test_node_port_from_the_other_node_goes_through_tc(lab: labs.Lab) -> None:
    """Both backends answer; the local one sees the client's address; not one iptables rule exists."""
    node1 = lab.plan.node("node1")
    node2 = lab.plan.node("node2")
    argv = processes.enter_argv(node2.netns, cgroups.path_of(node2.cgroup),
                                ["nodeagent", "workload", "request", f"{node1.node.address}:30080"])
    peers: dict[str, set[str]] = {}
    for _ in range(16):
        result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=20,
                                check=False)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        peers.setdefault(answer["pod"], set()).add(answer["peer"].split(":")[0])
    assert set(peers) == {"demo/echo-0", "demo/echo-1"}, peers
    assert peers["demo/echo-0"] == {str(node2.node.address)}, "a local backend sees the client"
    assert peers["demo/echo-1"] == {str(node1.node.address)}, "a remote backend sees the node (SNAT)"
    tables = subprocess.run(command_in(node1.netns, ["iptables-save"]), capture_output=True, text=True,
                            check=True).stdout
    assert "KUBE-" not in tables
    filters = subprocess.run(command_in(node1.netns, ["tc", "filter", "show", "dev", "eth0", "ingress"]),
                             capture_output=True, text=True, check=True).stdout
    assert "na_tc_ingress" in filters


def test_udp_node_port_from_the_other_node_replies_from_the_node_port(lab: labs.Lab) -> None:
    node1, node2 = lab.plan.node("node1"), lab.plan.node("node2")
    code = ("import socket,sys,json;out=[]\n"
            "for _ in range(16):\n"
            " s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
            " s.sendto(b'hi',(sys.argv[1],30053));data,src=s.recvfrom(4096)\n"
            " out.append([json.loads(data)['pod'],src[0],src[1]])\n"
            "print(json.dumps(out))")
    argv = processes.enter_argv(node2.netns, cgroups.path_of(node2.cgroup),
                                ["python3", "-c", code, str(node1.node.address)])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert {pod for pod, _, _ in answers} == {"demo/echo-0", "demo/echo-1"}
    assert {(ip, port) for _, ip, port in answers} == {(str(node1.node.address), 30053)}


def test_map_contents_equal_the_desired_state(lab: labs.Lab) -> None:
    datapath = loader.load(f"{lab.record.name}-node1")
    try:
        contents = MapSync(datapath.maps).contents()
    finally:
        datapath.close()
    pod_ip = {p: str(lab.plan.pod(p).pod.ip) for p in ("demo/echo-0", "demo/echo-1")}
    echo = Frontend(lab.cluster_ip("echo"), 80, 6)
    assert sorted(contents[echo].backends) == sorted(Backend(ip, 8080) for ip in pod_ip.values())
    assert contents[Frontend(lab.cluster_ip("echo"), 53, 17)].backends == tuple(
        sorted((Backend(ip, 8081) for ip in pod_ip.values()), key=lambda b: f"{b.ip}:{b.port}"))
    assert contents[Frontend(lab.cluster_ip("nobody"), 80, 6)].backends == ()
    assert contents[Frontend(str(lab.plan.node("node1").node.address), 30080, 6)].backends
    assert contents[Frontend(lab.cluster_ip("sticky"), 80, 6)].affinity_seconds == 300


def test_killing_the_agent_loses_no_connection_and_the_restart_adopts_and_catches_up(lab: labs.Lab) -> None:
    """kill -9 the node1 agent during a connection loop; edit a Service while it is down; start it again."""
    loop = ("import socket,sys,time,json;end=time.monotonic()+float(sys.argv[2]);ok=fail=0\n"
            "while time.monotonic()<end:\n"
            " try:\n  s=socket.create_connection((sys.argv[1],80),timeout=2);s.sendall(b'x\\n');"
            "s.makefile().readline();s.close();ok+=1\n"
            " except OSError: fail+=1\n"
            " time.sleep(0.005)\n"
            "print(json.dumps([ok,fail]))")
    plan = lab.plan.pod("demo/client")
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                ["python3", "-c", loop, lab.cluster_ip("echo"), "4"])
    client = subprocess.Popen(argv, env=processes.child_env({}), stdout=subprocess.PIPE, text=True)
    agent = next(p for p in lab.record.processes if p.owner == AGENT_OWNER + "node1")
    agent_pid = next(c.pid for c in psutil.Process(agent.pid).children(recursive=True)
                     if "run" in c.cmdline())
    time.sleep(1)  # let the loop run before the kill (a workload, not a readiness wait)
    os.kill(agent_pid, signal.SIGKILL)
    ok, fail = json.loads(client.communicate(timeout=30)[0])
    assert fail == 0 and ok > 100, (ok, fail)

    # While the agent is down: the echo Service loses echo-1 (the datapath keeps the old state).
    manifests = lab.record.manifests_path
    original = manifests.read_text()
    documents = list(yaml.safe_load_all(original))
    echo_1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    for doc in documents:
        if doc["kind"] == "EndpointSlice" and doc["metadata"]["labels"]["kubernetes.io/service-name"] == "echo":
            doc["endpoints"] = [e for e in doc["endpoints"] if e["addresses"] != [echo_1]]
    manifests.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    node = lab.plan.node("node1")
    log = lab.record.directory / "logs" / "agent.node1.restart.log"
    from nodeagent.lab.agents import agent_argv

    shim = processes.spawn(node.netns, cgroups.path_of(node.cgroup),
                           agent_argv(lab, "node1", "ebpf", ["--min-sync-period", "0.1"]),
                           {"NODE_NAME": "node1"}, log)
    lab.record.processes.append(type(agent)(owner=AGENT_OWNER + "node1-restart", container="nodeagent", pid=shim,
                                            log=str(log)))
    lab.record.save()
    try:
        deadline = time.monotonic() + 30
        while '"adopted": true' not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen = {request_from(lab, "demo/client", f"{lab.cluster_ip('echo')}:80")["pod"] for _ in range(10)}
            if seen == {"demo/echo-0"}:
                break
        assert seen == {"demo/echo-0"}, "the change made while the agent was down is applied"
    finally:
        manifests.write_text(original)


def test_cleanup_leaves_no_program_attachment_or_pin(lab: labs.Lab) -> None:
    """(Last in the module: it takes node1's datapath away.)"""
    from click.testing import CliRunner

    from nodeagent.cli import main

    scope = f"{lab.record.name}-node1"
    cgroup = cgroups.path_of(lab.plan.node("node1").cgroup)
    programs = [record["id"] for record in loader.attached(cgroup)]
    assert len(programs) == len(loader.PROGRAMS) == 8 and (loader.ROOT / scope).exists()  # 4 per family
    result = CliRunner().invoke(main, ["cleanup", "--bpf-scope", scope, "--cgroup", str(cgroup),
                                       "--netns", lab.plan.node("node1").netns,
                                       "--pod-netns-prefix", f"{lab.record.name}-pod-"])
    assert result.exit_code == 0, result.output
    assert "removed (ebpf) cgroup_inet4_connect na_connect4" in result.stdout
    assert loader.attached(cgroup) == [] and not (loader.ROOT / scope).exists()
    filters = subprocess.run(command_in(lab.plan.node("node1").netns, ["tc", "filter", "show", "dev",
                              "eth0", "ingress"]), capture_output=True, text=True, check=True).stdout
    assert "na_tc" not in filters
    for program in programs:  # nothing holds them any more: the kernel freed them
        shown = subprocess.run(["bpftool", "prog", "show", "id", str(program)], capture_output=True, check=False)
        assert shown.returncode != 0, f"program {program} still exists"


def test_auto_mode_falls_back_to_nftables_when_bcc_cannot_compile(tmp_path: Path) -> None:
    """This kernel has nftables, so `auto` without eBPF picks nftables (the unit tests cover iptables)."""
    name = unique_lab_name()
    empty = tmp_path / "no-headers"
    empty.mkdir()
    labs.up(name)
    try:
        lab = start_agents(name, "auto", env={"BCC_KERNEL_SOURCE": str(empty)})
        node = lab.plan.node("node1")
        probe = ("import urllib.request,sys,json;get=lambda u:urllib.request.urlopen(u).read().decode();"
                 "print(json.dumps([get(sys.argv[1]+':10249/proxyMode'),get(sys.argv[1]+':10256/healthz'),"
                 "get(sys.argv[1]+':10249/metrics')]))")
        result = subprocess.run(command_in(node.netns, ["python3", "-c", probe,
                                 f"http://{node.node.address}"]), capture_output=True, text=True, timeout=20,
                                check=True)
        mode, health, metrics = json.loads(result.stdout)
        assert mode == "nftables"
        assert "eBPF unavailable, fell back to nftables" in json.loads(health)["proxyModeReason"]
        info = [line for line in metrics.splitlines() if line.startswith("nodeagent_proxy_mode_info{")]
        assert len(info) == 1 and 'mode="nftables"' in info[0] and "fell back" in info[0], info
        assert 'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}' in metrics
        assert request_from(lab, "demo/client", f"{lab.cluster_ip('echo')}:80")["pod"].startswith("demo/echo-")
    finally:
        labs.down(name)


def test_endpoint_weights_change_the_split(tmp_path: Path) -> None:
    """nodeagent.io/endpoint-weights 9:1 -> about 90% to echo-0 (60 tries: P(< 40) is below 1e-5)."""
    weighted = """
apiVersion: v1
kind: Service
metadata:
  name: canary
  namespace: demo
  annotations: {nodeagent.io/endpoint-weights: '{"echo-0": 9, "echo-1": 1}'}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
    with lab_with_agents(tmp_path, weighted, "ebpf") as lab:
        seen = Counter(request_from(lab, "demo/client", f"{lab.cluster_ip('canary')}:80")["pod"] for _ in range(60))
        assert seen["demo/echo-0"] >= 40, seen


def test_switching_a_node_to_iptables_removes_the_ebpf_datapath() -> None:
    name = unique_lab_name()
    labs.up(name)
    try:
        lab = start_agents(name, "ebpf")
        cgroup = cgroups.path_of(lab.plan.node("node1").cgroup)
        assert loader.attached(cgroup)
        agent = next(p for p in lab.record.processes if p.owner == AGENT_OWNER + "node1")
        os.kill(agent.pid, signal.SIGTERM)
        assert processes.wait_gone([agent.pid], timeout=10) == []
        from nodeagent.lab.agents import agent_argv

        node = lab.plan.node("node1")
        log = lab.record.directory / "logs" / "agent.node1.iptables.log"
        shim = processes.spawn(node.netns, cgroup, agent_argv(lab, "node1", "iptables"), {"NODE_NAME": "node1"}, log)
        lab.record.processes.append(type(agent)(owner=AGENT_OWNER + "node1-iptables", container="nodeagent",
                                                pid=shim, log=str(log)))
        lab.record.save()
        deadline = time.monotonic() + 30
        while loader.attached(cgroup) or (loader.ROOT / f"{name}-node1").exists() is not False:
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)
        nat = command_in(node.netns, ["iptables-save", "-t", "nat"])
        while lab.cluster_ip("echo") not in subprocess.run(nat, capture_output=True, text=True, check=True).stdout:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert request_from(lab, "demo/client", f"{lab.cluster_ip('echo')}:80")["pod"].startswith("demo/echo-")
    finally:
        labs.down(name)
