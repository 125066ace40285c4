"""The composition roots' choices, without root: which datapath `run` takes (and why), where sources come
from, how the mesh captures, and the errors that stop a daemon before it starts."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from nodeagent.cluster.discovery.manifests import ManifestSource
from nodeagent.cluster.events import Event
from nodeagent.daemon import run as agent_daemon
from nodeagent.daemon.ca import CaRunOptions
from nodeagent.daemon.ca import main as ca_main
from nodeagent.daemon.errors import StartError
from nodeagent.daemon.mesh import MeshOptions, mesh_capture
from nodeagent.daemon.sources import SourceOptions, source_factory
from nodeagent.daemon.tunnel import CaCredentials
from nodeagent.errors import NodeAgentError
from nodeagent.kernel.bpf.loader import BpfError
from nodeagent.mesh.iptables.capture import IptablesCapture
from nodeagent.service.config import CT_STATE_INVALID_DROPPED, ProxySettings
from nodeagent.service.nftables.proxier import NftablesProxier


def ignore(event: Event) -> None:
    del event


class NoEbpf:
    """An EbpfProxier whose programs cannot load."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise BpfError("no BTF in this kernel")


def test_iptables_asked_for_is_taken_with_that_reason() -> None:
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.IPTABLES,
                                                                  iptables_backend="nft"))
    assert (chosen.mode, chosen.reason, chosen.backend) == ("iptables", "asked for (--mode iptables)", "nft")


def test_auto_falls_back_to_iptables_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "EbpfProxier", NoEbpf)
    monkeypatch.setattr(agent_daemon, "nftables_unsupported", lambda: "kernel 5.4 is older than 5.13")
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", iptables_backend="nft",
                                                                  cgroup=Path("/sys/fs/cgroup")))
    assert chosen.mode == "iptables"
    assert chosen.reason == ("eBPF unavailable, fell back to iptables: no BTF in this kernel "
                             "(nftables unavailable: kernel 5.4 is older than 5.13)")


def test_auto_falls_back_to_nftables_where_the_kernel_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "EbpfProxier", NoEbpf)
    monkeypatch.setattr(agent_daemon, "nftables_unsupported", lambda: None)
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", iptables_backend="nft",
                                                                  cgroup=Path("/sys/fs/cgroup")))
    assert chosen.mode == "nftables"
    assert chosen.reason == "eBPF unavailable, fell back to nftables: no BTF in this kernel"
    assert isinstance(chosen.proxier, NftablesProxier)
    assert isinstance(chosen.ipv6, NftablesProxier)
    assert (chosen.proxier.family, chosen.ipv6.family) == (4, 6)


def test_nftables_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "nftables_unsupported", lambda: None)
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.NFTABLES,
                                                                  iptables_backend="nft"))
    assert (chosen.mode, chosen.reason) == ("nftables", "asked for (--mode nftables)")


def test_nftables_asked_for_and_unavailable_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "nftables_unsupported", lambda: "the kernel refused numgen")
    with pytest.raises(StartError, match=r"^nftables datapath unavailable: the kernel refused numgen\. "):
        agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.NFTABLES,
                                                             iptables_backend="nft"))


def test_ebpf_asked_for_and_unavailable_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "EbpfProxier", NoEbpf)
    with pytest.raises(StartError, match=r"^eBPF datapath unavailable: no BTF in this kernel\. `nodeagent doctor`"):
        agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.EBPF,
                                                             iptables_backend="nft", cgroup=Path("/sys/fs/cgroup")))


def test_start_errors_are_nodeagent_errors() -> None:
    assert issubclass(StartError, NodeAgentError)


def test_the_mesh_captures_with_iptables_unless_ebpf_and_pod_cgroups_are_known() -> None:
    assert isinstance(mesh_capture(False, "nft", "host", MeshOptions(kubelet_cgroup_root=Path("/x"))), IptablesCapture)
    assert isinstance(mesh_capture(True, "nft", "host", MeshOptions()), IptablesCapture)


def test_manifests_win_over_the_api(tmp_path: Path) -> None:
    make = source_factory(SourceOptions(manifests=tmp_path, kubeconfig="/nonexistent"), "n1")
    assert isinstance(make(ignore), ManifestSource)


def test_tunnel_credentials_that_cannot_be_read_stop_the_start(tmp_path: Path) -> None:
    (tmp_path / "root-cert.pem").write_text("root")
    credentials = CaCredentials("ca:15012", tmp_path / "token", tmp_path / "root-cert.pem")
    with pytest.raises(StartError, match=r"^tunnel credentials: .*token"):
        credentials.fetcher()


def test_a_ca_without_its_keys_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(StartError, match=r"^mesh CA: "):
        ca_main(CaRunOptions(ca_dir=tmp_path, tunnel_account=("nodeagent", "nodeagent-ztunnel"),
                             source=SourceOptions(manifests=tmp_path), token_file_dir=tmp_path))


def sysctl_dir(tmp_path: Path, **values: int) -> Path:
    from nodeagent.kernel import sysctl

    for name, value in {sysctl.ROUTE_LOCALNET: 0, sysctl.TCP_BE_LIBERAL: 0, **values}.items():
        path = sysctl.path_of(name, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return tmp_path


def kernel_at(root: Path, counters: frozenset[str] = frozenset(),
              random_fully: bool = True) -> agent_daemon.KernelAccess:
    return agent_daemon.KernelAccess(root, lambda: random_fully, lambda names: counters & frozenset(names))


def test_prepare_kernel_sets_route_localnet_for_localhost_nodeports_and_reads_what_the_kernel_has(
        tmp_path: Path) -> None:
    from nodeagent.kernel import sysctl

    root = sysctl_dir(tmp_path)
    proxy = agent_daemon.prepare_kernel(agent_daemon.RunOptions("n1"),
                                        kernel_at(root, frozenset({CT_STATE_INVALID_DROPPED})))
    assert sysctl.read(sysctl.ROUTE_LOCALNET, root) == 1
    assert proxy.random_fully and proxy.nfacct_counters == {CT_STATE_INVALID_DROPPED}
    assert not proxy.conntrack_tcp_liberal and sysctl.read(sysctl.TCP_BE_LIBERAL, root) == 0


@pytest.mark.parametrize("proxy", [ProxySettings(localhost_nodeports=False),
                                   ProxySettings(nodeport_addresses=(ip_network("192.168.0.0/24"),)),
                                   ProxySettings(nodeport_primary=True)])
def test_route_localnet_is_left_alone_without_localhost_nodeports(tmp_path: Path, proxy: ProxySettings) -> None:
    from nodeagent.kernel import sysctl

    root = sysctl_dir(tmp_path)
    agent_daemon.prepare_kernel(agent_daemon.RunOptions("n1", proxy=proxy), kernel_at(root))
    assert sysctl.read(sysctl.ROUTE_LOCALNET, root) == 0


def test_tcp_be_liberal_is_set_when_asked_and_read_in_any_case(tmp_path: Path) -> None:
    from nodeagent.kernel import sysctl

    root = sysctl_dir(tmp_path)
    options = agent_daemon.RunOptions("n1", random_fully=False, conntrack_tcp_be_liberal=True)
    proxy = agent_daemon.prepare_kernel(options, kernel_at(root))
    assert proxy.conntrack_tcp_liberal and not proxy.random_fully
    assert sysctl.read(sysctl.TCP_BE_LIBERAL, root) == 1
    already = sysctl_dir(tmp_path / "other", **{sysctl.TCP_BE_LIBERAL: 1})
    assert agent_daemon.prepare_kernel(agent_daemon.RunOptions("n1"), kernel_at(already)).conntrack_tcp_liberal


def test_a_sysctl_that_cannot_be_set_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(StartError, match=r"cannot set required sysctl for proxy: cannot read net\.ipv4\.conf\.all"):
        agent_daemon.prepare_kernel(agent_daemon.RunOptions("n1"), kernel_at(tmp_path))
