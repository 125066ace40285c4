"""The agent's health timeout: kube-proxy's healthTimeout is twice the sync period."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from nodeagent.cluster.model import ObjectRef
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.service.config import ProxyConfig
from nodeagent.service.datapath import DatapathMode, SyncReport
from nodeagent.state.tracker import Snapshot


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
