"""The eBPF-mode capture (bpf-src/mesh_capture.c, nodeagent/mesh/ebpf/programs.py) in the two-node lab with agents (eBPF
service datapath) and node tunnels serving every enrolled pod, the agents capturing nothing themselves
(`capture=False`): each test installs the capture it needs on the lab's own pod cgroups and interfaces and
removes it. The original-destination hook goes on each node's cgroup, where the lab runs the tunnel.

Connections are made by real processes inside the pods (their namespace AND cgroup, as a runtime places
them). Evidence: the programs' own counters (`capture_counters`), the echo app's answer (the tunnels
connect to the app from inside its pod, not transparently here, so a captured connection shows the
server pod's own address and a direct one the client's), the tunnel's admin dump (HBONE pools) and its
Istio metrics.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.netfilter import detect_backend
from nodeagent.kernel.netns import command_in, in_netns
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import TUNNEL_OWNER
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.ebpf import programs as mesh
from nodeagent.mesh.ebpf.capture import EbpfCapture
from nodeagent.mesh.ebpf.kubelet import KubeletCgroups
from nodeagent.mesh.ebpf.state import MAX_EXCLUDE, encode_config
from nodeagent.mesh.iptables.apply import apply_probe_snat, remove_probe_snat
from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, PROBE_ADDRESS, CaptureOptions, CaptureOptionsError
from tests.support.agent_labs import lab_with_agents, unserved_resolver
from tests.support.tunnel import admin_dump, ask_dns, dns_responder

pytestmark = [pytest.mark.root, pytest.mark.bcc]

# One request from inside a pod: connect, say hello, print the echo app's answer and what getpeername showed.
REQUEST = r"""
import json, socket, sys
host, port, mark, family = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(5)
s.connect((host, port))
seen = s.getpeername()
s.sendall(b"hello\n")
answer = json.loads(s.makefile("rb").readline())
answer["getpeername"] = f"{seen[0]}:{seen[1]}"
print(json.dumps(answer))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("mesh-ebpf"), "", "ebpf", mesh=True, capture=False) as lab:
        yield lab


def scope(lab: labs.Lab, node: str) -> str:
    return f"{lab.record.name}-{node}"  # the node agent's own --bpf-scope: the capture pins beside its datapath


def node_cgroup(lab: labs.Lab, node: str) -> Path:
    return cgroups.path_of(lab.plan.node(node).cgroup)


@pytest.fixture(scope="module")
def programs(lab: labs.Lab) -> Iterator[dict[str, mesh.MeshPrograms]]:
    """Each node's capture programs, with the tunnel hook on the node's cgroup; all removed afterwards."""
    loaded: dict[str, mesh.MeshPrograms] = {}
    try:
        for node in ("node1", "node2"):
            loaded[node] = mesh.load(scope(lab, node))
            assert mesh.attach_tunnel(loaded[node], node_cgroup(lab, node)).status is CaptureStatus.INSTALLED
        yield loaded
    finally:
        for node, loaded_programs in loaded.items():
            mesh.detach_tunnel(node_cgroup(lab, node))
            loaded_programs.close()
            mesh.remove_pins(scope(lab, node))
        tree = subprocess.run(["bpftool", "cgroup", "tree", str(cgroups.path_of(lab.plan.cgroup_root))],
                              capture_output=True, text=True, check=True).stdout
        assert "nm_" not in tree, f"left attached: {tree}"
        assert not any(mesh.mesh_dir(scope(lab, node)).parent.exists() for node in loaded), "left pinned"


def target(lab: labs.Lab, pod: str) -> mesh.PodTarget:
    plan = lab.plan.pod(pod)
    return mesh.PodTarget(pod, f"/run/netns/{plan.netns}", cgroups.path_of(plan.cgroup), str(plan.pod.ip))


def node_of(lab: labs.Lab, pod: str) -> str:
    return lab.plan.pod(pod).pod.node


def ip(lab: labs.Lab, pod: str) -> str:
    return str(lab.plan.pod(pod).pod.ip)


@contextmanager
def captured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms], *pods: str,
             options: CaptureOptions = DEFAULT_OPTIONS) -> Iterator[None]:
    """The capture installed on `pods` for the block, removed afterwards (also on failure)."""
    try:
        for pod in pods:
            state = mesh.apply_capture(programs[node_of(lab, pod)], target(lab, pod), options)
            assert state.status is CaptureStatus.INSTALLED, state
        yield
    finally:
        for pod in pods:
            assert mesh.remove_capture(programs[node_of(lab, pod)], target(lab, pod)).status is CaptureStatus.ABSENT


def from_pod(lab: labs.Lab, pod: str, host: str, port: int, *, mark: int = 0, family: int = 4) -> dict[str, Any]:
    """One TCP request by a process inside `pod` (its namespace and its cgroup); `family` 6: from a dual-stack
    IPv6 socket to the IPv4-mapped address (as Java and Node connect by default)."""
    plan = lab.plan.pod(pod)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                [sys.executable, "-c", REQUEST, host, str(port), str(mark), str(family)])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def peer_ip(answer: dict[str, Any]) -> str:
    return str(answer["peer"]).rsplit(":", 1)[0]


def counters(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms], pod: str) -> dict[str, int]:
    return mesh.capture_counters(programs[node_of(lab, pod)], target(lab, pod))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def tunnel_metrics(lab: labs.Lab, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    address = lab.plan.node(node).node.address
    text = subprocess.run(command_in(lab.plan.node(node).netns, ["python3", "-c",
                           "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen("
                           f"'http://{address}:15020/metrics',timeout=5).read().decode())"]),
                          check=True, capture_output=True, text=True, timeout=30).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def opened(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], **labels: str) -> float:
    return sum(v for (n, ls), v in values.items()
               if n == "istio_tcp_connections_opened_total" and labels.items() <= dict(ls).items())


def pools(lab: labs.Lab, node: str, pod: str) -> set[str]:
    return {p["peer"] for p in next(p for p in admin_dump(lab, node)["pods"] if p["ip"] == ip(lab, pod))["pools"]}


def test_outbound_goes_through_the_node_tunnel_over_hbone(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]
                                                          ) -> None:
    labels = {"reporter": "source", "source_workload": "client", "destination_workload": "echo"}
    with captured(lab, programs, "demo/client"):
        before, metrics_before = counters(lab, programs, "demo/client"), tunnel_metrics(lab, "node1")
        answer = from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)
        assert answer["pod"] == "demo/echo-1"
        # one capture, one original destination answered; the tunnel's own dial was not captured again
        assert delta(before, counters(lab, programs, "demo/client")) == {"outbound": 1, "answered": 1}
        assert answer["getpeername"] == f"{ip(lab, 'demo/echo-1')}:8080", "the app sees what it dialed"
        assert peer_ip(answer) == ip(lab, "demo/echo-1"), "node2's tunnel connected from inside the server pod"
        assert f"{ip(lab, 'demo/echo-1')}:15008" in pools(lab, "node1", "demo/client")
        assert opened(tunnel_metrics(lab, "node1"), **labels) - opened(metrics_before, **labels) == 1


def test_a_dual_stack_socket_dialing_an_ipv4_mapped_address_is_captured(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    mapped = f"::ffff:{ip(lab, 'demo/echo-1')}"
    with captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        answer = from_pod(lab, "demo/client", mapped, 8080, family=6)
        assert answer["pod"] == "demo/echo-1" and peer_ip(answer) == ip(lab, "demo/echo-1"), "through the tunnels"
        assert answer["getpeername"] == f"{mapped}:8080"
        assert delta(before, counters(lab, programs, "demo/client")) == {"outbound": 1, "answered": 1}


def test_a_service_address_reaches_the_tunnel_untranslated(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]
                                                          ) -> None:
    """The capture on the pod's cgroup runs before the agent's socket LB on the node's cgroup: the tunnel
    is handed the Service address (and balances it itself), and getpeername still shows it."""
    vip = lab.cluster_ip("echo")
    labels = {"reporter": "source", "destination_service": "demo/echo"}
    with captured(lab, programs, "demo/client"):
        before, metrics_before = counters(lab, programs, "demo/client"), tunnel_metrics(lab, "node1")
        answer = from_pod(lab, "demo/client", vip, 80)
        assert answer["pod"] in ("demo/echo-0", "demo/echo-1")
        assert answer["getpeername"] == f"{vip}:80"
        assert delta(before, counters(lab, programs, "demo/client")) == {"outbound": 1, "answered": 1}
        assert opened(tunnel_metrics(lab, "node1"), **labels) - opened(metrics_before, **labels) == 1


def test_loopback_and_the_pod_itself_are_not_captured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    with captured(lab, programs, "demo/echo-0"):
        before = counters(lab, programs, "demo/echo-0")
        local = from_pod(lab, "demo/echo-0", "127.0.0.1", 8080)
        itself = from_pod(lab, "demo/echo-0", ip(lab, "demo/echo-0"), 8080)
        mapped = from_pod(lab, "demo/echo-0", "::ffff:127.0.0.1", 8080, family=6)
        assert peer_ip(local) == "127.0.0.1" and peer_ip(mapped) == "127.0.0.1"
        assert peer_ip(itself) == ip(lab, "demo/echo-0")
        assert delta(before, counters(lab, programs, "demo/echo-0")) == {"outbound_skipped": 3}


def test_udp_is_not_captured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    from nodeagent.lab.demo import request_from

    with captured(lab, programs, "demo/client", "demo/echo-1"):
        client, server = counters(lab, programs, "demo/client"), counters(lab, programs, "demo/echo-1")
        answer = request_from(lab, "demo/client", f"{ip(lab, 'demo/echo-1')}:8081", udp=True)
        assert answer["proto"] == "udp" and peer_ip(answer) == ip(lab, "demo/client")
        assert delta(client, counters(lab, programs, "demo/client")) == {}
        assert delta(server, counters(lab, programs, "demo/echo-1")) == {}


def test_dns_is_answered_by_the_tunnels_proxy_with_the_resolver_shown(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    """The capture's DNS part (connect4/6, sendmsg4, recvmsg4/6): every way a stub resolver asks reaches the
    node tunnel's DNS proxy in the pod, the answer comes from the address asked, and a TCP question's
    resolver is the proxy's original destination (nm_getsockopt answers it)."""
    resolver, vip = unserved_resolver(lab), lab.cluster_ip("echo")
    with captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        answers = ask_dns(lab, "demo/client", "echo.demo.svc.cluster.local.", resolver)
        assert answers == {"udp": ["NOERROR", [vip]], "udp-connected": ["NOERROR", [vip], f"{resolver}:53"],
                           "udp-mapped": ["NOERROR", [vip]], "tcp": ["NOERROR", [vip]]}
        # one per sendto (2), one per connect (2); the TCP question's original destination answered once
        assert delta(before, counters(lab, programs, "demo/client")) == {"dns": 4, "answered": 1}


def test_an_external_name_over_tcp_is_forwarded_to_the_resolver_the_pod_dialled(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    """A name the tables do not hold, asked over TCP at a resolver outside the cluster (on node2's address): the
    proxy forwards it to the connection's original destination, which the tunnel's getsockopt hook gives, and
    the resolver's answer comes back to the pod."""
    node2 = lab.plan.node("node2")
    with dns_responder(node2.netns, str(node2.node.address), "192.0.2.53") as asked, \
            captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        answers = ask_dns(lab, "demo/client", "external.example.", str(node2.node.address), ways="tcp")
        assert answers == {"tcp": ["NOERROR", ["192.0.2.53"]]}
        assert delta(before, counters(lab, programs, "demo/client")) == {"dns": 1, "answered": 1}
    assert asked == ["external.example. tcp"], "asked by the proxy, once"


def test_dns_of_a_pod_that_opted_out_and_of_the_tunnels_sockets_is_not_captured(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    resolver = unserved_resolver(lab)
    with captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        answers = ask_dns(lab, "demo/client", "echo.demo.svc.cluster.local.", resolver, mark=0x539, timeout=1)
        assert answers["udp-marked"] == "TimeoutError", "the tunnel's mark: sent to the resolver itself, unanswered"
        assert delta(before, counters(lab, programs, "demo/client")) == {"dns": 4, "answered": 1}
    with captured(lab, programs, "demo/client", options=CaptureOptions(dns_port=None)):
        before = counters(lab, programs, "demo/client")
        answers = ask_dns(lab, "demo/client", "echo.demo.svc.cluster.local.", resolver, timeout=1)
        assert (answers["udp"], answers["udp-connected"], answers["udp-mapped"]) == (
            "Timeout", "TimeoutError", "Timeout"), answers
        assert answers["tcp"] != ["NOERROR", [lab.cluster_ip("echo")]], "TCP 53 goes to the outbound listener"
        assert "dns" not in delta(before, counters(lab, programs, "demo/client"))


def test_a_process_outside_the_pod_cgroup_is_not_captured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]
                                                          ) -> None:
    """This test's own process, in the client's namespace but not in its cgroup (as the tunnel's sockets)."""
    def connect() -> socket.socket:
        sock = socket.socket()
        sock.settimeout(5)
        return sock

    with captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        with in_netns(target(lab, "demo/client").netns, connect) as sock:
            sock.connect((ip(lab, "demo/echo-1"), 8080))
            sock.sendall(b"hello\n")
            answer = json.loads(sock.makefile("rb").readline())
        assert peer_ip(answer) == ip(lab, "demo/client"), "direct: the app sees the client"
        assert delta(before, counters(lab, programs, "demo/client")) == {}


def test_a_socket_marked_as_the_tunnels_is_not_captured_even_in_the_pod(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    with captured(lab, programs, "demo/client"):
        before = counters(lab, programs, "demo/client")
        answer = from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080, mark=0x539)
        assert peer_ip(answer) == ip(lab, "demo/client")
        assert delta(before, counters(lab, programs, "demo/client")) == {"outbound_skipped": 1}


def test_plaintext_inbound_goes_to_15006_and_hbone_is_left_alone(
        lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    with captured(lab, programs, "demo/echo-1"):
        before = counters(lab, programs, "demo/echo-1")
        answer = from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)  # the client is not captured
        assert answer["pod"] == "demo/echo-1"
        assert peer_ip(answer) == ip(lab, "demo/echo-1"), "the tunnel connected to the app from inside the pod"
        assert delta(before, counters(lab, programs, "demo/echo-1")) == {"inbound": 1, "answered": 1}
    with captured(lab, programs, "demo/client", "demo/echo-1"):
        server = counters(lab, programs, "demo/echo-1")
        assert from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)["pod"] == "demo/echo-1"
        assert delta(server, counters(lab, programs, "demo/echo-1")) == {}, "HBONE reached 15008 directly"


def test_excluded_ports_are_not_captured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    options = CaptureOptions(exclude_outbound_ports=(8080,), exclude_inbound_ports=(8080,))
    with captured(lab, programs, "demo/client", "demo/echo-1", options=options):
        client, server = counters(lab, programs, "demo/client"), counters(lab, programs, "demo/echo-1")
        answer = from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)
        assert peer_ip(answer) == ip(lab, "demo/client")
        assert delta(client, counters(lab, programs, "demo/client")) == {"outbound_skipped": 1}
        assert delta(server, counters(lab, programs, "demo/echo-1")) == {}
    too_many = CaptureOptions(exclude_outbound_cidrs=tuple(f"10.9.{i}.0/24" for i in range(MAX_EXCLUDE + 1)))
    with pytest.raises(CaptureOptionsError, match="exclude_outbound_cidrs"):
        mesh.apply_capture(programs["node1"], target(lab, "demo/client"), too_many)
    assert mesh.live_state(programs["node1"], target(lab, "demo/client")).status is CaptureStatus.ABSENT


def test_a_probe_from_the_node_reaches_the_app_uncaptured(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]
                                                          ) -> None:
    node1 = f"/run/netns/{lab.plan.node('node1').netns}"
    backend = detect_backend(lab.plan.node("node1").netns)
    local_pods = [str(p.pod.ip) for p in lab.plan.pods if p.pod.node == "node1"]

    def from_node() -> dict[str, Any]:
        def connect() -> socket.socket:
            sock = socket.socket()
            sock.settimeout(5)
            return sock

        with in_netns(node1, connect) as sock:
            sock.connect((ip(lab, "demo/echo-0"), 8080))
            sock.sendall(b"hello\n")
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        return answer

    with captured(lab, programs, "demo/echo-0"):
        before = counters(lab, programs, "demo/echo-0")
        assert peer_ip(from_node()) == ip(lab, "demo/echo-0"), "without the SNAT a probe is captured"
        assert delta(before, counters(lab, programs, "demo/echo-0")) == {"inbound": 1, "answered": 1}
        try:
            assert apply_probe_snat(node1, local_pods, backend=backend).status is CaptureStatus.INSTALLED
            before = counters(lab, programs, "demo/echo-0")
            assert peer_ip(from_node()) == PROBE_ADDRESS
            assert delta(before, counters(lab, programs, "demo/echo-0")) == {}
        finally:
            assert remove_probe_snat(node1, backend=backend).status is CaptureStatus.ABSENT


def test_removal_restores_direct_connections(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    client = target(lab, "demo/client")
    with captured(lab, programs, "demo/client", "demo/echo-1"):
        assert peer_ip(from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/echo-1")
    for pod in ("demo/client", "demo/echo-1"):
        assert mesh.live_state(programs[node_of(lab, pod)], target(lab, pod)).status is CaptureStatus.ABSENT
    assert not [r for r in loader.attached(client.cgroup) if str(r.get("name", "")).startswith("nm_")]
    assert counters(lab, programs, "demo/client") == dict.fromkeys(counters(lab, programs, "demo/client"), 0)
    answer = from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)
    assert peer_ip(answer) == ip(lab, "demo/client"), "direct again: the app sees the client"
    assert answer["getpeername"] == f"{ip(lab, 'demo/echo-1')}:8080"


def test_drift_is_named_and_repaired(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    node1, client = programs["node1"], target(lab, "demo/client")
    with captured(lab, programs, "demo/client"):
        connect4 = node1.program_ids["nm_connect4"]
        subprocess.run(["bpftool", "cgroup", "detach", str(client.cgroup), "connect4", "id", str(connect4)],
                       check=True)
        state = mesh.live_state(node1, client)
        assert state.status is CaptureStatus.DRIFTED
        assert state.missing == (f"connect4 nm_connect4 (id {connect4})",)
        assert peer_ip(from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/client")
        assert mesh.apply_capture(node1, client).status is CaptureStatus.INSTALLED
        assert peer_ip(from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/echo-1")
        # the configuration edited by hand (another outbound port) is drift too
        other = encode_config(client.ip, CaptureOptions(outbound_port=15999))
        node1.maps["nm_config"].update(mesh.cookie_key(mesh.netns_cookie(client.netns)), other)
        state = mesh.live_state(node1, client)
        assert state.status is CaptureStatus.DRIFTED and any("127.0.0.1:15999" in u for u in state.unexpected)
        assert mesh.apply_capture(node1, client).status is CaptureStatus.INSTALLED


def test_another_load_of_the_programs_is_stale_and_replaced(lab: labs.Lab,
                                                           programs: dict[str, mesh.MeshPrograms]) -> None:
    node1, client = programs["node1"], target(lab, "demo/client")
    other_scope = f"{lab.record.name}-other"
    other = mesh.load(other_scope)
    try:
        with captured(lab, programs, "demo/client"):
            assert other.program_ids["nm_connect4"] != node1.program_ids["nm_connect4"]
            subprocess.run(["bpftool", "cgroup", "attach", str(client.cgroup), "connect4", "pinned",
                            str(other.directory / "nm_connect4"), "multi"], check=True)
            state = mesh.live_state(node1, client)
            assert state.status is CaptureStatus.STALE
            assert any("not the pinned program" in u for u in state.unexpected)
            assert mesh.apply_capture(node1, client).status is CaptureStatus.INSTALLED
            assert [r["id"] for r in loader.attached(client.cgroup) if r.get("name") == "nm_connect4"] == [
                node1.program_ids["nm_connect4"]]
    finally:
        other.close()
        mesh.remove_pins(other_scope)


def test_a_vanished_pod_is_netns_missing(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    gone = mesh.PodTarget("demo/deleted", f"/run/netns/{lab.record.name}-pod-demo.deleted",
                          node_cgroup(lab, "node1") / "demo.deleted", "10.244.1.250")
    for state in (mesh.live_state(programs["node1"], gone), mesh.apply_capture(programs["node1"], gone),
                  mesh.remove_capture(programs["node1"], gone)):
        assert state.status is CaptureStatus.NETNS_MISSING
    assert not gone.cgroup.exists() and not Path(gone.netns).exists(), "nothing was created for it"


def test_the_tunnel_hook_is_on_the_tunnels_cgroup(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    shim = next(p.pid for p in lab.record.processes if p.owner == TUNNEL_OWNER + "node1")
    tunnel = psutil.Process(shim).children()[0].pid  # the shim stays outside; its child is the tunnel
    assert mesh.cgroup_of_pid(tunnel) == node_cgroup(lab, "node1")
    node1 = programs["node1"]
    assert mesh.tunnel_state(node1, node_cgroup(lab, "node1")).status is CaptureStatus.INSTALLED
    try:
        mesh.detach_tunnel(node_cgroup(lab, "node1"))
        assert mesh.tunnel_state(node1, node_cgroup(lab, "node1")).status is CaptureStatus.ABSENT
        with captured(lab, programs, "demo/client"):
            # captured, but nobody answers the original destination: the tunnel refuses the connection
            result = subprocess.run(processes.enter_argv(
                lab.plan.pod("demo/client").netns, target(lab, "demo/client").cgroup,
                [sys.executable, "-c", REQUEST, ip(lab, "demo/echo-1"), "8080", "0", "4"]),
                env=processes.child_env({}), capture_output=True, text=True, timeout=30, check=False)
            assert result.returncode != 0 and "echo-1" not in result.stdout
    finally:
        assert mesh.attach_tunnel(node1, node_cgroup(lab, "node1")).status is CaptureStatus.INSTALLED


LEGACY_RULES = 200  # about 30 KiB of IPT_SO_GET_ENTRIES: far beyond the page a sockopt program sees


def test_large_getsockopt_values_pass_the_tunnel_hook(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    """iptables-legacy reads its table with one getsockopt of tens of KiB; from the tunnel's cgroup (the
    node's, where the agent runs iptables too) it must still get the kernel's answer. (This kernel ignores
    a program's buffer beyond a page by itself; kernels before 6.5 rely on the program's optlen = 0.)"""
    netns = lab.plan.pod("demo/echo-0").netns  # a lab namespace with no legacy table of anyone's
    run = command_in(netns, ["iptables-legacy"])
    subprocess.run([*run, "-N", "NM_BIG"], check=True)
    try:
        for n in range(LEGACY_RULES):
            subprocess.run([*run, "-A", "NM_BIG", "-s", f"10.99.{n // 250}.{n % 250}/32", "-j", "RETURN"],
                           check=True)
        saved = subprocess.run(processes.enter_argv(netns, node_cgroup(lab, "node1"), ["iptables-legacy-save"]),
                               env=processes.child_env({}), capture_output=True, text=True, timeout=60, check=False)
        assert saved.returncode == 0, saved.stderr
        assert saved.stdout.count("-A NM_BIG ") == LEGACY_RULES
    finally:
        subprocess.run([*run, "-F", "NM_BIG"], check=False)
        subprocess.run([*run, "-X", "NM_BIG"], check=False)


def test_the_pins_sit_beside_the_agents_datapath(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    for node in ("node1", "node2"):
        assert mesh.mesh_dir(scope(lab, node)).is_dir()
        assert loader.pin_dir(scope(lab, node)).is_dir(), "the agent's eBPF datapath, same scope"
    with mesh.load(scope(lab, "node1"), compile_if_missing=False) as again:  # an agent restart: no compile
        assert again.adopted and again.program_ids == programs["node1"].program_ids
    for name, (key, value) in mesh.MAPS.items():  # the sizes the Python side writes are the C structs'
        shown = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned",
                                           str(mesh.mesh_dir(scope(lab, "node1")) / name)],
                                          capture_output=True, text=True, check=True).stdout)
        assert (shown["bytes_key"], shown["bytes_value"]) == (key, value), name


def test_the_agents_capture_protocol_in_ebpf_mode(lab: labs.Lab, programs: dict[str, mesh.MeshPrograms]) -> None:
    """`EbpfCapture` as `nodeagent.mesh.reconciler.MeshReconciler` would drive it: pods named by namespace path, found
    in the kubelet's layout under the node's cgroup by their UID (the reconciler's key, here the lab's)."""
    planned = {f"/run/netns/{p.netns}": (p.pod.uid, p.pod.qos_class) for p in lab.plan.pods}
    locate = KubeletCgroups(node_cgroup(lab, "node1"), lambda netns, _pod: planned.get(netns))
    assert locate.cgroup_of(target(lab, "demo/client").netns, "") == target(lab, "demo/client").cgroup
    capture = EbpfCapture(programs["node1"], locate,
                          backend=detect_backend(lab.plan.node("node1").netns),
                          tunnel_cgroup=node_cgroup(lab, "node1"))
    client = target(lab, "demo/client")
    try:
        assert capture.state(client.netns, DEFAULT_OPTIONS).status is CaptureStatus.ABSENT
        assert capture.apply(client.netns, DEFAULT_OPTIONS, "demo/client").status is CaptureStatus.INSTALLED
        assert mesh.live_state(programs["node1"], client).status is CaptureStatus.INSTALLED, "same pod, same cgroup"
        assert peer_ip(from_pod(lab, "demo/client", ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/echo-1")
        mesh.detach_tunnel(node_cgroup(lab, "node1"))  # the tunnel's hook lost: the pod's capture is drifted
        drifted = capture.state(client.netns, DEFAULT_OPTIONS)
        assert drifted.status is CaptureStatus.DRIFTED and "nm_getsockopt" in drifted.missing[0]
        assert capture.apply(client.netns, DEFAULT_OPTIONS, "demo/client").status is CaptureStatus.INSTALLED
        assert mesh.tunnel_state(programs["node1"], node_cgroup(lab, "node1")).status is CaptureStatus.INSTALLED
    finally:
        assert capture.remove(client.netns, "demo/client").status is CaptureStatus.ABSENT
    elsewhere = f"/run/netns/{lab.plan.node('node1').netns}"  # not a pod namespace
    assert capture.state(elsewhere, DEFAULT_OPTIONS).status is CaptureStatus.NETNS_MISSING


def test_compile_check_verifies_the_mesh_programs() -> None:
    result = subprocess.run([sys.executable, "-m", "nodeagent.mesh.ebpf.compile_check"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("mesh capture programs (nm_sockops, nm_getpeername4, nm_getpeername6, "
                                    "nm_recvmsg4, nm_recvmsg6, nm_sendmsg6, nm_sendmsg4, nm_connect6, nm_connect4, "
                                    "nm_getsockopt, nm_tc_inbound) compiled and verified in")


def test_cleanup_leaves_no_attachment_and_no_pin(lab: labs.Lab) -> None:
    """A scope of its own, captured and released in full: nothing of ours stays on any lab cgroup, on the
    pod's interface or on bpffs. (Its tunnel hook goes on the server pod's cgroup, a lab cgroup that the
    node tunnels' hooks do not use, so the other tests' hooks are not replaced.)"""
    name = f"{lab.record.name}-cleanup"
    echo = target(lab, "demo/echo-1")
    try:
        with mesh.load(name) as loaded:
            assert mesh.apply_capture(loaded, echo).status is CaptureStatus.INSTALLED
            assert mesh.attach_tunnel(loaded, echo.cgroup).status is CaptureStatus.INSTALLED
            assert mesh.remove_capture(loaded, echo).status is CaptureStatus.ABSENT
            assert mesh.detach_tunnel(echo.cgroup) == [f"cgroup_getsockopt nm_getsockopt <- {echo.cgroup}"]
            assert mesh.live_state(loaded, echo).status is CaptureStatus.ABSENT
            assert mesh.tunnel_state(loaded, echo.cgroup).status is CaptureStatus.ABSENT
    finally:
        removed = mesh.remove_pins(name)
    assert any(p.endswith("/nm_connect4") for p in removed)
    assert not (loader.ROOT / name).exists()
    tree = subprocess.run(["bpftool", "cgroup", "tree", str(cgroups.path_of(lab.plan.cgroup_root))],
                          capture_output=True, text=True, check=True).stdout
    ours = [line for line in tree.splitlines() if " nm_" in line]
    assert len(ours) == 2 and all("nm_getsockopt" in line for line in ours), "only the node tunnels' hooks remain"
    filters = subprocess.run(command_in(lab.plan.pod("demo/echo-1").netns, ["tc", "filter", "show",
                              "dev", "eth0", "ingress"]), capture_output=True, text=True, check=True).stdout
    assert "nm_tc_inbound" not in filters
