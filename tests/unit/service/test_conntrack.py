"""Stale UDP conntrack flows decided against the kernel's table: kube-proxy's `pkg/proxy/conntrack/cleanup_test.go`
cases (`TestCleanStaleEntries`, `TestServiceWithoutEndpoints`), `ConntrackCleanupRequired`, and the reconciler's
bookkeeping with a fake table (no root)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.errors import NodeAgentError
from nodeagent.kernel.conntrack import Flow
from nodeagent.service.conntrack import ConntrackReconciler, Filter, cleanup_required, stale_filters
from tests.support.services import ep, service, slice_, snapshot_of

CLUSTER_IP, EXTERNAL_IP, LB_IP = "172.30.1.1", "192.168.99.100", "1.2.3.4"
SERVING, NOT_SERVING, DELETED = "10.240.0.4", "10.240.1.5", "10.240.2.6"
NODE_IP = "10.0.0.10"  # (kube-proxy's mock NodePort flows carry no destination address; any address will do)
SERVICE_PORT, OTHER_PORT, NODE_PORT = 8000, 3000, 32000


def cleanup_objects() -> list[dict[str, Any]]:
    """kube-proxy's test Service: TCP, UDP and SCTP on 8000 (UDP and SCTP with NodePort 32000), a cluster IP, an
    external IP and a load-balancer IP; one serving endpoint and one that is not."""
    ports = [{"name": f"test-{p.lower()}", "port": SERVICE_PORT, "protocol": p, "targetPort": SERVICE_PORT,
              "nodePort": NODE_PORT} for p in ("TCP", "UDP", "SCTP")]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cleanup-test", "namespace": "test"},
           "spec": {"type": "LoadBalancer", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                    "externalIPs": [EXTERNAL_IP], "ports": ports},
           "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "cleanup-test-1", "namespace": "test",
                        "labels": {"kubernetes.io/service-name": "cleanup-test"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": [SERVING], "conditions": {"serving": True}},
                         {"addresses": [NOT_SERVING], "conditions": {"serving": False, "ready": False}}],
           "ports": [{"name": f"test-{p.lower()}", "port": SERVICE_PORT, "protocol": p}
                     for p in ("TCP", "UDP", "SCTP")]}
    return [svc, eps]


def flow(protocol: str, orig_dst: str, orig_port: int, reply_src: str, reply_port: int) -> Flow:
    return Flow(protocol, ip_address(orig_dst), orig_port, ip_address(reply_src), reply_port)


def cleanup_flows() -> list[Flow]:
    """kube-proxy's flows: NATed to each endpoint (and a deleted one), per protocol, to each Service address on the
    Service port and another, and to the NodePort; plus UDP flows that were never NATed (recorded while the
    Service rejected)."""
    flows = []
    for dnat in (SERVING, NOT_SERVING, DELETED):
        for protocol in ("tcp", "udp", "sctp"):
            for address in (CLUSTER_IP, LB_IP, EXTERNAL_IP):
                for port in (SERVICE_PORT, OTHER_PORT):
                    flows.append(flow(protocol, address, port, dnat, SERVICE_PORT))
            flows.append(flow(protocol, NODE_IP, NODE_PORT, dnat, SERVICE_PORT))
    for address in (CLUSTER_IP, LB_IP, EXTERNAL_IP):
        for port in (SERVICE_PORT, OTHER_PORT):
            flows.append(flow("udp", address, port, address, port))
    return flows


@dataclass
class FakeTable:
    """A conntrack table: deleting applies the filter to the flows, as the kernel side does."""

    entries: list[Flow]
    deletions: list[Filter] = field(default_factory=list)
    fail_listing: bool = False

    def flows(self, family: int, protocol: str = "udp") -> Iterator[Flow]:
        if self.fail_listing:
            raise NodeAgentError("conntrack -L: Interrupted system call")
        yield from (f for f in self.entries if f.protocol == protocol and f.orig_dst.version == family)

    def delete(self, family: int, match: Filter) -> int:
        self.deletions.append(match)
        kept = [f for f in self.entries if not match.matches(f)]
        deleted, self.entries = len(self.entries) - len(kept), kept
        return deleted


def test_clean_stale_entries() -> None:
    """TestCleanStaleEntries: UDP flows to the Service port NATed to anything but a serving endpoint go (the
    non-serving one, the deleted one, and never NATed), on each Service address and the NodePort; TCP, SCTP and
    other ports stay."""
    snapshot = snapshot_of(*cleanup_objects())
    before = cleanup_flows()
    table = FakeTable(list(before))
    reconciler = ConntrackReconciler(table)
    result = reconciler.after_sync(snapshot.service_ports, snapshot.endpoints, set())
    assert result is not None and result.complete
    expected_gone = {f for f in before if f.protocol == "udp" and (
        (f.orig_dst_port == SERVICE_PORT and str(f.reply_src) != SERVING)
        or (f.orig_dst_port == NODE_PORT and str(f.reply_src) != SERVING))}
    assert len(expected_gone) == 11
    assert sorted(map(str, table.entries)) == sorted(str(f) for f in before if f not in expected_gone)
    assert result.deleted == reconciler.deleted_total == len(before) - len(table.entries) == 11
    assert result.ip_family == "IPv4"
    nodeport_filters = [m for m in result.filters if m.orig_dst is None]
    assert nodeport_filters == [Filter(None, NODE_PORT, ip_address(ip), SERVICE_PORT) for ip in (NOT_SERVING, DELETED)]


def test_flows_are_compared_by_address_and_port() -> None:
    """The newest reconciler compares the reply source `ip:port` with the endpoint's: a flow NATed to the serving
    endpoint's address on another port (the endpoint was renumbered) is stale too."""
    snapshot = snapshot_of(*cleanup_objects())
    renumbered = flow("udp", CLUSTER_IP, SERVICE_PORT, SERVING, 8001)
    current = flow("udp", CLUSTER_IP, SERVICE_PORT, SERVING, SERVICE_PORT)
    assert stale_filters(snapshot.service_ports, snapshot.endpoints, [renumbered, current]) == [
        Filter(ip_address(CLUSTER_IP), SERVICE_PORT, ip_address(SERVING), 8001)]


def test_one_filter_per_stale_service_address_and_backend() -> None:
    """Many clients of one stale backend make one deletion (each `conntrack -D` is a process)."""
    snapshot = snapshot_of(*cleanup_objects())
    flows = [Flow("udp", ip_address(CLUSTER_IP), SERVICE_PORT, ip_address(DELETED), SERVICE_PORT)] * 50
    assert stale_filters(snapshot.service_ports, snapshot.endpoints, flows) == [
        Filter(ip_address(CLUSTER_IP), SERVICE_PORT, ip_address(DELETED), SERVICE_PORT)]


def test_service_without_endpoints() -> None:
    """TestServiceWithoutEndpoints: a UDP Service with no endpoints has nothing stale (its flows were rejected)."""
    snapshot = snapshot_of(service("test", "no-endpoints", CLUSTER_IP, protocol="UDP", port=53))
    flows = [flow("udp", CLUSTER_IP, 53, DELETED, 53), flow("udp", CLUSTER_IP, 53, CLUSTER_IP, 53)]
    table = FakeTable(list(flows))
    result = ConntrackReconciler(table).after_sync(snapshot.service_ports, snapshot.endpoints, set())
    assert result is not None and result.deleted == 0 and table.entries == flows and not table.deletions


def test_terminating_but_serving_endpoints_keep_their_flows() -> None:
    snapshot = snapshot_of(service("test", "dns", CLUSTER_IP, protocol="UDP", port=53),
                           slice_("test", "dns", ep(SERVING, ready=False, serving=True, terminating=True),
                                  port=53, protocol="UDP"))
    assert stale_filters(snapshot.service_ports, snapshot.endpoints, [flow("udp", CLUSTER_IP, 53, SERVING, 53)]) == []


def test_flows_of_the_other_family_are_not_compared() -> None:
    snapshot = snapshot_of(service("test", "dns", CLUSTER_IP, protocol="UDP", port=53),
                           slice_("test", "dns", ep(SERVING), port=53, protocol="UDP"))
    stale = flow("udp", CLUSTER_IP, 53, DELETED, 53)
    assert stale_filters(snapshot.service_ports, snapshot.endpoints, [stale], family=6) == []


def udp_dns(*ips: str) -> Any:
    return snapshot_of(service("test", "dns", CLUSTER_IP, protocol="UDP", port=53),
                       slice_("test", "dns", *(ep(ip) for ip in ips), port=53, protocol="UDP"))


def test_cleanup_required_when_a_changed_service_has_udp_endpoints_before_or_after() -> None:
    """ConntrackCleanupRequired (TestUpdateEndpointsMap): every change of a UDP Service's endpoints."""
    empty, one, two = udp_dns(), udp_dns(SERVING), udp_dns(SERVING, DELETED)
    tcp = snapshot_of(service("test", "web", CLUSTER_IP), slice_("test", "web", ep(SERVING)))
    changed = {ObjectRef(Kind.SERVICE, "test", "dns")}
    assert cleanup_required(empty.endpoints, one.endpoints, changed), "add an endpoint"
    assert cleanup_required(two.endpoints, one.endpoints, changed), "remove an endpoint"
    assert cleanup_required(one.endpoints, empty.endpoints, changed), "remove the last endpoint"
    assert not cleanup_required(one.endpoints, two.endpoints, set()), "the Service did not change"
    assert not cleanup_required(empty.endpoints, empty.endpoints, changed), "no endpoints before or after"
    assert not cleanup_required({}, tcp.endpoints, {ObjectRef(Kind.SERVICE, "test", "web")}), "TCP"


def test_flows_to_a_removed_endpoint_and_of_a_revived_service_go_after_the_change() -> None:
    """What the proxier's snapshot diff did before the reconciler replaced it: when an endpoint of a UDP NodePort
    Service goes, its flows on the cluster IP and on the NodePort are deleted, the remaining endpoint's stay;
    when a Service that rejected gets an endpoint, the flows recorded while it rejected (never NATed) go; a sync
    that did not change the Service deletes nothing."""
    dns = ObjectRef(Kind.SERVICE, "test", "dns")

    def nodeport_dns(*ips: str) -> Any:
        return snapshot_of(service("test", "dns", CLUSTER_IP, protocol="UDP", port=53, type_="NodePort",
                                   node_port=30053),
                           slice_("test", "dns", *(ep(ip) for ip in ips), port=53, protocol="UDP"))

    two, one = nodeport_dns(SERVING, DELETED), nodeport_dns(SERVING)
    live = [flow("udp", CLUSTER_IP, 53, SERVING, 53), flow("udp", NODE_IP, 30053, SERVING, 53)]
    table = FakeTable([*live])
    reconciler = ConntrackReconciler(table)
    assert reconciler.after_sync(two.service_ports, two.endpoints, set()) is not None  # (the first pass)
    table.entries += [flow("udp", CLUSTER_IP, 53, DELETED, 53), flow("udp", NODE_IP, 30053, DELETED, 53)]
    assert reconciler.after_sync(one.service_ports, one.endpoints, set()) is None, "the Service did not change"
    result = reconciler.after_sync(one.service_ports, one.endpoints, {dns})
    assert result is not None and result.deleted == 2 and table.entries == live
    assert set(result.filters) == {Filter(ip_address(CLUSTER_IP), 53, ip_address(DELETED), 53),
                                   Filter(None, 30053, ip_address(DELETED), 53)}
    rejected = flow("udp", CLUSTER_IP, 53, CLUSTER_IP, 53)
    table.entries = [rejected]
    empty = nodeport_dns()
    assert reconciler.after_sync(empty.service_ports, empty.endpoints, {dns}) is not None
    assert table.entries == [rejected], "while the Service rejects, its flows are not stale"
    result = reconciler.after_sync(one.service_ports, one.endpoints, {dns})
    assert result is not None and result.deleted == 1 and table.entries == []


def test_the_reconciler_runs_first_then_on_udp_changes_and_again_after_a_failure() -> None:
    """After a restart every flow may be stale (the first sync reconciles whatever changed); afterwards only a
    UDP endpoint change does, and a failed pass is repeated at the next sync."""
    dns = ObjectRef(Kind.SERVICE, "test", "dns")
    table = FakeTable([flow("udp", CLUSTER_IP, 53, DELETED, 53), flow("udp", CLUSTER_IP, 53, SERVING, 53)])
    seen: list[int] = []
    reconciler = ConntrackReconciler(table, observers=[lambda r: seen.append(r.deleted)])
    one, two = udp_dns(SERVING), udp_dns(SERVING, DELETED)
    first = reconciler.after_sync(one.service_ports, one.endpoints, set())
    assert first is not None and first.deleted == 1, "the first sync reconciles even with nothing changed"
    assert reconciler.after_sync(one.service_ports, one.endpoints, set()) is None
    table.entries.append(flow("udp", CLUSTER_IP, 53, DELETED, 53))
    assert reconciler.after_sync(two.service_ports, two.endpoints, {dns}) is not None  # DELETED serves again
    assert len(table.entries) == 2
    table.fail_listing = True
    failed = reconciler.after_sync(one.service_ports, one.endpoints, {dns})
    assert failed is not None and not failed.complete and failed.deleted == 0
    table.fail_listing = False
    retried = reconciler.after_sync(one.service_ports, one.endpoints, set())
    assert retried is not None and retried.complete and retried.deleted == 1
    assert seen == [1, 0, 0, 1] and reconciler.deleted_total == 2
    assert reconciler.after_sync(one.service_ports, one.endpoints, set()) is None
