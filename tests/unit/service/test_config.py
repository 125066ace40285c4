"""`--nodeport-addresses primary` when the Services arrive before this node's Node object: kube-proxy resolves
`primary` against the node's IPs (cmd/kube-proxy/app/server.go: the node IP of each family, loopback skipped), and
it waits for the Node before it programs anything. Services known first must therefore get NodePort rules on no
address until the Node's InternalIP is known, then on that address, and follow it when it changes.

Driven through the change tracker (the events in the order a watch delivers them), `proxy_config` and the
iptables renderer, as the agent's sync does.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Upserted
from nodeagent.cluster.model import Kind
from nodeagent.observability.service_health import Listen, ServiceName
from nodeagent.service.config import ProxyConfig, ProxySettings, base_families, proxy_config, served_families
from nodeagent.service.ebpf.desired import plan
from nodeagent.service.healthcheck import health_check_ports, listen_hosts
from nodeagent.service.iptables.render import render
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support import objects as k8s
from tests.support.events import listed
from tests.support.services import ep, service, slice_

NODE = "test-node"
PRIMARY = ProxySettings(nodeport_primary=True)
# the agent's interfaces: loopback, the node's address before and after a renumbering, a pod bridge, a second NIC
INTERFACES = tuple(ipaddress.ip_address(ip) for ip in (
    "127.0.0.1", "::1", "192.168.0.2", "192.168.0.9", "10.244.1.1", "172.16.5.5"))
NODEPORTS_TAIL = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\""


def lb_local() -> dict[str, Any]:
    """A NodePort-bearing LoadBalancer with a local policy (its health check listener follows the same addresses)."""
    return service("ns1", "lb", "172.30.0.41", type_="LoadBalancer", node_port=3001, externalTrafficPolicy="Local",
                   healthCheckNodePort=32001)


def upserted(raw: dict[str, Any]) -> Upserted:
    return Upserted(Kind.NODE, object_ref(raw), decode(raw))


@pytest.fixture
def tracker() -> ChangeTracker:
    """Services and EndpointSlices listed, and the Node kind listed without this node (not registered yet)."""
    made = ChangeTracker(NODE)
    made.apply_all([listed(Kind.SERVICE, [lb_local()]),
                    listed(Kind.ENDPOINT_SLICE, [slice_("ns1", "lb", ep("10.180.0.1", node=NODE))]),
                    listed(Kind.NODE, [])])
    return made


def sync(tracker: ChangeTracker) -> tuple[Snapshot, ProxyConfig]:
    """What the agent's sync computes: the next snapshot (or the last one) and the configuration from it."""
    snapshot = tracker.snapshot() or tracker.last()
    assert snapshot is not None
    return snapshot, proxy_config(NODE, PRIMARY, snapshot, INTERFACES)


def nodeport_jumps(snapshot: Snapshot, config: ProxyConfig) -> list[str]:
    """The rules that send traffic to KUBE-NODEPORTS (which addresses NodePorts answer on)."""
    text = render(snapshot.service_ports, snapshot.endpoints, config).text()
    nat = text.split("*nat", 1)[1].splitlines()
    return [line.replace(f" {NODEPORTS_TAIL}", "") for line in nat
            if line.startswith("-A KUBE-SERVICES") and "KUBE-NODEPORTS" in line]


def ebpf_nodeport_frontends(snapshot: Snapshot, config: ProxyConfig) -> set[str]:
    """The addresses the eBPF datapath serves the NodePort on (its node IPs as the eBPF proxier derives them)."""
    node_ips = config.nodeport_ips if config.nodeport_ips is not None else (
        (config.node_ip,) if config.node_ip is not None else ())
    entries = plan(snapshot.service_ports, snapshot.endpoints, node_ips=node_ips).entries
    return {frontend.ip for frontend in entries if frontend.port == 3001}


def test_before_the_node_is_known_nodeports_answer_on_no_address(tracker: ChangeTracker) -> None:
    snapshot, config = sync(tracker)
    assert snapshot.node is None and snapshot.service_ports, "the Service is known, the Node is not"
    assert config.nodeport_ips == (), "`primary` is the node IP: unknown yet, so no address (not every address)"
    assert not config.localhost_nodeports_enabled, "127.0.0.1 is never the node's primary IP"
    assert nodeport_jumps(snapshot, config) == []
    assert ebpf_nodeport_frontends(snapshot, config) == set()
    assert listen_hosts(config.nodeport_ips) == ()
    # the health check listener follows the same addresses: none yet
    assert health_check_ports(snapshot.service_ports.values(), config.nodeport_ips) == {
        ServiceName("ns1", "lb"): Listen(32001, ())}


def test_the_rules_follow_the_nodes_internal_ip_when_it_appears_and_when_it_changes(tracker: ChangeTracker) -> None:
    sync(tracker)
    tracker.apply(upserted(k8s.node(NODE, "192.168.0.2", "10.244.1.0/24")))
    snapshot, config = sync(tracker)
    assert config.nodeport_ips == (ipaddress.ip_address("192.168.0.2"),)
    assert nodeport_jumps(snapshot, config) == ["-A KUBE-SERVICES -d 192.168.0.2 -j KUBE-NODEPORTS"]
    assert ebpf_nodeport_frontends(snapshot, config) == {"192.168.0.2"}
    assert listen_hosts(config.nodeport_ips) == ("192.168.0.2",)
    tracker.apply(upserted(k8s.node(NODE, "192.168.0.9", "10.244.1.0/24")))  # renumbered
    snapshot, config = sync(tracker)
    assert nodeport_jumps(snapshot, config) == ["-A KUBE-SERVICES -d 192.168.0.9 -j KUBE-NODEPORTS"]
    assert ebpf_nodeport_frontends(snapshot, config) == {"192.168.0.9"}
    assert listen_hosts(config.nodeport_ips) == ("192.168.0.9",)


def test_another_nodes_object_does_not_resolve_primary(tracker: ChangeTracker) -> None:
    tracker.apply(upserted(k8s.node("other-node", "192.168.0.9", "10.244.2.0/24")))
    snapshot, config = sync(tracker)
    assert config.nodeport_ips == () and nodeport_jumps(snapshot, config) == []


def test_a_bind_address_resolves_primary_before_the_node_is_known(tracker: ChangeTracker) -> None:
    """kube-proxy's detectNodeIPs: a --bind-address that is not unspecified is the node IP of its family."""
    snapshot = tracker.snapshot()
    assert snapshot is not None
    config = proxy_config(NODE, ProxySettings(nodeport_primary=True, bind_address=ipaddress.ip_address("172.16.5.5")),
                          snapshot, INTERFACES)
    assert nodeport_jumps(snapshot, config) == ["-A KUBE-SERVICES -d 172.16.5.5 -j KUBE-NODEPORTS"]


def test_cidrs_matching_no_address_are_not_every_address() -> None:
    """Unlike `primary` unresolved, CIDRs are kube-proxy's as given: the fallback to every address is only for no
    CIDR of the family, or a zero CIDR (NewNodePortAddresses), unchanged."""
    made = ChangeTracker(NODE)
    made.apply_all([listed(Kind.SERVICE, [lb_local()]), listed(Kind.ENDPOINT_SLICE, []), listed(Kind.NODE, [])])
    snapshot = made.snapshot()
    assert snapshot is not None
    none_match = proxy_config(NODE, ProxySettings(nodeport_addresses=(ipaddress.ip_network("203.0.113.0/24"),)),
                              snapshot, INTERFACES)
    assert none_match.nodeport_ips == ()
    every = proxy_config(NODE, ProxySettings(), snapshot, INTERFACES)
    assert every.nodeport_ips is None


# --- one configuration per IP family (kube-proxy's proxier per family) -----------------------------------

def dual_stack_node(*, primary_v6: bool = False) -> dict[str, Any]:
    addresses = ["192.168.0.2", "2001:db8::2"]
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:10:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": a}
                                     for a in (reversed(addresses) if primary_v6 else addresses)]}}


def test_each_family_has_its_node_ip_nodeport_addresses_and_no_ipv6_localhost_nodeports() -> None:
    made = ChangeTracker(NODE)
    made.apply_all([listed(Kind.NODE, [dual_stack_node()])])
    snapshot = made.snapshot()
    assert snapshot is not None
    interfaces = (*INTERFACES, ipaddress.ip_address("2001:db8::2"), ipaddress.ip_address("fe80::1"))
    settings = ProxySettings(nodeport_addresses=(ipaddress.ip_network("192.168.0.0/16"),
                                                 ipaddress.ip_network("2001:db8::/32"),
                                                 ipaddress.ip_network("127.0.0.0/8")))
    v4 = proxy_config(NODE, settings, snapshot, interfaces)
    v6 = proxy_config(NODE, settings, snapshot, interfaces, family=6)
    assert (v4.family, v4.node_ip, v4.localhost_nodeports_enabled) == (4, ipaddress.ip_address("192.168.0.2"), True)
    assert (v6.family, v6.node_ip, v6.localhost_nodeports_enabled) == (6, ipaddress.ip_address("2001:db8::2"), False)
    assert v4.nodeport_ips is not None and {ip.version for ip in v4.nodeport_ips} == {4}
    assert v6.nodeport_ips == (ipaddress.ip_address("2001:db8::2"),)
    # `primary`: each family's node IP
    primary = ProxySettings(nodeport_primary=True)
    assert proxy_config(NODE, primary, snapshot, interfaces, family=6).nodeport_ips == (
        ipaddress.ip_address("2001:db8::2"),)


def test_the_families_served_are_ipv4_the_cluster_cidrs_and_the_nodes() -> None:
    made = ChangeTracker(NODE)
    made.apply_all([listed(Kind.NODE, [dual_stack_node(primary_v6=True)])])
    snapshot = made.snapshot()
    assert snapshot is not None
    assert base_families(ProxySettings()) == {4}
    assert base_families(ProxySettings(cluster_cidrs=(ipaddress.ip_network("fd00:10::/48"),))) == {4, 6}
    assert served_families(None, ProxySettings()) == {4}
    assert served_families(snapshot.node, ProxySettings()) == {4, 6}
