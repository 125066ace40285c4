"""The proxier's sync decisions with a recording stand-in for the iptables binaries (no root)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.kernel.netfilter import IptablesError
from nodeagent.observability.health import HealthState
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter
from nodeagent.service.datapath import Datapath, DatapathMode, Gauges
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

CONFIG = ProxyConfig(node_name="test-node")


class RecordingIptables:
    """Remembers restores; fails the next `fail_next` of them like iptables-restore does."""

    backend = "legacy"
    netns = None

    def __init__(self) -> None:
        self.restores: list[str] = []
        self.fail_next = 0
        self.chains: set[tuple[str, str]] = set()

    def restore(self, text: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise IptablesError("iptables-legacy-restore failed: line 3 failed")
        self.restores.append(text)

    def save(self, table: str) -> str:
        return ""

    def chain_names(self, table: str) -> set[str]:
        return set()

    def chain_exists(self, table: str, chain: str) -> bool:
        return (table, chain) in self.chains

    def ensure_chain(self, table: str, chain: str) -> None:
        self.chains.add((table, chain))

    def ensure_rule_first(self, *args: Any) -> bool:
        return True


class EmptyConntrack:
    """A conntrack table without flows, recording what the proxier asks it."""

    def __init__(self) -> None:
        self.listed = 0
        self.deleted: list[Filter] = []

    def flows(self, family: int, protocol: str = "udp") -> list[Any]:
        self.listed += 1
        return []

    def delete(self, family: int, match: Filter) -> int:
        self.deleted.append(match)
        return 0


def no_conntrack() -> ConntrackReconciler:
    return ConntrackReconciler(EmptyConntrack())


def sync(proxier: IptablesProxier, snapshot: Any, changed: set[ObjectRef]) -> Any:
    return proxier.sync(snapshot, CONFIG, changed)


def test_a_failed_restore_raises_and_the_next_sync_is_full() -> None:
    ipt = RecordingIptables()
    clock = iter(range(1000)).__next__
    proxier = IptablesProxier(ipt, sync_period=1e6, clock=lambda: float(clock()),  # type: ignore[arg-type]
                              conntrack=no_conntrack())
    first = snapshot_of(*OVERALL_OBJECTS)
    assert sync(proxier, first, set()).full
    svc1 = {ObjectRef(Kind.SERVICE, "ns1", "svc1")}
    second = snapshot_of(*[o for o in OVERALL_OBJECTS if o["metadata"].get("namespace") != "ns1"
                           or o["kind"] == "Service"], slice_("ns1", "svc1", ep("10.180.0.7")))
    assert not sync(proxier, second, svc1).full, "an endpoint change is a partial sync"
    ipt.fail_next = 1
    with pytest.raises(IptablesError, match="line 3 failed"):
        sync(proxier, first, svc1)
    assert sync(proxier, first, svc1).full, "after a failure the state of the kernel is unknown: full sync"


def test_a_partial_sync_leaves_unchanged_top_level_chains_out() -> None:
    ipt = RecordingIptables()
    proxier = IptablesProxier(ipt, sync_period=1e6, conntrack=no_conntrack())  # type: ignore[arg-type]
    sync(proxier, snapshot_of(*OVERALL_OBJECTS), set())
    moved = snapshot_of(*[o for o in OVERALL_OBJECTS if not (o["kind"] == "EndpointSlice"
                                                             and o["metadata"]["namespace"] == "ns1")],
                        slice_("ns1", "svc1", ep("10.180.0.7")))
    report = sync(proxier, moved, {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    declared = [line for line in report.restore_input.splitlines() if line.startswith(":")]
    assert not [d for d in declared if d.startswith((":KUBE-SERVICES", ":KUBE-NODEPORTS", ":KUBE-POSTROUTING"))]
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in declared
    gone = snapshot_of(*[o for o in OVERALL_OBJECTS if o["metadata"].get("namespace") != "ns1"])
    report = sync(proxier, gone, {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert ":KUBE-SERVICES - [0:0]" in report.restore_input, "a removed Service changes KUBE-SERVICES"
    assert "-X KUBE-SVC-XPGD46QRK7WJZT7O" in report.restore_input


def test_health_turns_unhealthy_only_after_changes_wait_longer_than_the_grace() -> None:
    now = [1000.0]
    health = HealthState(grace=60, clock=lambda: now[0])
    assert health.report()[0]
    health.queued()
    now[0] += 59
    assert health.report()[0]
    now[0] += 2
    healthy, body = health.report()
    assert not healthy and body["lastUpdated"] == ""
    health.updated()
    assert health.report()[0] and health.report()[1]["lastUpdated"].startswith("1970")


def test_a_full_sync_reports_rules_per_table_and_a_partial_one_nothing() -> None:
    proxier = IptablesProxier(RecordingIptables(), sync_period=1e6, conntrack=no_conntrack())  # type: ignore[arg-type]
    full = sync(proxier, snapshot_of(*OVERALL_OBJECTS), set())
    assert full.gauges() == Gauges(rules={"filter": sum(r.startswith("-A ") for r in full.rendered.filter.rules),
                                          "nat": sum(r.startswith("-A ") for r in full.rendered.nat.rules)})
    assert full.gauges().rules["nat"] > 0 and not full.gauges().map_entries
    partial = sync(proxier, snapshot_of(*OVERALL_OBJECTS), {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert not partial.full and partial.gauges() == Gauges()


def test_the_agent_names_its_sync_thread_after_the_datapath() -> None:
    proxier = IptablesProxier(RecordingIptables(), conntrack=no_conntrack())  # type: ignore[arg-type]
    datapath: Datapath = proxier  # the protocol the agent drives
    agent = Agent(AgentOptions("node1", healthz_port=None), lambda sink: _NoSource(), datapath)
    assert datapath.mode is DatapathMode.IPTABLES
    assert agent._runner._thread.name == "iptables-sync"


class _NoSource:
    def start(self) -> object:
        return self

    def stop(self) -> None:
        pass


def test_udp_conntrack_is_reconciled_after_the_first_sync_and_after_udp_endpoint_changes() -> None:
    table = EmptyConntrack()
    proxier = IptablesProxier(RecordingIptables(), sync_period=1e6,  # type: ignore[arg-type]
                              conntrack=ConntrackReconciler(table))
    dns = service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53)
    one = snapshot_of(dns, slice_("ns1", "dns", ep("10.180.0.1"), port=53, protocol="UDP"))
    first = sync(proxier, one, set())
    assert first.conntrack is not None and table.listed == 1, "after a restart, flows of removed endpoints may remain"
    assert sync(proxier, one, {ObjectRef(Kind.SERVICE, "ns1", "other")}).conntrack is None
    two = snapshot_of(dns, slice_("ns1", "dns", ep("10.180.0.2"), port=53, protocol="UDP"))
    assert sync(proxier, two, {ObjectRef(Kind.SERVICE, "ns1", "dns")}).conntrack is not None and table.listed == 2
    ipt = RecordingIptables()
    ipt.fail_next = 1
    failing = IptablesProxier(ipt, conntrack=ConntrackReconciler(table))  # type: ignore[arg-type]
    with pytest.raises(IptablesError):
        sync(failing, one, set())
    assert table.listed == 2, "a failed restore changed nothing: nothing to reconcile"
