"""The mesh over IPv6 in a dual-stack lab: agents on the lab's Kubernetes API enroll the demo pods (iptables capture
in both families, or eBPF capture with connect6), the tunnels carry a dual-stack Service reached over each of its
cluster IPs and a pod reached at its IPv6 address, over HBONE, each in the family the client asked in.

One lab (the default one plus `DUAL_STACK_CONFIG` and a PreferDualStack Service) per capture mode, as
tests/integration/test_mesh_lab.py, its tunnels with two workers each; the client pod is on node1, the echo
pods on node1 and node2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from nodeagent.lab import lab as labs
from nodeagent.lab.agents import captured
from nodeagent.lab.demo import request_from
from nodeagent.lab.manifests import DUAL_STACK_CONFIG
from tests.integration.conftest import wait_for
from tests.support.agent_labs import OUTSIDER, lab_with_agents, unserved_resolver
from tests.support.netns import netns_run
from tests.support.tunnel import admin_dump, ask_dns, metrics, sample

pytestmark = pytest.mark.root

EXTRA = DUAL_STACK_CONFIG + """---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: demo}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
""" + OUTSIDER


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[labs.Lab]:
    # Two tunnel workers per node: every listener exists once per family in each worker (SO_REUSEPORT).
    with lab_with_agents(tmp_path_factory.mktemp("mesh6"), EXTRA, mode, mesh=True, tunnel_workers=2) as built:
        yield built


def cluster_ips(lab: labs.Lab, service: str) -> list[str]:
    for doc in lab.topology.documents:
        if doc["kind"] == "Service" and doc["metadata"]["name"] == service:
            return list(doc["spec"]["clusterIPs"])
    raise AssertionError(f"no Service {service}")


def target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def peer_ip(answer: dict[str, str]) -> str:
    return answer["peer"].rpartition(":")[0].strip("[]")


def expected_peer(lab: labs.Lab, mode: str, client: str, server: str, family: int) -> str:
    """Who the app sees: the client's address of the family (iptables mode: the tunnel connects transparently,
    the capture's policy routing in both families makes it possible), or in eBPF mode the server pod's own
    address of the family (no such routing), as tests/integration/test_mesh_lab.py."""
    pod = lab.plan.pod(client if mode == "iptables" else server).pod
    return str(pod.ip6 if family == 6 else pod.ip)


def mtls_out(lab: labs.Lab) -> float:
    """Connections node1's tunnel opened for its pods over HBONE (mTLS), so far."""
    return sample(metrics(lab, "node1"), "istio_tcp_connections_opened_total", reporter="source",
                  connection_security_policy="mutual_tls")


def test_the_pods_are_captured_in_both_families(lab: labs.Lab) -> None:
    for pod in ("demo/client", "demo/echo-0", "demo/echo-1"):
        assert captured(lab, pod), pod
    assert lab.plan.pod("demo/client").pod.ip6 is not None


def test_a_dual_stack_service_is_carried_by_the_mesh_over_both_families(lab: labs.Lab, mode: str) -> None:
    ipv4, ipv6 = cluster_ips(lab, "dual")
    assert ":" not in ipv4 and ":" in ipv6
    for vip, family in ((ipv6, 6), (ipv4, 4)):
        before = mtls_out(lab)
        answers = [request_from(lab, "demo/client", target(vip, 80)) for _ in range(12)]
        seen = Counter(a["pod"] for a in answers)
        # echo-1 is on node2: across the fabric, through both tunnels
        assert set(seen) == {"demo/echo-0", "demo/echo-1"}, (vip, seen)
        # the app is reached in the family the client asked in
        for answer in answers:
            assert peer_ip(answer) == expected_peer(lab, mode, "demo/client", answer["pod"], family), (vip, answer)
        assert mtls_out(lab) - before >= len(answers), f"{vip}: not every connection went over HBONE"


def test_a_pod_reached_at_its_ipv6_address_across_nodes(lab: labs.Lab, mode: str) -> None:
    server = lab.plan.pod("demo/echo-1").pod
    before = mtls_out(lab)
    answer = request_from(lab, "demo/client", target(str(server.ip6), 8080))
    assert answer["pod"] == "demo/echo-1"
    assert peer_ip(answer) == expected_peer(lab, mode, "demo/client", "demo/echo-1", 6)
    assert mtls_out(lab) - before >= 1


def test_plaintext_to_a_pods_ipv6_address_is_captured_inbound(lab: labs.Lab, mode: str) -> None:
    """A client outside the mesh (plain/outsider, node1) dials echo-1's IPv6 address: the capture on echo-1's side
    (ip6tables' REDIRECT, or the tc program's IPv6 branch) hands it to node2's tunnel on 15006, which carries it
    to the app as plaintext (PERMISSIVE by default) and counts it."""
    server = lab.plan.pod("demo/echo-1").pod

    def plaintext_in() -> float:
        return sample(metrics(lab, "node2"), "istio_tcp_connections_opened_total", reporter="destination",
                      connection_security_policy="none")

    before = plaintext_in()
    answer = request_from(lab, "plain/outsider", target(str(server.ip6), 8080))
    assert answer["pod"] == "demo/echo-1"
    assert plaintext_in() - before >= 1, "the IPv6 connection reached the app around the tunnel"


def test_dns_to_an_ipv6_resolver_is_answered_by_the_tunnels_proxy(lab: labs.Lab) -> None:
    """ip6tables' RedirectDNS rules, or the eBPF capture's sendmsg6/connect6/recvmsg6: a question to an IPv6
    resolver nothing serves gets the dual-stack Service's IPv6 address from the node tunnel, from the address
    asked, over UDP (unconnected and connected) and TCP."""
    resolver = unserved_resolver(lab, 6)
    address6 = next(ip for ip in cluster_ips(lab, "dual") if ":" in ip)
    answers = ask_dns(lab, "demo/client", "dual.demo.svc.cluster.local.", resolver, rdtype="AAAA")
    assert answers == {"udp": ["NOERROR", [address6]], "udp-connected": ["NOERROR", [address6], f"{resolver}:53"],
                       "tcp": ["NOERROR", [address6]]}


def test_an_excluded_ipv6_range_is_left_uncaptured(lab: labs.Lab) -> None:
    """Istio's excludeOutboundIPRanges with an IPv6 range: ip6tables' RETURN, or the eBPF capture's IPv6 ranges
    in nm_config: connections to it go direct (no HBONE); the rest of the pod's IPv6 traffic stays captured."""
    server = lab.plan.pod("demo/echo-1").pod
    excluded = target(str(server.ip6), 8080)

    def hbone_for_one_request(to: str) -> bool:
        before = mtls_out(lab)
        assert request_from(lab, "demo/client", to)["pod"] == "demo/echo-1"
        return mtls_out(lab) > before

    annotation = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
    labs.kubectl(lab.record.name, ["annotate", "pod", "client", "-n", "demo", "--overwrite",
                                   f"{annotation}={server.ip6}/128"], capture=True)
    try:
        wait_for(lambda: not hbone_for_one_request(excluded), "the excluded IPv6 address reached directly", 30)
        assert hbone_for_one_request(target(str(server.ip), 8080)), "IPv4 to the same pod is still captured"
    finally:
        labs.kubectl(lab.record.name, ["annotate", "pod", "client", "-n", "demo", f"{annotation}-"], capture=True)
    wait_for(lambda: hbone_for_one_request(excluded), "captured again once the annotation is gone", 30)


def test_both_tunnel_workers_listen_and_carry_connections_over_ipv6(lab: labs.Lab) -> None:
    """Each worker holds its own IPv6 listeners in a served pod (SO_REUSEPORT, per family), and the kernel spreads
    the client's IPv6 connections over both."""
    client = lab.plan.pod("demo/client")
    workers = {w["pid"] for w in admin_dump(lab, "node1")["workers"]}
    assert len(workers) == 2
    for port in (15001, 15006, 15008):
        out = netns_run(client.netns, "ss", "-H6ltnp", f"sport = :{port}")
        pids = {int(part.split("=", 1)[1]) for line in out.splitlines()
                for part in line.replace(",", " ").split() if part.startswith("pid=")}
        assert pids == workers, (port, out)
    before = {w["worker"]: w["connections_opened"] for w in admin_dump(lab, "node1")["workers"]}
    server = target(str(lab.plan.pod("demo/echo-1").pod.ip6), 8080)
    assert all(request_from(lab, "demo/client", server)["pod"] == "demo/echo-1" for _ in range(24))
    carried = {w["worker"]: w["connections_opened"] - before[w["worker"]] for w in admin_dump(lab, "node1")["workers"]}
    assert all(count > 0 for count in carried.values()) and sum(carried.values()) >= 24, carried
