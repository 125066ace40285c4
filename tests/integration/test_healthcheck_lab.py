"""The health check node port in the lab, as a cloud load balancer probes it: a LoadBalancer Service with
`externalTrafficPolicy: Local` answers on its healthCheckNodePort 200 from the node that has a local ready
endpoint and 503 from the node that has none (kube-proxy's body and headers), and the answers flip when the
endpoint moves to the other node, when it is no longer ready, and when the Service goes (the port closes); the
node without the endpoint counts the Service in kube-proxy's no_local_endpoints metric.

The Service and its EndpointSlice are written through the lab's API server with kubectl (a Service without a
selector, so the slice is the test's own and the lab's endpoint-slice controller leaves it alone).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.lab import lab as labs
from nodeagent.lab.agents import AGENT_OWNER
from nodeagent.observability.http import DEFAULT_LIMITS
from tests.integration.conftest import wait_for
from tests.support.agent_labs import agent_healthz, lab_with_agents, owner_process
from tests.support.fabric import spawn_in
from tests.support.netns import netns_run

pytestmark = pytest.mark.root

HEALTH_PORT = 32123


def service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb-local", "namespace": "demo"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_PORT,
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(ip: str, node: str, ready: bool = True) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "lb-local-1", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "lb-local"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": node,
                           "conditions": {"ready": ready, "serving": ready, "terminating": False}}]}


def apply(lab: labs.Lab, *objects: dict[str, Any]) -> None:
    """`kubectl apply` of `objects` through the lab's API server (from a file: the lab's kubectl takes no stdin;
    without client-side validation: the lab serves no OpenAPI to validate against)."""
    path = Path(lab.record.directory) / "healthcheck-objects.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    result = labs.kubectl(lab.record.name, ["apply", "--validate=false", "-f", str(path)], capture=True, timeout=30)
    assert result.returncode == 0, result.stderr


def probe(lab: labs.Lab, node: str) -> tuple[int, dict[str, list[str]], dict[str, Any]]:
    """GET the health check node port on `node`'s address, from inside the node (as the load balancer would reach
    it): (status, the three headers, body); status 0 when nothing listens."""
    address = lab.plan.node(node).node.address
    script = ("import json,sys,urllib.request,urllib.error\n"
              "names=('Content-Type','X-Content-Type-Options','X-Load-Balancing-Endpoint-Weight')\n"
              "def show(status,headers,body): print(json.dumps([status,{n:headers.get_all(n) or [] for n in names},"
              "body.decode()]))\n"
              "try:\n"
              " r=urllib.request.urlopen(sys.argv[1],timeout=2);show(r.status,r.headers,r.read())\n"
              "except urllib.error.HTTPError as e: show(e.code,e.headers,e.read())\n"
              "except OSError: print(json.dumps([0,{},'{}']))")
    out = netns_run(lab.plan.node(node).netns, sys.executable, "-c", script, f"http://{address}:{HEALTH_PORT}/")
    status, headers, body = json.loads(out)
    return int(status), headers, json.loads(body)


def no_local_endpoints(lab: labs.Lab, node: str) -> float:
    """kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"} of `node`'s agent."""
    from prometheus_client.parser import text_string_to_metric_families

    address = lab.plan.node(node).node.address
    script = "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())"
    text = subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, sys.executable, "-c", script,
                           f"http://{address}:10249/metrics"], check=True, capture_output=True, text=True,
                          timeout=20).stdout
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
                and s.labels == {"traffic_policy": "external", "ip_family": "IPv4"})


def answers(lab: labs.Lab) -> dict[str, tuple[int, int]]:
    """node -> (status, localEndpoints) of its health check node port."""
    found = {}
    for node in ("node1", "node2"):
        status, _, body = probe(lab, node)
        found[node] = (status, body.get("localEndpoints", -1))
    return found


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("healthcheck"), "", "iptables") as lab:
        yield lab


def test_the_health_check_node_port_follows_the_local_endpoint(lab: labs.Lab) -> None:
    echo0 = str(lab.plan.pod("demo/echo-0").pod.ip)
    apply(lab, service(), endpoint_slice(echo0, "node1"))
    wait_for(lambda: answers(lab) == {"node1": (200, 1), "node2": (503, 0)}, "200 on node1, 503 on node2")
    status, headers, body = probe(lab, "node1")
    assert status == 200
    assert headers == {"Content-Type": ["application/json"], "X-Content-Type-Options": ["nosniff"],
                       "X-Load-Balancing-Endpoint-Weight": ["1"]}
    assert body == {"service": {"namespace": "demo", "name": "lb-local"}, "localEndpoints": 1,
                    "serviceProxyHealthy": True}
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    apply(lab, endpoint_slice(echo1, "node2"))  # the endpoint moves to node2
    wait_for(lambda: answers(lab) == {"node1": (503, 0), "node2": (200, 1)}, "the answers follow it to node2")
    # kube-proxy's metric for it: node1 drops the Service's external traffic (a local policy, no local endpoint)
    assert (no_local_endpoints(lab, "node1"), no_local_endpoints(lab, "node2")) == (1, 0)
    apply(lab, endpoint_slice(echo1, "node2", ready=False))  # not ready: it no longer counts
    wait_for(lambda: answers(lab) == {"node1": (503, 0), "node2": (503, 0)}, "503 everywhere")
    delete = labs.kubectl(lab.record.name, ["delete", "service", "lb-local", "-n", "demo"], capture=True, timeout=20)
    assert delete.returncode == 0, delete.stderr
    wait_for(lambda: all(probe(lab, node)[0] == 0 for node in ("node1", "node2")), "the port closes with the Service")


# Holds `count` connections to host:port, each with half a request line sent, then says so and waits to be killed.
SLOWLORIS = ("import socket,sys,threading\n"
             "held=[]\n"
             "for _ in range(int(sys.argv[3])):\n"
             " c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
             " c.sendall(b'GET / HT');held.append(c)\n"
             "print('holding',len(held),flush=True)\n"
             "threading.Event().wait()\n")


def test_a_slowloris_neither_starves_the_prober_nor_the_agents_healthz(lab: labs.Lab, tmp_path: Path) -> None:
    """Hundreds of idle half-sent requests to node1's health check node port, from node2: the load balancer's
    probe and the agent's /healthz keep answering at once, and the agent's threads stay bounded (each
    listener serves at most DEFAULT_LIMITS.max_connections connections, evicting the oldest idle one)."""
    echo0 = str(lab.plan.pod("demo/echo-0").pod.ip)
    apply(lab, service(), endpoint_slice(echo0, "node1"))
    wait_for(lambda: probe(lab, "node1")[0] == 200, "node1's health check answers 200")
    agent = owner_process(lab, AGENT_OWNER + "node1")
    threads_before = agent.num_threads()
    output = tmp_path / "slowloris"
    holder = spawn_in(lab.plan.node("node2").netns, [sys.executable, "-c", SLOWLORIS,
                                                      str(lab.plan.node("node1").node.address), str(HEALTH_PORT),
                                                      "300"], str(output))
    try:
        wait_for(lambda: output.read_text().startswith("holding 300"), "300 idle connections held", timeout=30)
        for _ in range(5):
            started = time.monotonic()
            assert probe(lab, "node1")[0] == 200
            assert agent_healthz(lab, "node1")[0] == 200
            assert time.monotonic() - started < 4, "both answered promptly"
        assert agent.num_threads() <= threads_before + DEFAULT_LIMITS.max_connections + 4, \
            (threads_before, agent.num_threads())
    finally:
        holder.kill()
        holder.wait(timeout=10)
    delete = labs.kubectl(lab.record.name, ["delete", "service", "lb-local", "-n", "demo"], capture=True, timeout=20)
    assert delete.returncode == 0, delete.stderr
