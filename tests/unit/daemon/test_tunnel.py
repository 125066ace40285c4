"""The tunnel process's fail-closed bookkeeping (no root, no sockets): no authorizer until both policy kinds
are listed, readiness blockers that name the missing kind and why, and re-checks of open connections when
policies, labels or the set of held identities change."""

from __future__ import annotations

from typing import Any, cast

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed, Upserted
from nodeagent.cluster.model import Kind
from nodeagent.daemon.tunnel import TunnelOptions, TunnelProcess
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.tunnel.proxy.node import NodeTunnel, _Live, _Pod
from tests.support import objects as k8s

MISSING_CRD = ("404: the server could not find the requested resource (does this API server serve "
               "/apis/security.istio.io/v1/authorizationpolicies? a CRD may not be installed)")


class FailingSource:
    """A source whose AuthorizationPolicy list fails, as with the CRD missing."""

    def start(self) -> object:
        return self

    def stop(self) -> None:
        pass

    def failures(self) -> dict[Kind, str]:
        return {Kind.AUTHORIZATION_POLICY: MISSING_CRD}


def listed(kind: Kind, raws: list[dict[str, Any]]) -> Listed:
    return Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), "1")


def deny_client() -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client", "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [
                "cluster.local/ns/shop/sa/client"]}}]}]}}


def tracker_with_pods() -> ChangeTracker:
    tracker = ChangeTracker("node1")
    tracker.apply(listed(Kind.NAMESPACE, [k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"})]))
    client = k8s.pod("client", "10.244.1.5")
    client["spec"]["serviceAccountName"] = "client"
    tracker.apply(listed(Kind.POD, [k8s.pod("web", "10.244.1.2", app="web"), client]))
    return tracker


def snap(tracker: ChangeTracker) -> Snapshot:
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def process() -> TunnelProcess:
    return TunnelProcess(TunnelOptions("node1"), cast(Any, None), lambda sink: FailingSource())


def test_no_authorizer_and_a_named_blocker_until_both_policy_kinds_are_listed() -> None:
    tunnel = process()
    tunnel.source = FailingSource()
    tracker = tracker_with_pods()
    tracker.apply(listed(Kind.PEER_AUTHENTICATION, []))
    tunnel._follow(snap(tracker))
    assert tunnel.authorizer is None and not tunnel.policies_synced
    assert tunnel.blockers() == [f"policies not synced: AuthorizationPolicy not listed ({MISSING_CRD})"]
    assert tunnel.status()["blockers"] == tunnel.blockers()
    tracker.apply(listed(Kind.AUTHORIZATION_POLICY, []))
    tunnel._follow(snap(tracker))
    assert tunnel.authorizer is not None and tunnel.policies_synced and tunnel.blockers() == []


def test_open_connections_are_judged_again_when_a_policy_arrives_and_when_an_identity_is_gone() -> None:
    tunnel = process()
    tracker = tracker_with_pods()
    tracker.apply(listed(Kind.PEER_AUTHENTICATION, []))
    tracker.apply(listed(Kind.AUTHORIZATION_POLICY, []))
    tunnel._follow(snap(tracker))
    assert tunnel.table is not None
    web = tunnel.table.by_ip["10.244.1.2"]
    pod = _Pod(web, cast(Any, None), cast(Any, None), cast(Any, None))
    node = tunnel.tunnel
    assert isinstance(node, NodeTunnel), "one worker: the single-process tunnel"
    node.pods[web.ip] = pod
    closed: list[str] = []
    client = SpiffeId("cluster.local", "shop", "client")
    node.live.add(_Live(pod, 8080, client, "10.244.1.5", lambda: closed.append("client")))
    # A change elsewhere (a Service) re-checks nothing and closes nothing.
    tracker.apply(Upserted(Kind.SERVICE, object_ref(k8s.service("web")), decode(k8s.service("web")), "2"))
    tunnel._follow(snap(tracker))
    assert closed == []
    # A DENY for the client arrives: its open connection is closed.
    tracker.apply(listed(Kind.AUTHORIZATION_POLICY, [deny_client()]))
    tunnel._follow(snap(tracker))
    assert closed == ["client"] and not node.live


def test_no_policy_crds_counts_both_kinds_listed_and_empty() -> None:
    tunnel = TunnelProcess(TunnelOptions("node1", no_policy_crds=True), cast(Any, None), lambda sink: FailingSource())
    tracker = tracker_with_pods()
    tunnel.prime(tracker)
    tunnel._follow(snap(tracker))
    assert tunnel.policies_synced and tunnel.blockers() == []
    without = process()
    tracker = tracker_with_pods()
    without.prime(tracker)
    without._follow(snap(tracker))
    assert not without.policies_synced and without.authorizer is None
