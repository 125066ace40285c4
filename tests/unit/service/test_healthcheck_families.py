"""Health check node ports per family, as kube-proxy's ServiceHealthServer in each family's proxier: a Service is
checked in the families it has a cluster IP of, on that family's NodePort addresses (or an IPv6-only [::] beside
0.0.0.0), and each family's listener answers with the local endpoints of its family."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest

from nodeagent.cluster.model import Protocol
from nodeagent.observability.service_health import Listen, ServiceHealthServers, ServiceName
from nodeagent.service.healthcheck import health_check_ports, listen_hosts, local_ready_endpoints
from nodeagent.state.translation import ServicePortName
from tests.unit.service.test_healthcheck import endpoint, port_info

LB = ServiceName("ns", "lb")
DUAL = replace(port_info("lb"), cluster_ips=(ip_address("10.0.0.1"), ip_address("fd00::1")))
SIX = replace(port_info("lb"), cluster_ips=(ip_address("fd00::1"),))


def test_a_dual_stack_service_listens_in_each_family_the_node_serves() -> None:
    assert health_check_ports([DUAL], None, None, ipv6=True) == {LB: Listen(30000, ("0.0.0.0", "::"))}
    # an IPv4-only node (no IPv6 proxier): IPv4 only, as before
    assert health_check_ports([DUAL], None) == {LB: Listen(30000, ("0.0.0.0",))}
    # an IPv4-only Service stays on IPv4 on a dual-stack node
    assert health_check_ports([port_info("lb")], None, None, ipv6=True) == {LB: Listen(30000, ("0.0.0.0",))}


def test_an_ipv6_only_service_is_checked_by_the_ipv6_proxier_alone() -> None:
    assert health_check_ports([SIX], None, None, ipv6=True) == {LB: Listen(30000, ("::",))}
    assert health_check_ports([SIX], None) == {}


def test_nodeport_addresses_per_family() -> None:
    """--nodeport-addresses split by family (kube-proxy's NewNodePortAddresses per family): each family's
    listeners bind its own addresses; a family without a CIDR listens everywhere in that family."""
    v4 = (ip_address("192.168.1.5"),)
    v6 = (ip_address("fd00:18::2"),)
    assert health_check_ports([DUAL], v4, v6, ipv6=True) == {LB: Listen(30000, ("192.168.1.5", "fd00:18::2"))}
    assert health_check_ports([DUAL], v4, None, ipv6=True) == {LB: Listen(30000, ("192.168.1.5", "::"))}
    assert listen_hosts(None, 6) == ("::",)
    assert listen_hosts((*v4, *v6), 6) == ("fd00:18::2",)


def test_local_ready_endpoints_per_family() -> None:
    name = ServicePortName("ns", "lb", "p80", Protocol.TCP)
    endpoints = {name: (endpoint("10.1.1.2"), endpoint("fd00:10::2"), endpoint("fd00:10::3"),
                        endpoint("fd00:10::4", local=False))}
    assert local_ready_endpoints(endpoints, family=4) == {LB: 1}
    assert local_ready_endpoints(endpoints, family=6) == {LB: 2}
    assert local_ready_endpoints(endpoints) == {LB: 3}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def servers() -> Iterator[ServiceHealthServers]:
    made = ServiceHealthServers(lambda: True)
    yield made
    made.close()


def _count(host: str, port: int) -> int:
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    count: int = json.loads(body)["localEndpoints"]
    return count


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 in this network namespace")
def test_each_familys_listener_answers_with_its_familys_endpoints(servers: ServiceHealthServers) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    servers.sync_services({LB: Listen(port, ("127.0.0.1", "::1"))})
    assert set(servers.addresses()[LB]) == {("127.0.0.1", port), ("::1", port)}
    servers.sync_endpoints({LB: 1}, family=4)
    servers.sync_endpoints({LB: 2}, family=6)
    assert (_count("127.0.0.1", port), _count("::1", port)) == (1, 2)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 in this network namespace")
def test_the_ipv6_listener_is_ipv6_only(servers: ServiceHealthServers) -> None:
    """[::] beside 0.0.0.0 on one port binds only because the IPv6 socket leaves IPv4 alone (IPV6_V6ONLY)."""
    servers.sync_services({LB: Listen(0, ("::1",))})
    listener = servers._listeners[LB]  # the socket option is what the test is about
    (server,) = listener.servers
    assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
