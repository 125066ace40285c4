"""The capture in the two-node lab with agents and tunnels (`lab_with_agents(..., mesh=True)`): real
connections between pods, from the node and inside a pod show which rule each one took.

Evidence is read from the kernel's rule counters in the pod (`rule_counters`: the nat REDIRECT rules
count each connection they capture), the answer of the echo app (which peer address it saw) and the
tunnel's admin dump (its HBONE pools). Every test installs the capture it needs and removes it.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from nodeagent.kernel.netfilter import detect_backend
from nodeagent.kernel.netns import in_netns
from nodeagent.lab import lab as labs
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables.apply import (
    apply_capture,
    apply_probe_snat,
    live_state,
    remove_capture,
    remove_probe_snat,
    rule_counters,
)
from nodeagent.mesh.iptables.render import PROBE_ADDRESS, TUNNEL_MARK
from tests.support.agent_labs import lab_with_agents
from tests.support.tunnel import admin_dump

pytestmark = pytest.mark.root

OUT = "--to-ports 15001"
IN_PLAIN = "--to-ports 15006"
PROBE = f"-A NODEAGENT_PRERT -s {PROBE_ADDRESS}/32 -p tcp -m tcp -j ACCEPT"
LOOPBACK = "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT"
IP_TRANSPARENT = 19


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    # The tunnels serve every enrolled pod on their own; the agents capture nothing (these tests do).
    with lab_with_agents(tmp_path_factory.mktemp("redirect"), "", "iptables", mesh=True, capture=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def backend(lab: labs.Lab) -> str:
    """The node's backend, used in its pods too (as Istio's CNI agent does)."""
    return detect_backend(lab.plan.node("node1").netns)


def path(lab: labs.Lab, pod: str) -> str:
    return f"/run/netns/{lab.plan.pod(pod).netns}"


def node_path(lab: labs.Lab, node: str) -> str:
    return f"/run/netns/{lab.plan.node(node).netns}"


def ip(lab: labs.Lab, pod: str) -> str:
    return str(lab.plan.pod(pod).pod.ip)


@contextmanager
def captured(lab: labs.Lab, backend: str, *pods: str) -> Iterator[None]:
    """The capture installed in `pods` for the block, removed afterwards (also on failure)."""
    try:
        for pod in pods:
            assert apply_capture(path(lab, pod), backend=backend, pod=pod).status is CaptureStatus.INSTALLED
        yield
    finally:
        for pod in pods:
            remove_capture(path(lab, pod), backend=backend, pod=pod)


def request(netns: str, host: str, port: int, *, udp: bool = False, make: Callable[[], socket.socket] | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    """One request to the echo app from a socket created inside `netns` (never from the root namespace)."""
    def new() -> socket.socket:
        sock = make() if make else socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        sock.settimeout(timeout)
        return sock

    with in_netns(netns, new) as sock:
        sock.connect((host, port))
        sock.sendall(b"ping\n")
        data = sock.recv(65535) if udp else sock.makefile("rb").readline()
    answer: dict[str, Any] = json.loads(data)
    return answer


def counts(lab: labs.Lab, pod: str, backend: str) -> dict[str, int]:
    found = rule_counters(path(lab, pod), backend=backend, table="nat")
    return {"out": _match(found, OUT), "in": _match(found, IN_PLAIN), "probe": found.get(PROBE, 0),
            "lo": found.get(LOOPBACK, 0)}


def _match(found: dict[str, int], needle: str) -> int:
    return sum(n for rule, n in found.items() if needle in rule)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def peer_ip(answer: dict[str, Any]) -> str:
    return str(answer["peer"]).rsplit(":", 1)[0]


def pools_of(lab: labs.Lab, node: str, pod_ip: str) -> list[dict[str, Any]]:
    return next(p for p in admin_dump(lab, node)["pods"] if p["ip"] == pod_ip)["pools"]  # type: ignore[no-any-return]


def test_outbound_of_a_captured_client_goes_through_both_tunnels_over_hbone(lab: labs.Lab, backend: str) -> None:
    with captured(lab, backend, "demo/client", "demo/echo-1"):
        client, server = counts(lab, "demo/client", backend), counts(lab, "demo/echo-1", backend)
        answer = request(path(lab, "demo/client"), ip(lab, "demo/echo-1"), 8080)
        assert answer["pod"] == "demo/echo-1"
        # one capture in the client: the tunnel's own connection (mark 0x539) was not captured again
        assert delta(client, counts(lab, "demo/client", backend))["out"] == 1
        # the server side came in on 15008 (HBONE), which the inbound REDIRECT leaves alone
        assert delta(server, counts(lab, "demo/echo-1", backend)) == {"out": 0, "in": 0, "probe": 0, "lo": 1}
        assert f"{ip(lab, 'demo/echo-1')}:15008" in {p["peer"] for p in pools_of(lab, "node1", ip(lab, "demo/client"))}


def test_plaintext_inbound_to_a_captured_server_goes_through_15006(lab: labs.Lab, backend: str) -> None:
    with captured(lab, backend, "demo/echo-1"):
        before = counts(lab, "demo/echo-1", backend)
        answer = request(path(lab, "demo/client"), ip(lab, "demo/echo-1"), 8080)  # client not captured
        assert answer["pod"] == "demo/echo-1"
        assert delta(before, counts(lab, "demo/echo-1", backend))["in"] == 1
        # the tunnel connected to the app from inside the pod (its transparent connect is not wired yet)
        assert peer_ip(answer) == ip(lab, "demo/echo-1")


def test_passthrough_to_a_destination_outside_the_mesh_is_not_looped(lab: labs.Lab, backend: str) -> None:
    node2 = str(lab.plan.node("node2").node.address)
    with captured(lab, backend, "demo/client"):
        before = counts(lab, "demo/client", backend)

        def get() -> socket.socket:
            return socket.socket()

        with in_netns(path(lab, "demo/client"), get) as sock:  # node2's agent /healthz: not a mesh workload
            sock.settimeout(5)
            sock.connect((node2, 10256))
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            reply = sock.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.") and b"lastUpdated" in reply
        assert delta(before, counts(lab, "demo/client", backend))["out"] == 1, "captured once, the tunnel's dial not"


def test_loopback_inside_a_captured_pod_is_not_captured(lab: labs.Lab, backend: str) -> None:
    with captured(lab, backend, "demo/echo-0"):
        before = counts(lab, "demo/echo-0", backend)
        local = request(path(lab, "demo/echo-0"), "127.0.0.1", 8080)
        itself = request(path(lab, "demo/echo-0"), ip(lab, "demo/echo-0"), 8080)
        assert peer_ip(local) == "127.0.0.1"
        assert peer_ip(itself) == ip(lab, "demo/echo-0")
        assert delta(before, counts(lab, "demo/echo-0", backend)) == {"out": 0, "in": 0, "probe": 0, "lo": 1}


def test_udp_is_not_captured(lab: labs.Lab, backend: str) -> None:
    with captured(lab, backend, "demo/client", "demo/echo-1"):
        client, server = counts(lab, "demo/client", backend), counts(lab, "demo/echo-1", backend)
        answer = request(path(lab, "demo/client"), ip(lab, "demo/echo-1"), 8081, udp=True)
        assert answer["proto"] == "udp" and peer_ip(answer) == ip(lab, "demo/client")
        assert delta(client, counts(lab, "demo/client", backend))["out"] == 0
        assert delta(server, counts(lab, "demo/echo-1", backend))["in"] == 0


def test_a_probe_from_the_node_reaches_the_app_uncaptured(lab: labs.Lab, backend: str) -> None:
    node1 = node_path(lab, "node1")
    local_pods = [str(p.pod.ip) for p in lab.plan.pods if p.pod.node == "node1"]
    with captured(lab, backend, "demo/echo-0"):
        before = counts(lab, "demo/echo-0", backend)
        unprotected = request(node1, ip(lab, "demo/echo-0"), 8080)
        assert delta(before, counts(lab, "demo/echo-0", backend))["in"] == 1, "without the SNAT a probe is captured"
        assert peer_ip(unprotected) == ip(lab, "demo/echo-0")
        try:
            assert apply_probe_snat(node1, local_pods, backend=backend).status is CaptureStatus.INSTALLED
            before = counts(lab, "demo/echo-0", backend)
            probe = request(node1, ip(lab, "demo/echo-0"), 8080)
            assert peer_ip(probe) == PROBE_ADDRESS
            assert delta(before, counts(lab, "demo/echo-0", backend)) == {"out": 0, "in": 0, "probe": 1, "lo": 0}
        finally:
            assert remove_probe_snat(node1, backend=backend).status is CaptureStatus.ABSENT
    # forwarded traffic keeps its source: pod -> pod across the node is not a probe
    with captured(lab, backend, "demo/echo-0"):
        assert apply_probe_snat(node1, local_pods, backend=backend).status is CaptureStatus.INSTALLED
        try:
            before = counts(lab, "demo/echo-0", backend)
            request(path(lab, "demo/echo-1"), ip(lab, "demo/echo-0"), 8080)
            assert delta(before, counts(lab, "demo/echo-0", backend))["in"] == 1
        finally:
            remove_probe_snat(node1, backend=backend)


def test_removal_restores_direct_connections(lab: labs.Lab, backend: str) -> None:
    with captured(lab, backend, "demo/client", "demo/echo-1"):
        assert peer_ip(request(path(lab, "demo/client"), ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/echo-1")
    for pod in ("demo/client", "demo/echo-1"):
        assert live_state(path(lab, pod), backend=backend).status is CaptureStatus.ABSENT
        assert rule_counters(path(lab, pod), backend=backend, table="nat") == {}
    answer = request(path(lab, "demo/client"), ip(lab, "demo/echo-1"), 8080)
    assert peer_ip(answer) == ip(lab, "demo/client"), "direct again: the app sees the client"


def test_a_hand_deleted_rule_is_drift_and_repaired(lab: labs.Lab, backend: str) -> None:
    client = path(lab, "demo/client")
    with captured(lab, backend, "demo/client"):
        subprocess.run(["nsenter", f"--net={client}", f"iptables-{backend}", "-t", "nat", "-D", "NODEAGENT_OUTPUT",
                        "!", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "mark", "!", "--mark", "0x539/0xfff",
                        "-j", "REDIRECT", "--to-ports", "15001"], check=True)
        state = live_state(client, backend=backend)
        assert state.status is CaptureStatus.DRIFTED
        assert state.missing == ("nat: -A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
                                 "-j REDIRECT --to-ports 15001",)
        assert peer_ip(request(client, ip(lab, "demo/echo-1"), 8080)) == ip(lab, "demo/client"), "not captured now"
        assert apply_capture(client, backend=backend, pod="demo/client").status is CaptureStatus.INSTALLED
        before = counts(lab, "demo/client", backend)
        request(client, ip(lab, "demo/echo-1"), 8080)
        assert delta(before, counts(lab, "demo/client", backend))["out"] == 1


def test_a_vanished_pod_namespace_is_netns_missing(lab: labs.Lab, backend: str) -> None:
    gone = f"/run/netns/{lab.record.name}-pod-demo.deleted"
    assert live_state(gone, backend=backend).status is CaptureStatus.NETNS_MISSING
    assert apply_capture(gone, backend=backend, pod="demo/deleted").status is CaptureStatus.NETNS_MISSING
    assert remove_capture(gone, backend=backend, pod="demo/deleted").status is CaptureStatus.NETNS_MISSING


def test_the_rules_deliver_a_transparent_connection_from_the_client_address(lab: labs.Lab, backend: str) -> None:
    """What the tunnel's inbound does (end to end in test_mesh_lab.py), done by hand inside the captured
    server pod: the app sees the client's address and its replies come back."""
    client_ip = ip(lab, "demo/client")

    def transparent() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
        sock.bind((client_ip, 0))
        return sock

    with captured(lab, backend, "demo/echo-1"):
        before = counts(lab, "demo/echo-1", backend)
        answer = request(path(lab, "demo/echo-1"), ip(lab, "demo/echo-1"), 8080, make=transparent)
        assert peer_ip(answer) == client_ip
        assert delta(before, counts(lab, "demo/echo-1", backend))["in"] == 0


def test_cleanup_removes_the_capture_from_every_pod_and_the_probe_snat(lab: labs.Lab, backend: str) -> None:
    from click.testing import CliRunner

    from nodeagent.cli import main

    pods = ("demo/client", "demo/echo-0")
    for pod in pods:
        assert apply_capture(path(lab, pod), backend=backend, pod=pod).status is CaptureStatus.INSTALLED
    apply_probe_snat(node_path(lab, "node1"), [ip(lab, "demo/echo-0")], backend=backend)
    result = CliRunner().invoke(main, ["cleanup", "--iptables-backend", backend, "--netns",
                                       lab.plan.node("node1").netns, "--pod-netns-prefix", f"{lab.record.name}-pod-",
                                       "--bpf-scope", f"{lab.record.name}-none"])
    assert result.exit_code == 0, result.output
    for pod in pods:
        assert f"mesh capture in {path(lab, pod)}" in result.output
        assert live_state(path(lab, pod), backend=backend).status is CaptureStatus.ABSENT
    assert "NODEAGENT" not in subprocess.run(["ip", "netns", "exec", lab.plan.node("node1").netns,
                                              f"iptables-{backend}-save", "-t", "nat"],
                                             capture_output=True, text=True, check=True).stdout
