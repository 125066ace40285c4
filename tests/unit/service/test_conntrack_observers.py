"""Who hears of the conntrack reconciler's passes in each datapath (what `/metrics` publishes as kube-proxy's
conntrack reconciler families): the iptables proxier's reconciler; in eBPF mode the kernel's table, the iptables
side's, and tc's flow map, also when `start` makes that one after the agent began observing (no root)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from nodeagent.kernel.bpf import loader, tc
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Reconciled
from nodeagent.service.datapath import ObservesConntrack
from nodeagent.service.ebpf.maps import MapSync
from nodeagent.service.ebpf.proxier import EbpfProxier
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.support.services import ep, service, slice_, snapshot_of
from tests.unit.service.ebpf.test_maps import memory_maps
from tests.unit.service.iptables.test_proxier import RecordingIptables
from tests.unit.service.test_conntrack import FakeTable, flow

CONFIG = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"))
CLUSTER_IP, LIVE, GONE = "172.30.0.10", "10.180.0.1", "10.180.0.9"


def dns() -> Any:
    return snapshot_of(service("ns", "dns", CLUSTER_IP, protocol="UDP", port=53, type_="NodePort", node_port=30053),
                       slice_("ns", "dns", ep(LIVE), port=53, protocol="UDP"))


def stale_table() -> FakeTable:
    return FakeTable([flow("udp", CLUSTER_IP, 53, GONE, 53), flow("udp", CLUSTER_IP, 53, LIVE, 53)])


def ebpf(external: IptablesProxier | None, *, tc_active: bool, **fields: Any) -> EbpfProxier:
    maps, _ = memory_maps()
    return EbpfProxier("scope", Path("/sys/fs/cgroup/test"), external=external,
                       datapath=loader.ServicePrograms("scope", Path("/nonexistent"), {}, True),
                       _maps=MapSync(maps), tc_active=tc_active, tc_interfaces=["eth0"], **fields)


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "attach", lambda datapath, cgroup: [])
    monkeypatch.setattr(iptables_cleanup, "cleanup", lambda ipt: [])


def test_ebpf_with_tc_reports_the_kernels_table_and_tcs_flows(no_kernel: None) -> None:
    """tc's flows count under the kernel's family (see EbpfProxier.observe_conntrack): one pass per table."""
    kernel, tc_flows = stale_table(), stale_table()
    node = ebpf(None, tc_active=True, conntrack=ConntrackReconciler(kernel),
                tc_flows=ConntrackReconciler(tc_flows))
    assert isinstance(node, ObservesConntrack)
    seen: list[Reconciled] = []
    node.observe_conntrack(seen.append)
    node.sync(dns(), CONFIG, set())
    assert [(r.ip_family, r.deleted) for r in seen] == [("IPv4", 1), ("IPv4", 1)]
    assert len(kernel.entries) == len(tc_flows.entries) == 1


def test_ebpf_without_tc_reports_the_iptables_sides_passes(no_kernel: None) -> None:
    table = stale_table()
    external = IptablesProxier(RecordingIptables(), conntrack=ConntrackReconciler(table))  # type: ignore[arg-type]
    node = ebpf(external, tc_active=False, conntrack=ConntrackReconciler(FakeTable([])))
    seen: list[Reconciled] = []
    node.observe_conntrack(seen.append)
    node.sync(dns(), CONFIG, set())
    assert [(r.ip_family, r.deleted) for r in seen] == [("IPv4", 1)], "the iptables side reconciles the kernel's"


def test_tcs_reconciler_made_at_start_reports_to_those_already_observing(monkeypatch: pytest.MonkeyPatch) -> None:
    programs = loader.ServicePrograms("scope", Path("/nonexistent"), {}, True)
    monkeypatch.setattr(loader, "load", lambda scope: programs)
    monkeypatch.setattr(loader, "attach", lambda datapath, cgroup: [])
    monkeypatch.setattr(tc, "load_tc", lambda datapath: None)
    monkeypatch.setattr(tc, "attach_tc", lambda datapath, interfaces: None)
    monkeypatch.setattr(MapHandle, "pinned", staticmethod(lambda path, key, value: object()))
    monkeypatch.setattr("nodeagent.service.ebpf.proxier.TcFlowTable", lambda handle, family: stale_table())
    node = EbpfProxier("scope", Path("/sys/fs/cgroup/test"), tc_interfaces=["eth0"],
                       conntrack=ConntrackReconciler(FakeTable([])))
    seen: list[Reconciled] = []
    node.observe_conntrack(seen.append)
    node.start()
    assert node.tc_flows is not None and node.tc_flows.observers == [seen.append]
    node.tc_flows.after_sync(dns().service_ports, dns().endpoints, set())
    assert [r.deleted for r in seen] == [1]


def test_with_tc_stale_flows_go_only_after_the_maps_stop_choosing_the_removed_backend(
        no_kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A datagram between the deletion and the maps' update would make a new flow to the removed backend that no
    later pass deletes (an agent restarted with adopted maps still holding it): the maps first, then the flows,
    as kube-proxy cleans conntrack after iptables-restore."""
    order: list[str] = []

    class Recording(FakeTable):
        def delete(self, family: int, match: Any) -> int:
            order.append("flows deleted")
            return super().delete(family, match)

    apply = MapSync.apply

    def recording_apply(self: MapSync, *args: Any, **kwargs: Any) -> Any:
        order.append("maps applied")
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(MapSync, "apply", recording_apply)
    node = ebpf(None, tc_active=True, conntrack=ConntrackReconciler(stale_table()),
                tc_flows=ConntrackReconciler(Recording(stale_table().entries)))
    node.sync(dns(), CONFIG, set())
    assert order == ["maps applied", "flows deleted"]
