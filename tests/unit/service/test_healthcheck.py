"""The health check node port servers: which Services, where, how many local endpoints (kube-proxy's
HealthCheckNodePorts and LocalReadyEndpoints), and what a listener answers (its TestServer: body, headers, codes)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest
from structlog.testing import capture_logs

from nodeagent.cluster.model import Protocol, ServiceType
from nodeagent.observability.service_health import Listen, ServiceHealthServers, ServiceName, service_health_answer
from nodeagent.service.healthcheck import (
    health_check_ports,
    listen_hosts,
    local_ready_endpoints,
    no_local_endpoints,
)
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName

LOOPBACK = ("127.0.0.1",)


def port_info(name: str, port: str = "p80", type: ServiceType = ServiceType.LOAD_BALANCER, local: bool = True,
              hcnp: int | None = 30000) -> ServicePortInfo:
    return ServicePortInfo(
        name=ServicePortName("ns", name, port, Protocol.TCP), type=type, cluster_ips=(ip_address("10.0.0.1"),),
        port=80, protocol=Protocol.TCP, target_port=8080, node_port=31000, external_ips=(), load_balancer_ips=(),
        load_balancer_source_ranges=(), affinity_timeout_seconds=None, external_policy_local=local,
        internal_policy_local=False, health_check_node_port=hcnp, topology_mode="")


def endpoint(ip: str, local: bool = True, ready: bool = True, terminating: bool = False) -> EndpointInfo:
    return EndpointInfo(ip=ip_address(ip), port=8080, ready=ready, serving=ready or terminating,
                        terminating=terminating, node_name="node1" if local else "node2", is_local=local,
                        zone_hints=frozenset(), pod=None)


def test_only_load_balancers_with_local_policy_and_a_port_are_checked_once_per_service() -> None:
    ports = [port_info("lb", "p80"), port_info("lb", "p443"), port_info("cluster", local=False, hcnp=None),
             port_info("nodeport", type=ServiceType.NODE_PORT, hcnp=None), port_info("nohcnp", hcnp=None)]
    assert health_check_ports(ports, None) == {ServiceName("ns", "lb"): Listen(30000, ("0.0.0.0",))}


def test_listeners_bind_everywhere_or_on_the_nodeport_addresses() -> None:
    """kube-proxy's TestServer (no --nodeport-addresses: 0.0.0.0) and TestServerWithSelectiveListeningAddress."""
    assert listen_hosts(None) == ("0.0.0.0",)
    assert listen_hosts((ip_address("127.0.0.1"), ip_address("192.168.1.5"))) == ("127.0.0.1", "192.168.1.5")


def test_local_ready_endpoints_count_distinct_local_ready_addresses_over_ports() -> None:
    """kube-proxy's LocalReadyEndpoints: 10.1.1.1 remote + 10.1.1.2 local on two ports => 1; a local endpoint
    not ready or terminating does not count; a Service without one is absent."""
    a = ServicePortName("ns1", "ep1", "p11", Protocol.TCP)
    b = ServicePortName("ns1", "ep1", "p12", Protocol.TCP)
    c = ServicePortName("ns2", "ep2", "p", Protocol.TCP)
    endpoints = {a: (endpoint("10.1.1.1", local=False), endpoint("10.1.1.2")),
                 b: (endpoint("10.1.1.1", local=False), endpoint("10.1.1.2"), endpoint("10.1.1.3", ready=False)),
                 c: (endpoint("10.2.2.1", ready=False, terminating=True),)}
    assert local_ready_endpoints(endpoints) == {ServiceName("ns1", "ep1"): 1}
    assert local_ready_endpoints(endpoints, only={ServiceName("ns2", "ep2")}) == {}


def test_the_answer_is_kube_proxys_body_byte_for_byte() -> None:
    status, headers, body = service_health_answer(ServiceName("a", "b"), 18, True)
    assert status == 200
    assert headers == {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
                       "X-Load-Balancing-Endpoint-Weight": "18"}
    assert body == (b'{\n\t"service": {\n\t\t"namespace": "a",\n\t\t"name": "b"\n\t},\n'
                    b'\t"localEndpoints": 18,\n\t"serviceProxyHealthy": true\n}')
    assert service_health_answer(ServiceName("a", "b"), 0, True)[0] == 503
    status, _, body = service_health_answer(ServiceName("a", "b"), 7, False)
    assert status == 503 and json.loads(body) == {"service": {"namespace": "a", "name": "b"}, "localEndpoints": 7,
                                                  "serviceProxyHealthy": False}


def get(address: tuple[str, int], path: str = "/") -> tuple[int, dict[str, list[str]], dict[str, object]]:
    url = f"http://{address[0]}:{address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    names = ("Content-Type", "X-Content-Type-Options", "X-Load-Balancing-Endpoint-Weight")
    return status, {n: headers.get_all(n) or [] for n in names}, json.loads(body)


class Proxy:
    """The proxy's health as the servers read it; the test flips it."""

    def __init__(self) -> None:
        self.healthy = True


@pytest.fixture
def proxy() -> Proxy:
    return Proxy()


@pytest.fixture
def servers(proxy: Proxy) -> Iterator[ServiceHealthServers]:
    made = ServiceHealthServers(lambda: proxy.healthy)
    yield made
    made.close()


def test_listeners_answer_as_kube_proxys_test_server(servers: ServiceHealthServers, proxy: Proxy) -> None:
    """kube-proxy's TestServer: no endpoints 503; 18 => 200; 0 => 503; the Service gone from the endpoints map =>
    0; the proxy unhealthy => 503 everywhere with the count still reported; any path answers."""
    nsn = ServiceName("a", "b")
    servers.sync_services({nsn: Listen(0, LOOPBACK)})
    (address,) = servers.addresses()[nsn]
    status, headers, body = get(address)
    assert status == 503 and body["localEndpoints"] == 0
    assert headers == {"Content-Type": ["application/json"], "X-Content-Type-Options": ["nosniff"],
                       "X-Load-Balancing-Endpoint-Weight": ["0"]}
    servers.sync_endpoints({nsn: 18})
    status, headers, body = get(address, "/any/path")
    assert status == 200 and body == {"service": {"namespace": "a", "name": "b"}, "localEndpoints": 18,
                                      "serviceProxyHealthy": True}
    assert headers["X-Load-Balancing-Endpoint-Weight"] == ["18"]
    servers.sync_endpoints({nsn: 0})
    assert get(address)[0] == 503
    servers.sync_endpoints({nsn: 7})
    proxy.healthy = False
    status, _, body = get(address)
    assert status == 503 and body["localEndpoints"] == 7 and body["serviceProxyHealthy"] is False
    proxy.healthy = True
    assert get(address)[0] == 200
    servers.sync_endpoints({})
    assert get(address)[0] == 503


def test_services_come_and_go_and_a_port_change_reopens_with_no_endpoints(servers: ServiceHealthServers) -> None:
    one, two = ServiceName("ns", "one"), ServiceName("ns", "two")
    servers.sync_services({one: Listen(0, LOOPBACK), two: Listen(0, LOOPBACK)})
    servers.sync_endpoints({one: 1, two: 2})
    first = servers.addresses()
    assert get(first[two][0])[2]["localEndpoints"] == 2
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    servers.sync_services({two: Listen(port, LOOPBACK)})  # one goes, two moves
    assert set(servers.addresses()) == {two} and servers.addresses()[two] == (("127.0.0.1", port),)
    status, _, body = get(("127.0.0.1", port))
    assert status == 503 and body["localEndpoints"] == 0  # reopened: counted again at the next sync
    with pytest.raises(urllib.error.URLError):
        get(first[one][0])


def test_a_port_taken_is_logged_not_fatal_and_tried_again(servers: ServiceHealthServers) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    busy, fine = ServiceName("ns", "busy"), ServiceName("ns", "fine")
    try:
        with capture_logs() as logs:
            servers.sync_services({busy: Listen(port, LOOPBACK), fine: Listen(0, LOOPBACK)})
        assert set(servers.addresses()) == {fine}
        (failed,) = [entry for entry in logs if entry["log_level"] == "warning"]
        assert failed["service"] == "ns/busy" and failed["port"] == port
    finally:
        taken.close()
    kept = servers.addresses()[fine]
    servers.sync_services({busy: Listen(port, LOOPBACK), fine: Listen(0, LOOPBACK)})  # the next sync
    assert servers.addresses() == {busy: (("127.0.0.1", port),), fine: kept}


def test_no_local_endpoints_as_kube_proxys_test_no_endpoints_metric() -> None:
    """kube-proxy's TestNoEndpointsMetric: iTP Local without local endpoints => internal 1; eTP Local (NodePort)
    => external 1; both => 1/1; no endpoints at all => 0/0 (rejected, not counted); a local serving terminating
    endpoint is still usable."""
    def case(itp: bool, etp: bool, *eps: EndpointInfo) -> tuple[int, int]:
        info = replace(port_info("svc", type=ServiceType.NODE_PORT, local=etp, hcnp=None), internal_policy_local=itp)
        return no_local_endpoints({info.name: info}, {info.name: eps})

    remote, local = endpoint("10.0.1.1", local=False), endpoint("10.0.1.2")
    assert case(True, False, remote, local) == (0, 0)
    assert case(True, False, remote) == (1, 0)
    assert case(False, True, remote) == (0, 1)
    assert case(True, True, remote) == (1, 1)
    assert case(True, True) == (0, 0)
    assert case(True, True, endpoint("10.0.1.3", local=False, ready=False)) == (0, 0)  # not serving: none usable
    assert case(True, True, remote, endpoint("10.0.1.4", ready=False, terminating=True)) == (0, 0)
    assert case(False, False, remote) == (0, 0)


def test_closing_many_listeners_does_not_wait_for_each_in_turn(servers: ServiceHealthServers) -> None:
    """Each listener takes up to its poll interval (0.5 s) to stop: twenty in turn would take seconds."""
    names = [ServiceName("ns", f"s{i}") for i in range(20)]
    servers.sync_services({name: Listen(0, LOOPBACK) for name in names})
    assert len(servers.addresses()) == 20
    started = time.monotonic()
    servers.close()
    assert time.monotonic() - started < 3.0 and servers.addresses() == {}
