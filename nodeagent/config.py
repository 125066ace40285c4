"""The agent's configuration file (`nodeagent run --config FILE`): parsed, validated, never half-applied.

Two kinds, told apart by apiVersion and kind. A cluster's kube-proxy configuration (`apiVersion:
kubeproxy.config.k8s.io/v1alpha1`, `kind: KubeProxyConfiguration`, e.g. the kube-proxy ConfigMap's
config.conf) is taken as it is: every field nodeagent implements sets its option, every other field present
is named in one warning (`AgentConfig.warnings`), a bad value of either is an error naming the field.

Or nodeagent's own, one YAML document `kind: NodeAgentConfiguration`, with kube-proxy's field names where
the concept is the same (KubeProxyConfiguration: `mode`, `hostnameOverride`, `clientConnection.kubeconfig`,
`clusterCIDR`, `masqueradeAll`, `nodePortAddresses`, `syncPeriod`, `minSyncPeriod`, `healthzBindAddress`,
`metricsBindAddress`) and durations written as kube-proxy writes them ("30s", "1m30s", "500ms"), so a
kube-proxy configuration's values carry over. Decoding is strict as kube-proxy's: an unknown field is an
error (a typo must not silently fall back to a default). Every problem is reported, each naming the field
path and the bad value, and the file is rejected whole: an agent never runs on a half-understood file.

Pure: text in, a frozen `AgentConfig` (or `ConfigError`) out. `run_defaults()` turns it into the defaults
of `nodeagent run`'s options, so flags given explicitly still win.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nodeagent.errors import NodeAgentError

API_VERSION = "config.nodeagent.io/v1alpha1"
KIND = "NodeAgentConfiguration"
MODES = ("auto", "ebpf", "nftables", "iptables")
IPTABLES_BACKENDS = ("auto", "nft", "legacy")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# kube-proxy's fields that have no meaning here, with what to do instead (a plain "unknown field" would
# leave someone migrating a kube-proxy configuration guessing).
_KUBE_PROXY_ONLY = {
    "iptables.syncPeriod": "use the top-level syncPeriod",
    "iptables.minSyncPeriod": "use the top-level minSyncPeriod",
    "iptables.masqueradeAll": "use the top-level masqueradeAll",
    "ipvs": "there is no IPVS mode; mode is auto, ebpf, nftables or iptables",
    "nftables": "mode: nftables takes the top-level syncPeriod, minSyncPeriod, masqueradeAll and masqueradeBit",
    "bindAddress": "use the --bind-address flag, or a KubeProxyConfiguration file",
}


@dataclass(frozen=True)
class FieldError:
    """One problem: the field's path in the file, the value found, and why it is wrong."""

    path: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} (got {self.value!r})"


class ConfigError(NodeAgentError):
    """The file cannot be used; `errors` names every bad field."""

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = tuple(errors)
        lines = "\n".join(f"  {source}: {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} problem(s) in the configuration:\n{lines}")


@dataclass(frozen=True)
class AgentConfig:
    """A validated configuration. Defaults are those of `nodeagent run` (a test keeps them equal)."""

    mode: str = "auto"
    hostname_override: str = ""
    kubeconfig: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"  # kube-proxy's default: metrics stay on the node
    iptables_backend: str = "auto"
    bpf_cgroup_path: str = ""
    bpf_scope: str = "host"
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    bind_address: str = "0.0.0.0"
    tcp_be_liberal: bool = False
    given: frozenset[str] = field(default=frozenset(), compare=False)  # the fields the file set
    # a KubeProxyConfiguration's fields nodeagent does not implement (present in the file, not applied)
    not_implemented: tuple[str, ...] = field(default=(), compare=False)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the file says that the agent will not do: one warning naming every such field (or none)."""
        if not self.not_implemented:
            return ()
        return (f"KubeProxyConfiguration fields nodeagent does not implement (ignored): "
                f"{', '.join(self.not_implemented)}",)

    def run_defaults(self) -> dict[str, Any]:
        """`nodeagent run`'s parameters (by their Python names) for every field the file set."""
        values: dict[str, Any] = {
            "mode": self.mode, "node_name": self.hostname_override, "kubeconfig": self.kubeconfig,
            "cluster_cidr": ",".join(self.cluster_cidrs), "masquerade_all": self.masquerade_all,
            "nodeport_addresses": ",".join(self.nodeport_addresses), "sync_period": self.sync_period,
            "min_sync_period": self.min_sync_period, "healthz_bind_address": self.healthz_bind_address,
            "metrics_bind_address": self.metrics_bind_address, "iptables_backend": self.iptables_backend,
            "cgroup_path": self.bpf_cgroup_path, "bpf_scope": self.bpf_scope,
            "masquerade_bit": self.masquerade_bit, "localhost_nodeports": self.localhost_nodeports,
            "bind_address": self.bind_address, "tcp_be_liberal": self.tcp_be_liberal,
        }
        parameter = RUN_PARAMETER | KUBE_PROXY_PARAMETER
        return {parameter[name]: values[parameter[name]] for name in sorted(self.given)}


# file field path -> `nodeagent run` parameter name
RUN_PARAMETER = {
    "mode": "mode", "hostnameOverride": "node_name", "clientConnection.kubeconfig": "kubeconfig",
    "clusterCIDR": "cluster_cidr", "masqueradeAll": "masquerade_all", "nodePortAddresses": "nodeport_addresses",
    "syncPeriod": "sync_period", "minSyncPeriod": "min_sync_period", "healthzBindAddress": "healthz_bind_address",
    "metricsBindAddress": "metrics_bind_address", "iptables.backend": "iptables_backend",
    "bpf.cgroupPath": "cgroup_path", "bpf.scope": "bpf_scope",
}

# KubeProxyConfiguration field path -> `nodeagent run` parameter name (what nodeagent implements)
KUBE_PROXY_API_GROUP = "kubeproxy.config.k8s.io/"
KUBE_PROXY_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KUBE_PROXY_KIND = "KubeProxyConfiguration"
KUBE_PROXY_PARAMETER = {
    "mode": "mode", "hostnameOverride": "node_name", "clientConnection.kubeconfig": "kubeconfig",
    "clusterCIDR": "cluster_cidr", "iptables.masqueradeAll": "masquerade_all",
    "iptables.masqueradeBit": "masquerade_bit", "iptables.localhostNodePorts": "localhost_nodeports",
    "iptables.syncPeriod": "sync_period", "iptables.minSyncPeriod": "min_sync_period",
    "nodePortAddresses": "nodeport_addresses", "bindAddress": "bind_address",
    "healthzBindAddress": "healthz_bind_address", "metricsBindAddress": "metrics_bind_address",
    "conntrack.tcpBeLiberal": "tcp_be_liberal",
}
# Every v1alpha1 field (kube-proxy's defaults document), by section; "*": a free-form section
_KUBE_PROXY_FIELDS: dict[str, set[str]] = {
    "": {"apiVersion", "kind", "bindAddress", "bindAddressHardFail", "clientConnection", "clusterCIDR",
         "configSyncPeriod", "conntrack", "detectLocal", "detectLocalMode", "enableProfiling", "featureGates",
         "healthzBindAddress", "hostnameOverride", "iptables", "ipvs", "logging", "metricsBindAddress", "mode",
         "nftables", "nodePortAddresses", "oomScoreAdj", "portRange", "showHiddenMetricsForVersion", "winkernel"},
    "clientConnection": {"acceptContentTypes", "burst", "contentType", "kubeconfig", "qps"},
    "conntrack": {"maxPerCore", "min", "tcpBeLiberal", "tcpCloseWaitTimeout", "tcpEstablishedTimeout",
                  "udpStreamTimeout", "udpTimeout"},
    "detectLocal": {"bridgeInterface", "interfaceNamePrefix"},
    "iptables": {"localhostNodePorts", "masqueradeAll", "masqueradeBit", "minSyncPeriod", "syncPeriod"},
    "ipvs": {"excludeCIDRs", "minSyncPeriod", "scheduler", "strictARP", "syncPeriod", "tcpFinTimeout",
             "tcpTimeout", "udpTimeout"},
    "nftables": {"masqueradeAll", "masqueradeBit", "minSyncPeriod", "syncPeriod"},
    "winkernel": {"enableDSR", "forwardHealthCheckVip", "networkName", "rootHnsEndpointName", "sourceVip"},
    "logging": {"*"}, "featureGates": {"*"},
}


def parse_duration(text: str) -> float | None:
    """Seconds from a Go duration ("30s", "1m30s", "500ms", "0"); None if it is not one. Negative: None."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if text else None


class _Reader:
    """Walks the document, collecting every error instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.given: set[str] = set()

    def fail(self, path: str, value: Any, reason: str) -> None:
        self.errors.append(FieldError(path, value, reason))

    def section(self, doc: Mapping[str, Any], name: str, known: set[str]) -> dict[str, Any]:
        value = doc.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(name, value, "must be a mapping")
            return {}
        self.unknown(value, known, f"{name}.")
        return {f"{name}.{k}": v for k, v in value.items() if k in known}

    def unknown(self, doc: Mapping[str, Any], known: set[str], prefix: str = "") -> None:
        for key in doc:
            path = f"{prefix}{key}"
            if path in _KUBE_PROXY_ONLY:
                self.fail(path, doc[key], f"not supported: {_KUBE_PROXY_ONLY[path]}")
            elif key not in known:
                self.fail(path, doc[key], f"unknown field; known fields here: {', '.join(sorted(known))}")

    def choice(self, values: Mapping[str, Any], path: str, allowed: tuple[str, ...], default: str) -> str:
        if path not in values:
            return default
        value = values[path]
        if value == "" and path == "mode":  # kube-proxy: empty mode means the default
            self.given.add(path)
            return default
        if value not in allowed:
            self.fail(path, value, f"must be one of {', '.join(allowed)}")
            return default
        self.given.add(path)
        return str(value)

    def boolean(self, values: Mapping[str, Any], path: str) -> bool:
        if path not in values:
            return False
        value = values[path]
        if not isinstance(value, bool):
            self.fail(path, value, "must be true or false")
            return False
        self.given.add(path)
        return value

    def duration(self, values: Mapping[str, Any], path: str, default: float, *, positive: bool) -> float:
        if path not in values:
            return default
        value = values[path]
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.fail(path, value, "must be a duration such as 30s, 1m30s or 500ms")
            return default
        if positive and seconds <= 0:
            self.fail(path, value, "must be greater than zero")
            return default
        self.given.add(path)
        return seconds

    def cidrs(self, values: Mapping[str, Any], path: str, *, as_list: bool) -> tuple[str, ...]:
        if path not in values:
            return ()
        value = values[path]
        if as_list:
            if not isinstance(value, list):
                self.fail(path, value, "must be a list of CIDRs, e.g. [10.0.0.0/8]")
                return ()
            parts = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        else:
            if not isinstance(value, str):
                self.fail(path, value, "must be a string of comma-separated CIDRs, e.g. 10.244.0.0/16,fd00::/108")
                return ()
            parts = [(path, item.strip()) for item in value.split(",") if item.strip()]
        good = []
        for where, item in parts:
            try:
                good.append(str(ipaddress.ip_network(item)))
            except (ValueError, TypeError) as exc:
                self.fail(where, item, f"not a CIDR ({exc})" if isinstance(item, str) else "not a CIDR")
        if len(good) == len(parts):
            self.given.add(path)
        return tuple(good)

    def bind_address(self, values: Mapping[str, Any], path: str, default: str) -> str:
        if path not in values:
            return default
        value = values[path]
        if value == "":  # off, as the flag's empty value
            self.given.add(path)
            return ""
        if not isinstance(value, str) or ":" not in value:
            self.fail(path, value, "must be HOST:PORT (e.g. 0.0.0.0:10256), or empty to turn it off")
            return default
        host, _, port = value.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            self.fail(path, value, f"host {host!r} is not an IP address")
            return default
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            self.fail(path, value, f"port {port!r} is not a number in 1-65535")
            return default
        self.given.add(path)
        return value

    def integer(self, values: Mapping[str, Any], path: str, default: int, low: int, high: int) -> int:
        if path not in values:
            return default
        value = values[path]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, value, f"must be an integer in the range {low}-{high}")
            return default
        self.given.add(path)
        return value

    def ip(self, values: Mapping[str, Any], path: str, default: str) -> str:
        if path not in values:
            return default
        value = values[path]
        try:
            ipaddress.ip_address(value if isinstance(value, str) else "-")
        except ValueError:
            self.fail(path, value, "must be an IP address, e.g. 0.0.0.0")
            return default
        self.given.add(path)
        return str(value)

    def nodeport_addresses(self, values: Mapping[str, Any], path: str) -> tuple[str, ...]:
        value = values.get(path)
        if isinstance(value, list) and "primary" in value:
            if len(value) > 1:
                self.fail(path, value, "can't use both 'primary' and CIDRs")
                return ()
            self.given.add(path)
            return ("primary",)
        return self.cidrs(values, path, as_list=True)

    def text(self, values: Mapping[str, Any], path: str, pattern: re.Pattern[str] | None, what: str) -> str:
        if path not in values:
            return ""
        value = values[path]
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
            self.fail(path, value, f"must be {what}")
            return ""
        self.given.add(path)
        return value


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Parse and validate one configuration document; `ConfigError` lists every bad field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [FieldError("-", "", f"not YAML: {exc}")]) from exc
    if not isinstance(doc, Mapping):
        raise ConfigError(source, [FieldError("-", doc, "must be a mapping (one YAML document)")])
    r = _Reader()
    if str(doc.get("apiVersion", "")).startswith(KUBE_PROXY_API_GROUP):
        return _kube_proxy_config(doc, r, source)
    if doc.get("apiVersion") != API_VERSION:
        r.fail("apiVersion", doc.get("apiVersion"), f"must be {API_VERSION}")
    if doc.get("kind") != KIND:
        r.fail("kind", doc.get("kind"), f"must be {KIND}")
    top = {"apiVersion", "kind", "mode", "hostnameOverride", "clientConnection", "clusterCIDR", "masqueradeAll",
           "nodePortAddresses", "syncPeriod", "minSyncPeriod", "healthzBindAddress", "metricsBindAddress",
           "iptables", "bpf"}
    r.unknown(doc, top)
    values: dict[str, Any] = {k: v for k, v in doc.items() if k in top}
    values |= r.section(doc, "clientConnection", {"kubeconfig"})
    values |= r.section(doc, "iptables", {"backend"})
    values |= r.section(doc, "bpf", {"cgroupPath", "scope"})

    sync = r.duration(values, "syncPeriod", 30.0, positive=True)
    min_sync = r.duration(values, "minSyncPeriod", 1.0, positive=False)
    if {"syncPeriod", "minSyncPeriod"} & r.given and min_sync > sync:
        r.fail("minSyncPeriod", values.get("minSyncPeriod", "1s"),
               f"must not be longer than syncPeriod ({values.get('syncPeriod', '30s')})")
    cgroup = r.text(values, "bpf.cgroupPath", None, "an absolute path (the host's cgroup v2 root, as mounted)")
    if cgroup and not Path(cgroup).is_absolute():
        r.fail("bpf.cgroupPath", cgroup, "must be an absolute path")
        r.given.discard("bpf.cgroupPath")
    config = AgentConfig(
        mode=r.choice(values, "mode", MODES, "auto"),
        hostname_override=r.text(values, "hostnameOverride", _DNS_SUBDOMAIN, "a node name (a DNS subdomain)"),
        kubeconfig=r.text(values, "clientConnection.kubeconfig", None, "a path to a kubeconfig file"),
        cluster_cidrs=r.cidrs(values, "clusterCIDR", as_list=False),
        masquerade_all=r.boolean(values, "masqueradeAll"),
        nodeport_addresses=r.cidrs(values, "nodePortAddresses", as_list=True),
        sync_period=sync, min_sync_period=min_sync,
        healthz_bind_address=r.bind_address(values, "healthzBindAddress", "0.0.0.0:10256"),
        metrics_bind_address=r.bind_address(values, "metricsBindAddress", "127.0.0.1:10249"),
        iptables_backend=r.choice(values, "iptables.backend", IPTABLES_BACKENDS, "auto"),
        bpf_cgroup_path=cgroup,
        bpf_scope=r.text(values, "bpf.scope", _SCOPE, "a name of letters, digits, '.', '_' or '-'") or "host",
        given=frozenset(r.given),
    )
    if r.errors:
        raise ConfigError(source, r.errors)
    return config


def _kube_proxy_config(doc: Mapping[str, Any], r: _Reader, source: str) -> AgentConfig:
    """A KubeProxyConfiguration: what nodeagent implements mapped to its options, the rest named."""
    if doc.get("apiVersion") != KUBE_PROXY_API_VERSION:
        r.fail("apiVersion", doc.get("apiVersion"), f"must be {KUBE_PROXY_API_VERSION} (or {API_VERSION})")
    if doc.get("kind") != KUBE_PROXY_KIND:
        r.fail("kind", doc.get("kind"), f"must be {KUBE_PROXY_KIND}")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in doc.items():
        if key not in _KUBE_PROXY_FIELDS[""]:
            r.fail(key, value, "unknown field of KubeProxyConfiguration v1alpha1")
        elif key in _KUBE_PROXY_FIELDS and value is not None:
            if not isinstance(value, Mapping):
                r.fail(key, value, "must be a mapping")
                continue
            known = _KUBE_PROXY_FIELDS[key]
            for inner, item in value.items():
                if "*" not in known and inner not in known:
                    r.fail(f"{key}.{inner}", item, f"unknown field; known fields here: {', '.join(sorted(known))}")
                else:
                    values[f"{key}.{inner}"] = item
        elif key not in ("apiVersion", "kind"):
            values[key] = value
    # kube-proxy writes empty values for "the default": they set nothing here either
    values = {k: v for k, v in values.items() if v not in ("", None)}
    mode = values.pop("mode", None)
    if mode is not None:
        if mode in ("iptables", "nftables"):
            values["mode"] = mode
        elif mode in ("ipvs", "kernelspace"):
            ignored.append(f"mode={mode} (nodeagent programs iptables or eBPF)")
        else:
            r.fail("mode", mode, "must be one of iptables, ipvs, nftables, kernelspace or empty")
    if values.get("detectLocalMode", "ClusterCIDR") != "ClusterCIDR":
        ignored.append(f"detectLocalMode={values['detectLocalMode']} (ClusterCIDR is used)")
    values.pop("detectLocalMode", None)
    if "hostnameOverride" in values and isinstance(values["hostnameOverride"], str):
        values["hostnameOverride"] = values["hostnameOverride"].strip().lower()  # as kube-proxy
    ignored += sorted(path for path in values if path not in KUBE_PROXY_PARAMETER)

    sync = r.duration(values, "iptables.syncPeriod", 30.0, positive=True)
    min_sync = r.duration(values, "iptables.minSyncPeriod", 1.0, positive=False)
    if {"iptables.syncPeriod", "iptables.minSyncPeriod"} & r.given and min_sync > sync:
        r.fail("iptables.minSyncPeriod", values.get("iptables.minSyncPeriod", "1s"),
               f"must not be longer than iptables.syncPeriod ({values.get('iptables.syncPeriod', '30s')})")
    if "mode" in values:
        r.given.add("mode")
    config = AgentConfig(
        mode=values.get("mode", "auto"),
        hostname_override=r.text(values, "hostnameOverride", _DNS_SUBDOMAIN, "a node name (a DNS subdomain)"),
        kubeconfig=r.text(values, "clientConnection.kubeconfig", None, "a path to a kubeconfig file"),
        cluster_cidrs=r.cidrs(values, "clusterCIDR", as_list=False),
        masquerade_all=r.boolean(values, "iptables.masqueradeAll"),
        masquerade_bit=r.integer(values, "iptables.masqueradeBit", 14, 0, 31),
        localhost_nodeports=(r.boolean(values, "iptables.localhostNodePorts")
                             if "iptables.localhostNodePorts" in values else True),
        nodeport_addresses=r.nodeport_addresses(values, "nodePortAddresses"),
        sync_period=sync, min_sync_period=min_sync,
        bind_address=r.ip(values, "bindAddress", "0.0.0.0"),
        healthz_bind_address=r.bind_address(values, "healthzBindAddress", "0.0.0.0:10256"),
        metrics_bind_address=r.bind_address(values, "metricsBindAddress", "127.0.0.1:10249"),
        tcp_be_liberal=r.boolean(values, "conntrack.tcpBeLiberal"),
        given=frozenset(r.given), not_implemented=tuple(ignored),
    )
    if r.errors:
        raise ConfigError(source, r.errors)
    return config


def read_config(path: Path) -> AgentConfig:
    """Read and validate the file at `path` (a missing or unreadable file is a ConfigError too)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [FieldError("-", str(path), f"cannot read the file: {exc}")]) from exc
    return parse_config(text, str(path))
