"""The tunnel's inbound decision (no root, no sockets): the target check before policy, fail closed until
policies are synced, current labels, and open connections closed when a policy change now denies them."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import AuthorizationPolicy
from nodeagent.tunnel.proxy.admission import NotAdmitted, Refusal
from nodeagent.tunnel.proxy.node import NodeTunnel, _Live, _Pod
from nodeagent.tunnel.state.authz import Authorizer, Verdict
from nodeagent.tunnel.state.workloads import Workload
from nodeagent.tunnel.telemetry import TunnelMetrics

CLIENT = SpiffeId("cluster.local", "demo", "client")
STRANGER = SpiffeId("cluster.local", "other", "stranger")
ECHO = Workload("10.244.2.3", SpiffeId("cluster.local", "demo", "echo"), "node2", "/run/netns/echo",
                name="demo/echo-1", labels={"app": "echo"})


def deny_from(principal: str, **selector: str) -> AuthorizationPolicy:
    raw: dict[str, Any] = {"apiVersion": "security.nodeagent.io/v1", "kind": "AuthorizationPolicy",
                           "metadata": {"name": "deny", "namespace": "demo"},
                           "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}}
    if selector:
        raw["spec"]["selector"] = {"matchLabels": selector}
    decoded = decode(raw)
    assert isinstance(decoded.obj, AuthorizationPolicy), decoded
    return decoded.obj


class Harness:
    """A NodeTunnel with one served pod whose table entry, known identities and authorizer the test changes."""

    def __init__(self) -> None:
        self.table: dict[str, Workload] = {ECHO.ip: ECHO}
        self.identities = {CLIENT, STRANGER, ECHO.identity}
        self.authorizer: Authorizer | None = None
        self.tunnel = NodeTunnel("node2", "cluster.local", cast(Any, None), self.table.get,
                                 authorizer=lambda: self.authorizer, metrics=TunnelMetrics(),
                                 identity_known=self.identities.__contains__)
        self.pod = _Pod(ECHO, cast(Any, None), cast(Any, None), cast(Any, None))
        self.tunnel.pods[ECHO.ip] = self.pod

    def admit(self, host: str, port: int, source: SpiffeId | None = CLIENT) -> Verdict | NotAdmitted:
        return self.tunnel.admit(self.pod, host, port, source, "10.244.1.2", ("10.244.1.2", 40000))

    def counter(self, name: str, **labels: str) -> float:
        text = generate_latest(self.tunnel.metrics.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def test_nothing_is_admitted_before_policies_are_synced() -> None:
    harness = Harness()
    outcome = harness.admit(ECHO.ip, 8080)
    assert isinstance(outcome, NotAdmitted) and outcome.refusal is Refusal.POLICIES_NOT_SYNCED
    assert outcome.refusal.status == 503
    assert harness.counter("nodeagent_tunnel_hbone_refusals_total", reason="policies-not-synced") == 1
    harness.authorizer = Authorizer([], [])
    outcome = harness.admit(ECHO.ip, 8080)
    assert isinstance(outcome, Verdict) and outcome.allowed


def test_foreign_targets_are_refused_before_policy_even_when_policy_allows_everything() -> None:
    harness = Harness()
    harness.authorizer = Authorizer([], [])
    for host, port, refusal in [("10.244.1.3", 8080, Refusal.NOT_THIS_POD), ("172.18.0.3", 10256, Refusal.NOT_THIS_POD),
                                ("10.96.0.10", 80, Refusal.NOT_THIS_POD), (ECHO.ip, 15000, Refusal.TUNNEL_PORT)]:
        outcome = harness.admit(host, port)
        assert isinstance(outcome, NotAdmitted) and outcome.refusal is refusal, (host, port, outcome)
    assert harness.counter("nodeagent_tunnel_hbone_refusals_total", reason="target-not-served-pod") == 3
    assert harness.counter("nodeagent_tunnel_hbone_refusals_total", reason="target-tunnel-port") == 1


def test_relabelled_pod_is_judged_by_its_current_labels() -> None:
    harness = Harness()
    harness.authorizer = Authorizer([deny_from("cluster.local/ns/demo/sa/client", app="locked")], [])
    assert cast(Verdict, harness.admit(ECHO.ip, 8080)).allowed
    harness.table[ECHO.ip] = Workload(ECHO.ip, ECHO.identity, ECHO.node, ECHO.netns, name=ECHO.name,
                                      labels={"app": "locked"})
    outcome = harness.admit(ECHO.ip, 8080)
    assert isinstance(outcome, Verdict) and not outcome.allowed


def test_a_pod_gone_from_the_table_is_refused() -> None:
    harness = Harness()
    harness.authorizer = Authorizer([], [])
    del harness.table[ECHO.ip]
    outcome = harness.admit(ECHO.ip, 8080)
    assert isinstance(outcome, NotAdmitted) and outcome.refusal is Refusal.POD_UNKNOWN


def test_a_tightened_policy_closes_open_connections_it_now_denies_and_only_those() -> None:
    harness = Harness()
    harness.authorizer = Authorizer([], [])
    aborted: list[str] = []
    client = _Live(harness.pod, 8080, CLIENT, "10.244.1.2", lambda: aborted.append("client"))
    stranger = _Live(harness.pod, 8080, STRANGER, "10.244.1.9", lambda: aborted.append("stranger"))
    harness.tunnel.live |= {client, stranger}
    assert harness.tunnel.reevaluate() == 0 and not aborted
    harness.authorizer = Authorizer([deny_from("cluster.local/ns/other/sa/stranger")], [])
    assert harness.tunnel.reevaluate() == 1
    assert aborted == ["stranger"]
    assert harness.tunnel.live == {client}
    assert harness.counter("nodeagent_tunnel_policy_revocations_total", destination_workload_namespace="demo") == 1


def test_losing_policies_during_a_relist_admits_nothing_new_but_keeps_what_was_admitted() -> None:
    harness = Harness()
    harness.authorizer = Authorizer([], [])
    aborted: list[str] = []
    harness.tunnel.live.add(_Live(harness.pod, 8080, CLIENT, "10.244.1.2", lambda: aborted.append("client")))
    harness.authorizer = None
    assert harness.tunnel.reevaluate() == 0 and not aborted
    assert isinstance(harness.admit(ECHO.ip, 8080), NotAdmitted)


def test_a_certificate_of_an_identity_no_pod_holds_any_more_is_refused_and_its_connections_closed() -> None:
    """A deleted pod's certificate stays valid until it expires; the tunnel refuses it once no pod runs as
    that identity, and closes what it carried."""
    harness = Harness()
    harness.authorizer = Authorizer([], [])
    aborted: list[str] = []
    harness.tunnel.live.add(_Live(harness.pod, 8080, STRANGER, "10.244.1.9", lambda: aborted.append("stranger")))
    harness.identities.discard(STRANGER)
    outcome = harness.admit(ECHO.ip, 8080, STRANGER)
    assert isinstance(outcome, NotAdmitted) and outcome.refusal is Refusal.IDENTITY_UNKNOWN
    assert outcome.refusal.status == 401
    assert harness.tunnel.reevaluate() == 1 and aborted == ["stranger"]
    assert cast(Verdict, harness.admit(ECHO.ip, 8080, CLIENT)).allowed
    assert harness.counter("nodeagent_tunnel_hbone_refusals_total", reason="source-identity-unknown") == 1
