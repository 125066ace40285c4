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
from tests.support.agent_labs import OUTSIDER, lab_with_agents, unserved_resolver
from tests.support.netns import netns_run
from tests.support.tunnel import ask_dns, dns_responder, metrics, sample

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
    with lab_with_agents(tmp_path_factory.mktemp("dns"), OUTSIDER, "iptables", mesh=True, tunnel_workers=2) as lab:
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


# A query to wherever the pod's resolver is (here a cluster DNS address nothing serves): the capture sends it
# to the tunnel, and the answer comes back from the address asked (dnspython checks the source).
ASK_AT = """
import json, sys
import dns.message, dns.query
query = dns.message.make_query(sys.argv[1], "A")
udp = dns.query.udp(query, sys.argv[2], port=53, timeout=3)
tcp = dns.query.tcp(query, sys.argv[2], port=53, timeout=3)
print(json.dumps([[dns.rcode.to_text(m.rcode()), [rr.to_text() for rs in m.answer for rr in rs]] for m in (udp, tcp)]))
"""


def test_an_enrolled_pods_dns_is_captured_and_answered_with_the_cluster_dns_absent(lab: labs.Lab) -> None:
    """The agents' capture redirects port 53 (UDP and TCP) to the tunnel's proxy: the search-path name a pod's
    resolver would send first resolves with nothing listening at the resolver's address."""
    expected = _cluster_ip(lab, "demo", "echo")
    resolver = unserved_resolver(lab)
    client = lab.plan.pod("demo/client")

    def answered() -> Any:
        try:
            return json.loads(netns_run(client.netns, sys.executable, "-c", ASK_AT, "echo.demo.svc.cluster.local.",
                                        resolver))
        except Exception:  # the capture lands once the tunnel serves the pod
            return None

    wait_for(lambda: answered() is not None, "the pod's captured DNS answered", timeout=60)
    assert answered() == [["NOERROR", [expected]]] * 2
    # A pod outside the mesh is not captured: nothing answers there.
    outsider = lab.plan.pod("plain/outsider")
    with pytest.raises(Exception):  # noqa: B017 - any failure to get an answer: a timeout or a refusal
        json.loads(netns_run(outsider.netns, sys.executable, "-c", ASK_AT, "echo.demo.svc.cluster.local.", resolver))


def test_an_external_name_is_forwarded_to_the_resolver_the_pod_dialled(lab: labs.Lab) -> None:
    """A name the tables do not hold, asked over TCP at a resolver outside the cluster (on node2's address): the
    capture's REDIRECT keeps the original destination, the proxy forwards there, the answer comes back."""
    node2 = lab.plan.node("node2")
    before = sample(metrics(lab, "node1"), "nodeagent_tunnel_dns_requests_total", outcome="forwarded", protocol="tcp")
    with dns_responder(node2.netns, str(node2.node.address), "192.0.2.53") as asked:
        answers = ask_dns(lab, "demo/client", "external.example.", str(node2.node.address), ways="tcp")
    assert answers == {"tcp": ["NOERROR", ["192.0.2.53"]]}
    assert asked == ["external.example. tcp"], "asked by the proxy, once"
    after = sample(metrics(lab, "node1"), "nodeagent_tunnel_dns_requests_total", outcome="forwarded", protocol="tcp")
    assert after == before + 1
