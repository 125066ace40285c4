"""The configuration file of `nodeagent run --config`: kube-proxy's names, strict validation, flags win."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.config import RUN_PARAMETER, AgentConfig, ConfigError, parse_config, parse_duration, read_config

HEAD = "apiVersion: config.nodeagent.io/v1alpha1\nkind: NodeAgentConfiguration\n"
FULL = HEAD + """\
mode: iptables
hostnameOverride: worker-1
clientConnection: {kubeconfig: /etc/kubernetes/nodeagent.conf}
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
masqueradeAll: true
nodePortAddresses: [192.168.56.0/24, 10.0.0.0/8]
syncPeriod: 1m30s
minSyncPeriod: 500ms
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
iptables: {backend: nft}
bpf: {cgroupPath: /host/sys/fs/cgroup, scope: host}
"""


def test_every_field_is_read_into_the_run_parameters() -> None:
    config = parse_config(FULL)
    assert config.run_defaults() == {
        "mode": "iptables", "node_name": "worker-1", "kubeconfig": "/etc/kubernetes/nodeagent.conf",
        "cluster_cidr": "10.244.0.0/16,fd00:10:244::/56", "masquerade_all": True,
        "nodeport_addresses": "192.168.56.0/24,10.0.0.0/8", "sync_period": 90.0, "min_sync_period": 0.5,
        "healthz_bind_address": "0.0.0.0:10256", "metrics_bind_address": "127.0.0.1:10249",
        "iptables_backend": "nft", "cgroup_path": "/host/sys/fs/cgroup", "bpf_scope": "host",
    }


def test_fields_not_in_the_file_leave_the_flags_defaults_alone() -> None:
    assert parse_config(HEAD + "masqueradeAll: true\n").run_defaults() == {"masquerade_all": True}
    assert parse_config(HEAD).run_defaults() == {}


def test_the_config_defaults_are_the_flags_defaults() -> None:
    # AgentConfig documents the defaults; they must not drift from what `nodeagent run` gets without a file.
    flags = _run_params([])
    config = AgentConfig()
    mine: dict[str, Any] = {"mode": config.mode, "sync_period": config.sync_period,
                            "min_sync_period": config.min_sync_period, "masquerade_all": config.masquerade_all,
                            "healthz_bind_address": config.healthz_bind_address,
                            "metrics_bind_address": config.metrics_bind_address,
                            "iptables_backend": config.iptables_backend, "bpf_scope": config.bpf_scope,
                            "cluster_cidr": ",".join(config.cluster_cidrs),
                            "nodeport_addresses": ",".join(config.nodeport_addresses)}
    assert set(RUN_PARAMETER.values()) <= set(flags), "a config field maps to no `run` flag"
    assert {k: flags[k] for k in mine} == mine


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("0", 0.0), ("1h", 3600.0), ("1.5s", 1.5), ("250us", 0.00025),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "-1s", "1d", "1m 30s", "30 s", "1e3s"])
def test_not_durations(text: str) -> None:
    assert parse_duration(text) is None


BAD = [
    ("apiVersion: v1\nkind: NodeAgentConfiguration\n", "apiVersion", "v1", "must be config.nodeagent.io/v1alpha1"),
    ("apiVersion: config.nodeagent.io/v1alpha1\nkind: KubeProxyConfiguration\n", "kind",
     "KubeProxyConfiguration", "must be NodeAgentConfiguration"),
    (HEAD + "mode: ipvs\n", "mode", "ipvs", "must be one of auto, ebpf, nftables, iptables"),
    (HEAD + "syncPeriod: 30\n", "syncPeriod", 30, "must be a duration"),
    (HEAD + "syncPeriod: 0s\n", "syncPeriod", "0s", "must be greater than zero"),
    (HEAD + "minSyncPeriod: 1 second\n", "minSyncPeriod", "1 second", "must be a duration"),
    (HEAD + "syncPeriod: 1s\nminSyncPeriod: 5s\n", "minSyncPeriod", "5s", "must not be longer than syncPeriod (1s)"),
    (HEAD + "masqueradeAll: 'yes'\n", "masqueradeAll", "yes", "must be true or false"),
    (HEAD + "clusterCIDR: 10.244.0.0/33\n", "clusterCIDR", "10.244.0.0/33", "not a CIDR"),
    (HEAD + "clusterCIDR: 10.244.0.1/16\n", "clusterCIDR", "10.244.0.1/16", "has host bits set"),
    (HEAD + "clusterCIDR: [10.0.0.0/8]\n", "clusterCIDR", ["10.0.0.0/8"], "comma-separated"),
    (HEAD + "nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses", "10.0.0.0/8", "must be a list"),
    (HEAD + "nodePortAddresses: [10.0.0.0/8, primary]\n", "nodePortAddresses[1]", "primary", "not a CIDR"),
    (HEAD + "healthzBindAddress: localhost:10256\n", "healthzBindAddress", "localhost:10256", "not an IP address"),
    (HEAD + "metricsBindAddress: 0.0.0.0:99999\n", "metricsBindAddress", "0.0.0.0:99999", "not a number in 1-65535"),
    (HEAD + "metricsBindAddress: 10249\n", "metricsBindAddress", 10249, "must be HOST:PORT"),
    (HEAD + "hostnameOverride: Worker_1\n", "hostnameOverride", "Worker_1", "a DNS subdomain"),
    (HEAD + "iptables: {backend: ipset}\n", "iptables.backend", "ipset", "must be one of auto, nft, legacy"),
    (HEAD + "iptables: {minSyncPeriod: 1s}\n", "iptables.minSyncPeriod", "1s", "use the top-level minSyncPeriod"),
    (HEAD + "iptables: nft\n", "iptables", "nft", "must be a mapping"),
    (HEAD + "bpf: {cgroupPath: sys/fs/cgroup}\n", "bpf.cgroupPath", "sys/fs/cgroup", "must be an absolute path"),
    (HEAD + "bpf: {scope: 'a/b'}\n", "bpf.scope", "a/b", "a name of letters"),
    (HEAD + "bpf: {cgroup: /sys/fs/cgroup}\n", "bpf.cgroup", "/sys/fs/cgroup", "unknown field; known fields here: "
                                                                              "cgroupPath, scope"),
    (HEAD + "clusterCidr: 10.0.0.0/8\n", "clusterCidr", "10.0.0.0/8", "unknown field"),
    (HEAD + "ipvs: {scheduler: rr}\n", "ipvs", {"scheduler": "rr"}, "there is no IPVS mode"),
]


@pytest.mark.parametrize(("text", "path", "value", "reason"), BAD, ids=[b[1] + ":" + str(b[2]) for b in BAD])
def test_a_bad_value_is_named_with_its_field_and_value(text: str, path: str, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "cfg.yaml")
    [error] = caught.value.errors
    assert (error.path, error.value) == (path, value)
    assert reason in error.reason
    assert f"cfg.yaml: {path}: " in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + "mode: ipvs\nsyncPeriod: 30\nmasqueradeAll: 1\nfoo: bar\n")
    assert sorted(e.path for e in caught.value.errors) == ["foo", "masqueradeAll", "mode", "syncPeriod"]


@pytest.mark.parametrize(("text", "reason"), [("mode: [\n", "not YAML"), ("- a\n- b\n", "must be a mapping"),
                                              ("", "must be a mapping")])
def test_a_file_that_is_not_one_mapping(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        read_config(tmp_path / "absent.yaml")


def test_empty_values_mean_the_defaults_as_in_kube_proxy() -> None:
    config = parse_config(HEAD + "mode: ''\nclusterCIDR: ''\nhealthzBindAddress: ''\n")
    assert config.run_defaults() == {"mode": "auto", "cluster_cidr": "", "healthz_bind_address": ""}


def _run_params(args: list[str]) -> dict[str, Any]:
    """What `nodeagent run ARGS` would be called with, without running it."""
    run = main.commands["run"]
    with click.Context(main, info_name="nodeagent") as parent:
        return run.make_context("run", args, parent=parent).params


def test_run_takes_the_file_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL)
    params = _run_params(["--config", str(path)])
    assert (params["mode"], params["sync_period"], params["node_name"]) == ("iptables", 90.0, "worker-1")
    assert params["cgroup_path"] == Path("/host/sys/fs/cgroup")
    overridden = _run_params(["--mode", "ebpf", "--config", str(path), "--sync-period", "10"])
    assert (overridden["mode"], overridden["sync_period"], overridden["min_sync_period"]) == ("ebpf", 10.0, 0.5)


def test_node_name_from_the_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL)
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert _run_params(["--config", str(path)])["node_name"] == "from-env"


def test_run_with_a_bad_file_names_every_field_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + "mode: ipvs\nsyncPeriod: soon\n")
    result = CliRunner().invoke(main, ["run", "--config", str(path), "--node", "n1"])
    assert result.exit_code == 2, result.output
    assert f"{path}: mode: must be one of auto, ebpf, nftables, iptables (got 'ipvs')" in result.output
    assert f"{path}: syncPeriod: must be a duration such as 30s, 1m30s or 500ms (got 'soon')" in result.output
    assert "Traceback" not in result.output


# kube-proxy's own defaults document (pkg/proxy/apis/config/scheme/testdata/KubeProxyConfiguration/after/
# v1alpha1.yaml): what a cluster's kube-proxy ConfigMap holds when nothing was changed.
KUBE_PROXY_DEFAULTS = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""
KUBE_PROXY_HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def test_kube_proxys_defaults_document_is_taken_as_it_is() -> None:
    config = parse_config(KUBE_PROXY_DEFAULTS)
    assert config.run_defaults() == {
        "bind_address": "0.0.0.0", "tcp_be_liberal": False, "healthz_bind_address": "0.0.0.0:10256",
        "localhost_nodeports": True, "masquerade_all": False, "masquerade_bit": 14, "min_sync_period": 1.0,
        "sync_period": 30.0, "metrics_bind_address": "127.0.0.1:10249"}
    [warning] = config.warnings
    assert warning.startswith("KubeProxyConfiguration fields nodeagent does not implement (ignored): ")
    named = warning.split(": ", 1)[1].split(", ")
    assert named == sorted(named) and {"bindAddressHardFail", "configSyncPeriod", "conntrack.maxPerCore",
                                       "conntrack.min", "conntrack.tcpCloseWaitTimeout",
                                       "conntrack.tcpEstablishedTimeout", "conntrack.udpStreamTimeout",
                                       "conntrack.udpTimeout", "clientConnection.burst", "clientConnection.qps",
                                       "clientConnection.contentType", "enableProfiling", "ipvs.syncPeriod",
                                       "ipvs.strictARP", "logging.format", "nftables.masqueradeBit",
                                       "oomScoreAdj", "winkernel.enableDSR"} <= set(named)
    assert not {"iptables.masqueradeBit", "bindAddress", "healthzBindAddress", "mode"} & set(named)


def test_kube_proxys_fields_map_to_the_options() -> None:
    config = parse_config(KUBE_PROXY_HEAD + """\
mode: iptables
hostnameOverride: Worker-1
clientConnection: {kubeconfig: /var/lib/kube-proxy/kubeconfig.conf}
clusterCIDR: 10.244.0.0/16
bindAddress: 192.168.0.2
nodePortAddresses: [primary]
iptables: {masqueradeAll: true, masqueradeBit: 10, localhostNodePorts: false, syncPeriod: 1m, minSyncPeriod: 0s}
conntrack: {tcpBeLiberal: true}
""")
    assert config.run_defaults() == {
        "mode": "iptables", "node_name": "worker-1", "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf",
        "cluster_cidr": "10.244.0.0/16", "bind_address": "192.168.0.2", "nodeport_addresses": "primary",
        "masquerade_all": True, "masquerade_bit": 10, "localhost_nodeports": False, "sync_period": 60.0,
        "min_sync_period": 0.0, "tcp_be_liberal": True}
    assert config.warnings == ()
    assert parse_config(KUBE_PROXY_HEAD + "mode: ipvs\n").warnings[0].endswith(
        "mode=ipvs (nodeagent programs iptables or eBPF)")


KUBE_PROXY_BAD = [
    ("iptables: {masqueradeBit: 32}\n", "iptables.masqueradeBit", 32, "must be an integer in the range 0-31"),
    ("nodePortAddresses: [primary, 10.0.0.0/8]\n", "nodePortAddresses", ["primary", "10.0.0.0/8"],
     "can't use both 'primary' and CIDRs"),
    ("nodePortAddresses: [10.0.0.0/33]\n", "nodePortAddresses[0]", "10.0.0.0/33", "not a CIDR"),
    ("bindAddress: node1\n", "bindAddress", "node1", "must be an IP address"),
    ("iptables: {syncPeriod: 0s}\n", "iptables.syncPeriod", "0s", "must be greater than zero"),
    ("conntrack: {tcpBeLiberal: yes please}\n", "conntrack.tcpBeLiberal", "yes please", "must be true or false"),
    ("iptables: {masqueradeBits: 14}\n", "iptables.masqueradeBits", 14, "unknown field"),
    ("clusterCidr: 10.0.0.0/8\n", "clusterCidr", "10.0.0.0/8", "unknown field of KubeProxyConfiguration"),
    ("mode: userspace\n", "mode", "userspace", "must be one of iptables, ipvs, nftables"),
]


@pytest.mark.parametrize(("text", "path", "value", "reason"), KUBE_PROXY_BAD, ids=[b[1] for b in KUBE_PROXY_BAD])
def test_a_bad_kube_proxy_value_is_named_with_its_field(text: str, path: str, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(KUBE_PROXY_HEAD + text, "kube-proxy.yaml")
    [error] = caught.value.errors
    assert (error.path, error.value) == (path, value)
    assert reason in error.reason


def test_only_kube_proxys_v1alpha1_is_read() -> None:
    with pytest.raises(ConfigError, match=r"apiVersion: must be kubeproxy\.config\.k8s\.io/v1alpha1"):
        parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n")


def test_run_and_chains_take_a_kube_proxy_file_flags_win_and_unimplemented_fields_are_warned(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text(KUBE_PROXY_DEFAULTS.replace("masqueradeBit: 14\n  minSyncPeriod: 1s",
                                                "masqueradeBit: 12\n  minSyncPeriod: 2s"))
    params = _run_params(["--config", str(path)])
    assert (params["masquerade_bit"], params["min_sync_period"], params["localhost_nodeports"]) == (12, 2.0, True)
    assert _run_params(["--config", str(path), "--iptables-masquerade-bit", "3"])["masquerade_bit"] == 3
    manifests = tmp_path / "m"
    manifests.mkdir()
    result = CliRunner().invoke(main, ["chains", "--config", str(path), "--manifests", str(manifests),
                                       "--node", "n1", "--format", "restore"])
    assert result.exit_code == 0, result.output
    assert "--or-mark 0x00001000" in result.stdout
    assert result.stderr.count("warning: ") == 1 and "conntrack.maxPerCore" in result.stderr
