"""The agent's health timeout: kube-proxy's healthTimeout is twice the sync period."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.service.config import ProxyConfig
from nodeagent.service.datapath import DatapathMode, SyncReport
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support.events import listed


class _NoSource:
    def start(self) -> object:
        return self

    def stop(self) -> None:
        pass


class _NoDatapath:
    mode = DatapathMode.IPTABLES

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef]) -> SyncReport:
        raise NotImplementedError

    def force_full_sync(self) -> None:
        pass

    def canaries_intact(self) -> bool:
        return True


def grace(options: AgentOptions) -> float:
    return Agent(options, lambda sink: _NoSource(), _NoDatapath()).health.grace


def test_the_health_timeout_is_twice_the_sync_period_unless_given() -> None:
    assert grace(AgentOptions("node1", healthz_port=None)) == 60.0
    assert grace(AgentOptions("node1", sync_period=10.0, healthz_port=None)) == 20.0
    assert grace(AgentOptions("node1", sync_period=10.0, healthz_port=None, healthz_grace=5.0)) == 5.0


def test_node_eligibility_follows_the_node_object() -> None:
    """kube-proxy's nodeEligible: false without the Node once Nodes are listed, while it is deleted, or while the
    autoscaler's ToBeDeletedByClusterAutoscaler taint is on it; true otherwise."""

    def eligible(*nodes: dict[str, object]) -> bool:
        tracker = ChangeTracker("node1")
        tracker.apply(listed(Kind.NODE, list(nodes), "1"))
        snapshot = tracker.snapshot()
        assert snapshot is not None
        return Agent._node_eligible(snapshot)

    def node(metadata: dict[str, object] | None = None, spec: dict[str, object] | None = None) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", **(metadata or {})},
                "spec": spec or {}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}

    assert eligible(node())
    assert not eligible()
    assert not eligible(node({"deletionTimestamp": "2026-12-07T01:00:00Z"}))
    assert not eligible(node(spec={"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}))
    assert eligible(node(spec={"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}))
