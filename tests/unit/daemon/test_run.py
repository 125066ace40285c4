"""The composition roots' choices, without root: which datapath `run` takes (and why), where sources come
from, how the mesh captures, and the errors that stop a daemon before it starts."""

from __future__ import annotations

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
    chosen = agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", iptables_backend="nft",
                                                                  cgroup=Path("/sys/fs/cgroup")))
    assert chosen.mode == "iptables"
    assert chosen.reason == "eBPF unavailable, fell back to iptables: no BTF in this kernel"


def test_ebpf_asked_for_and_unavailable_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "EbpfProxier", NoEbpf)
    with pytest.raises(StartError, match=r"^eBPF datapath unavailable: no BTF in this kernel\. `nodeagent doctor`"):
        agent_daemon.choose_datapath(agent_daemon.RunOptions("n1", mode=agent_daemon.ModeRequest.EBPF,
                                                             iptables_backend="nft", cgroup=Path("/sys/fs/cgroup")))


def test_start_errors_are_nodeagent_errors() -> None:
    assert issubclass(StartError, NodeAgentError)


def test_the_mesh_captures_with_iptables_unless_ebpf_and_pod_cgroups_are_known() -> None:
    assert isinstance(mesh_capture(False, "nft", "host", MeshOptions(pod_cgroup_parent=Path("/x"))), IptablesCapture)
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
