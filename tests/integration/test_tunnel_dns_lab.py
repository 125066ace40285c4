"""The DNS proxy as `nodeagent ztunnel` serves it in the lab (two workers: the coordinator serves DNS): every
served pod answers its Services' names on 127.0.0.1:15053 over UDP and TCP, and the counters are on the
tunnel's /metrics."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.lab import lab as labs
from tests.integration.conftest import wait_for
from tests.support.agent_labs import lab_with_agents
from tests.support.netns import netns_run
from tests.support.tunnel import metrics, sample

pytestmark = pytest.mark.root

ASK = """
import json, sys
import dns.message, dns.query
query = dns.message.make_query(sys.argv[1], sys.argv[2])
udp = dns.query.udp(query, "127.0.0.1", port=15053, timeout=3)
tcp = dns.query.tcp(query, "127.0.0.1", port=15053, timeout=3)
print(json.dumps([[dns.rcode.to_text(m.rcode()), [rr.to_text() for rs in m.answer for rr in rs]] for m in (udp, tcp)]))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("dns"), "", "iptables", mesh=True, tunnel_workers=2) as lab:
        yield lab


def ask(netns: str, name: str, rdtype: str = "A") -> Any:
    return json.loads(netns_run(netns, sys.executable, "-c", ASK, name, rdtype))


def _cluster_ip(lab: labs.Lab, namespace: str, name: str) -> str:
    for document in lab.topology.documents:
        meta = document.get("metadata", {})
        if document.get("kind") == "Service" and (meta.get("namespace"), meta.get("name")) == (namespace, name):
            return str(document["spec"]["clusterIP"])
    raise AssertionError(f"no Service {namespace}/{name} in the lab")


def test_served_pods_answer_service_names(lab: labs.Lab) -> None:
    expected = _cluster_ip(lab, "demo", "echo")
    pods = [p for p in lab.plan.pods if p.pod.key.startswith("demo/")]
    assert pods

    def answering() -> bool:
        try:
            return all(ask(p.netns, "echo.demo.svc.cluster.local.")[0][0] == "NOERROR" for p in pods)
        except Exception:  # not served yet (the listener opens once the tunnel serves the pod)
            return False

    wait_for(answering, "every demo pod's DNS proxy answers", timeout=60)
    for pod in pods:
        assert ask(pod.netns, "echo.demo.svc.cluster.local.") == [["NOERROR", [expected]]] * 2, pod.pod.key
        assert ask(pod.netns, "nope.demo.svc.cluster.local.")[0][0] == "NXDOMAIN"
    node = pods[0].pod.node
    values = metrics(lab, node)
    assert sample(values, "nodeagent_tunnel_dns_requests_total", outcome="local", type="A", protocol="udp") > 0
