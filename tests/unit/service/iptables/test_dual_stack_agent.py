"""The agent runs an IPv6 proxier beside the IPv4 one, as kube-proxy's metaproxier runs one per family: it starts
once the node has IPv6 to serve, syncs from its own configuration, and reports under `ip_family="IPv6"`; a
failure of one family holds the other back in nothing. Recording stand-ins for the iptables binaries (no root)."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Upserted
from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.daemon import run as agent_daemon
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.kernel.netfilter import Iptables, IptablesError
from nodeagent.observability.health import IPV4, IPV6
from nodeagent.service.config import ProxyConfig, ProxySettings
from nodeagent.service.conntrack import ConntrackReconciler, Filter
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.support.events import listed
from tests.support.services import ep, service, slice_


class RecordingIptables:
    """Remembers restores of one family; fails the next `fail_next` of them like iptables-restore does."""

    backend = "nft"
    netns = None

    def __init__(self, family: int) -> None:
        self.family = family
        self.restores: list[str] = []
        self.fail_next = 0

    def restore(self, text: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise IptablesError("ip6tables-nft-restore failed: line 3 failed")
        self.restores.append(text)

    def save(self, table: str) -> str:
        return ""

    def chain_names(self, table: str) -> set[str]:
        return set()

    def chain_exists(self, table: str, chain: str) -> bool:
        return True

    def ensure_chain(self, table: str, chain: str) -> None:
        pass

    def ensure_rule_first(self, *args: Any) -> bool:
        return True


class NoFlows:
    def flows(self, family: int, protocol: str = "udp") -> list[Any]:
        return []

    def delete(self, family: int, match: Filter) -> int:
        return 0


class _NoSource:
    def start(self) -> object:
        return self

    def stop(self) -> None:
        pass


def proxier(ipt: RecordingIptables) -> IptablesProxier:
    return IptablesProxier(ipt, sync_period=1e6, conntrack=ConntrackReconciler(NoFlows()))  # type: ignore[arg-type]


def node(*addresses: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def dual_stack() -> list[dict[str, Any]]:
    v6 = slice_("ns1", "svc1", ep("fd00:10:1::5"))
    v6["addressType"], v6["metadata"]["name"] = "IPv6", "svc1-v6"
    return [service("ns1", "svc1", "172.30.0.41", clusterIPs=["172.30.0.41", "fd00:172:30::41"],
                    ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"),
            slice_("ns1", "svc1", ep("10.244.1.5")), v6]


def agent_on(node_raw: dict[str, Any], settings: ProxySettings | None = None) -> tuple[Agent, RecordingIptables,
                                                                                        RecordingIptables]:
    v4, v6 = RecordingIptables(4), RecordingIptables(6)
    agent = Agent(AgentOptions("node1", healthz_port=None, proxy=settings or ProxySettings()), lambda sink: _NoSource(),
                  proxier(v4), addresses=lambda: (), read_nfacct=None, ipv6_proxier=proxier(v6))
    objects = dual_stack()
    agent._received(listed(Kind.NODE, [node_raw], "1"))
    agent._received(listed(Kind.SERVICE, [objects[0]], "1"))
    agent._received(listed(Kind.ENDPOINT_SLICE, objects[1:], "1"))
    return agent, v4, v6


def value(agent: Agent, name: str, **labels: str) -> float | None:
    return agent.metrics.registry.get_sample_value(name, labels)


def test_an_ipv4_only_node_never_touches_ip6tables_and_reports_the_ipv6_half() -> None:
    agent, v4, v6 = agent_on(node("192.168.0.2"))
    agent._sync()
    assert v4.restores and v6.restores == []
    assert "172.30.0.41" in v4.restores[-1] and "fd00" not in v4.restores[-1]
    snapshot = agent.tracker.last()
    assert snapshot is not None
    (rejection,) = snapshot.rejections_of(ObjectRef(Kind.SERVICE, "ns1", "svc1"))
    assert rejection.field == "spec.ipFamilies[1]" and "IPv6 is not served" in rejection.reason
    assert value(agent, "nodeagent_rejected_objects", kind="Service", scope="family") == 1
    assert value(agent, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family=IPV6) is None
    assert set(agent.health.health().status) == {IPV4}


def test_a_node_with_ipv6_runs_the_ipv6_proxier_with_its_own_rules_and_metrics() -> None:
    agent, v4, v6 = agent_on(node("192.168.0.2", "2001:db8::2"))
    agent._sync()
    assert "fd00:172:30::41" in v6.restores[-1] and "[fd00:10:1::5]:80" in v6.restores[-1]
    assert "172.30.0.41" not in v6.restores[-1] and "fd00" not in v4.restores[-1]
    assert "! -d ::1/128" in v6.restores[-1] and "KUBE-FIREWALL" not in v6.restores[-1]
    snapshot = agent.tracker.last()
    assert snapshot is not None and snapshot.rejections == {}
    for family in (IPV4, IPV6):
        assert value(agent, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family=family) is not None
        assert value(agent, "kubeproxy_sync_proxy_rules_iptables_total", table="nat", ip_family=family)
    assert set(agent.health.health().status) == {IPV4, IPV6}
    # a change reaches both families' rules; each proxier rewrites only that Service (a partial sync)
    moved = dual_stack()[2]
    moved["endpoints"] = [ep("fd00:10:1::9")]
    agent._received(Upserted(Kind.ENDPOINT_SLICE, object_ref(moved), decode(moved), "2"))
    agent._sync()
    assert "[fd00:10:1::9]:80" in v6.restores[-1] and "[fd00:10:1::5]:80" not in v6.restores[-1]


def test_an_ipv6_cluster_cidr_starts_the_ipv6_proxier_before_the_node_says_so() -> None:
    settings = ProxySettings(cluster_cidrs=(ip_network("fd00:10::/48"),))
    agent, _, v6 = agent_on(node("192.168.0.2"), settings)
    agent._sync()
    assert v6.restores and "! -s fd00:10::/48 -j KUBE-MARK-MASQ" in v6.restores[-1]


def test_a_failing_ipv6_sync_holds_the_ipv4_one_back_in_nothing() -> None:
    agent, v4, v6 = agent_on(node("192.168.0.2", "2001:db8::2"))
    v6.fail_next = 1
    with pytest.raises(IptablesError):
        agent._sync()
    assert len(v4.restores) == 1 and v6.restores == []
    assert value(agent, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family=IPV6) == 1
    assert value(agent, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family=IPV4) is None
    assert agent.synced.is_set()  # the IPv4 rules are in place
    agent._sync()  # the retry: the IPv6 proxier's is a full sync with the Services it still owes
    assert "fd00:172:30::41" in v6.restores[-1]


def test_a_proxier_refuses_a_configuration_of_the_other_family() -> None:
    snapshot = agent_on(node("192.168.0.2"))[0].tracker.snapshot()
    assert snapshot is not None
    with pytest.raises(ValueError, match="IPv6 proxier was given an IPv4 configuration"):
        proxier(RecordingIptables(6)).sync(snapshot, ProxyConfig(node_name="node1"), set())


def test_run_builds_an_ip6tables_proxier_of_the_same_backend_in_either_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.IPTABLES,
                                                                  iptables_backend="legacy"))
    assert chosen.ipv6 is not None and chosen.ipv6.ipt == Iptables("legacy", ipv6=True)
    assert chosen.reason == "asked for (--mode iptables)"

    class LoadedEbpf:
        mode_detail = "ebpf: cgroup connect4"

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def start(self) -> LoadedEbpf:
            return self

        def ipv6_side(self, external: IptablesProxier) -> IptablesProxier:  # its IPv6 side: fed ip6tables
            return external

    monkeypatch.setattr(agent_daemon, "EbpfProxier", LoadedEbpf)
    monkeypatch.setattr(agent_daemon, "external_interfaces", lambda: ())
    ebpf = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", iptables_backend="nft",
                                                                cgroup=Path("/sys/fs/cgroup")))
    assert ebpf.mode == "ebpf" and ebpf.ipv6 is not None and ebpf.ipv6.ipt.ipv6
    # never silently: the mode reason says who serves IPv6 Services
    assert ebpf.reason == ("ebpf: cgroup connect4; IPv6 Services: cgroup connect6/sendmsg6/recvmsg6/getpeername6, "
                           "from outside the node the same path as IPv4's, ip6tables kept for what tc leaves to the "
                           "stack (extension headers, fragments)")
