"""The proxier's sync decisions with a recording stand-in for the iptables binaries (no root)."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Upserted
from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.kernel.conntrack import Flow
from nodeagent.kernel.netfilter import IptablesError
from nodeagent.observability.health import HealthState
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter, Reconciled
from nodeagent.service.datapath import Datapath, DatapathMode, Gauges, ObservesConntrack, PartialRestoreError
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.support.events import listed
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

CONFIG = ProxyConfig(node_name="test-node")


class RecordingIptables:
    """Remembers restores; fails the next `fail_next` of them like iptables-restore does."""

    backend = "legacy"
    netns = None
    family = 4

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
    with pytest.raises(PartialRestoreError, match="line 3 failed"):  # an IptablesError, told apart
        sync(proxier, first, svc1)
    assert sync(proxier, first, svc1).full, "after a failure the state of the kernel is unknown: full sync"
    ipt.fail_next = 1
    proxier.force_full_sync()
    with pytest.raises(IptablesError) as failed:
        sync(proxier, first, svc1)
    assert not isinstance(failed.value, PartialRestoreError), "a full sync's failure is not a partial one's"


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


def restored_rules(text: str) -> dict[str, int]:
    """The `-A` lines per table of one iptables-restore input."""
    counts: dict[str, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            counts[table] = 0
        elif line.startswith("-A "):
            counts[table] += 1
    return counts


def test_a_full_sync_reports_rules_per_table_and_every_sync_the_rules_it_wrote() -> None:
    """kube-proxy's sync_proxy_rules_iptables_total after a full sync (a partial one cannot count the tables) and
    sync_proxy_rules_iptables_last (the rules the restore wrote, without the `-X` of stale chains) after each."""
    ipt = RecordingIptables()
    proxier = IptablesProxier(ipt, sync_period=1e6, conntrack=no_conntrack())  # type: ignore[arg-type]
    full = sync(proxier, snapshot_of(*OVERALL_OBJECTS), set())
    totals = {"filter": sum(r.startswith("-A ") for r in full.rendered.filter.rules),
              "nat": sum(r.startswith("-A ") for r in full.rendered.nat.rules)}
    assert full.gauges() == Gauges(rules=totals, written=totals)
    assert restored_rules(ipt.restores[-1]) == totals
    assert full.gauges().rules["nat"] > 0 and not full.gauges().map_entries
    gone = snapshot_of(*[o for o in OVERALL_OBJECTS if o["metadata"].get("namespace") != "ns1"])
    partial = sync(proxier, gone, {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert not partial.full and not partial.gauges().rules
    assert "-X KUBE-SVC-XPGD46QRK7WJZT7O" in partial.restore_input
    written = partial.gauges().written
    assert written == restored_rules(ipt.restores[-1]) and 0 < written["nat"] < totals["nat"]


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


class StaleFlows:
    """A conntrack table holding `entries`; deleting applies the filter, as the kernel side does."""

    def __init__(self, *entries: Flow) -> None:
        self.entries = list(entries)

    def flows(self, family: int, protocol: str = "udp") -> list[Flow]:
        return list(self.entries)

    def delete(self, family: int, match: Filter) -> int:
        kept = [f for f in self.entries if not match.matches(f)]
        deleted, self.entries = len(self.entries) - len(kept), kept
        return deleted


def test_the_proxier_reports_each_conntrack_pass_to_its_observers() -> None:
    table = StaleFlows(Flow("udp", ip_address("172.30.0.10"), 53, ip_address("10.180.0.9"), 53))
    proxier = IptablesProxier(RecordingIptables(), conntrack=ConntrackReconciler(table))  # type: ignore[arg-type]
    assert isinstance(proxier, ObservesConntrack)
    seen: list[Reconciled] = []
    proxier.observe_conntrack(seen.append)
    dns = snapshot_of(service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53),
                      slice_("ns1", "dns", ep("10.180.0.1"), port=53, protocol="UDP"))
    sync(proxier, dns, set())
    assert [(r.ip_family, r.deleted) for r in seen] == [("IPv4", 1)]


def dns_objects(*ips: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53, type_="NodePort", node_port=30053),
            slice_("ns1", "dns", *(ep(ip) for ip in ips), port=53, protocol="UDP"))


def test_the_agent_publishes_what_the_iptables_proxier_did() -> None:
    """Through the agent's seams (its sync, the reports, the reconciler's observers): the rules each sync wrote,
    the conntrack reconciler's passes and deletions, and a failed partial restore counted in both counters."""
    table = StaleFlows(Flow("udp", ip_address("172.30.0.10"), 53, ip_address("10.180.0.9"), 53),
                       Flow("udp", ip_address("192.168.0.2"), 30053, ip_address("10.180.0.9"), 53),
                       Flow("udp", ip_address("172.30.0.10"), 53, ip_address("10.180.0.1"), 53))
    ipt = RecordingIptables()
    proxier = IptablesProxier(ipt, sync_period=1e6, conntrack=ConntrackReconciler(table))  # type: ignore[arg-type]
    agent = Agent(AgentOptions("node1", healthz_port=None), lambda sink: _NoSource(), proxier,
                  addresses=lambda: (), read_nfacct=None)
    svc, eps = dns_objects("10.180.0.1")
    agent._received(listed(Kind.SERVICE, [svc], "1"))
    agent._received(listed(Kind.ENDPOINT_SLICE, [eps], "1"))
    agent._sync()
    value = agent.metrics.registry.get_sample_value
    v4 = {"ip_family": "IPv4"}
    assert value("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", v4) == 1
    assert value("kubeproxy_conntrack_reconciler_deleted_entries_total", v4) == 2, "cluster IP and NodePort"
    written = restored_rules(ipt.restores[-1])
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat", **v4}) == written["nat"] > 0
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "filter", **v4}) == written["filter"]
    _, moved = dns_objects("10.180.0.2")
    agent._received(Upserted(Kind.ENDPOINT_SLICE, object_ref(moved), decode(moved), "2"))
    ipt.fail_next = 1
    with pytest.raises(PartialRestoreError):
        agent._sync()
    assert value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", v4) == 1
    assert value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", v4) == 1
    agent._sync()  # the retry is a full sync: its rules are counted again
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat", **v4}) == (
        restored_rules(ipt.restores[-1])["nat"])
    assert value("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", v4) == 2
    assert value("kubeproxy_conntrack_reconciler_deleted_entries_total", v4) == 3, "the flow to 10.180.0.1"
    assert value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", v4) == 1
