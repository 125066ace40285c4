"""What a lab is made of, decided from its manifests: validation and address allocation, no I/O.

The lab needs a few things the API server and the controllers would fill in on a real cluster (pod IPs,
node pod CIDRs, Service cluster IPs and node ports, EndpointSlices); they are allocated here,
deterministically, so the same manifests always give the same lab. Every problem is collected and
reported with file, object and field before anything is created.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.kubelet import QuantityError, qos_class
from nodeagent.lab.endpoints import derive_endpoint_slices
from nodeagent.lab.errors import LabManifestError, ManifestProblem
from nodeagent.lab.families import ServiceCIDRs, allocate_cluster_ips, init_ip_families, used_cluster_ips
from nodeagent.lab.manifests import Document

DEFAULT_NODE_CIDR = IPv4Network("172.18.0.0/24")
DEFAULT_POD_SUPERNET = IPv4Network("10.244.0.0/16")
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/12")
# A dual-stack lab's IPv6 ranges when the manifests do not give them (kind's defaults for pods and
# Services): each IPv6 address mirrors its IPv4 one where it can, so 172.18.0.2 is fd00:18::2, pod CIDR
# 10.244.1.0/24 is fd00:10:244:1::/64 and pod 10.244.1.3 is fd00:10:244:1::3.
DEFAULT_NODE_CIDR6 = IPv6Network("fd00:18::/64")
DEFAULT_POD_SUPERNET6 = IPv6Network("fd00:10:244::/56")
DEFAULT_SERVICE_CIDR6 = IPv6Network("fd00:10:96::/112")
NODE_PORT_RANGE = range(30000, 32768)
LAB_CONFIG_API = "lab.nodeagent.io/v1alpha1"
PROTOCOLS = ("TCP", "UDP", "SCTP")

# Kinds the lab builds from, and kinds it only carries through to the agent's manifest source.
BUILT_KINDS = ("Node", "Namespace", "Pod", "Service", "EndpointSlice", "LabConfig")
CARRIED_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "ConfigMap")

# A pod's UID names its cgroup (a path part): UUID-like, lower case. Derived UIDs are UUIDv5 under LAB_UIDS.
_UID = re.compile(r"^[0-9a-f]([-0-9a-f]{0,62}[0-9a-f])?$")
LAB_UIDS = uuid.UUID("6c0e4b1e-7a5d-5d2e-9a43-1d0c5e9f2b11")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class ContainerPort:
    """A port a container declares; named ones are what a Service's string targetPort refers to."""

    port: int
    protocol: str = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Container:
    """An image-less container: the command the lab runs in the pod's netns and cgroup."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class LabNode:
    """A node: one network namespace on the fabric bridge and one cgroup. IPv4 is the lab's primary family;
    a node of a dual-stack lab has an IPv6 address and pod CIDR besides (None in an IPv4-only lab)."""

    name: str
    address: IPv4Address
    pod_cidr: IPv4Network
    address6: IPv6Address | None = None
    pod_cidr6: IPv6Network | None = None

    @property
    def gateway(self) -> IPv4Address:
        """The node's address inside its pod CIDR: every pod's default gateway."""
        return self.pod_cidr.network_address + 1

    @property
    def gateway6(self) -> IPv6Address | None:
        """The node's address inside its IPv6 pod CIDR: every pod's IPv6 default gateway."""
        return self.pod_cidr6.network_address + 1 if self.pod_cidr6 is not None else None

    @property
    def addresses(self) -> tuple[IPv4Address | IPv6Address, ...]:
        """The node's InternalIPs, IPv4 first (as its Node object lists them)."""
        return (self.address,) if self.address6 is None else (self.address, self.address6)

    @property
    def pod_cidrs(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """spec.podCIDRs: IPv4 first."""
        return (self.pod_cidr,) if self.pod_cidr6 is None else (self.pod_cidr, self.pod_cidr6)


@dataclass(frozen=True)
class LabPod:
    """A pod: one network namespace with a veth to its node, one cgroup under its node's."""

    namespace: str
    name: str
    node: str
    ip: IPv4Address
    labels: Mapping[str, str]
    containers: tuple[Container, ...]
    ip6: IPv6Address | None = None
    # metadata.uid (given, or one derived from the pod's name: the lab makes the pod's cgroup before the API server
    # holds the pod, as the kubelet makes it by the UID the API server gave) and status.qosClass
    uid: str = ""
    qos_class: str = "BestEffort"

    @property
    def ips(self) -> tuple[IPv4Address | IPv6Address, ...]:
        """status.podIPs: IPv4 first, then the IPv6 address of a dual-stack lab."""
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)

    @property
    def key(self) -> str:
        """`namespace/name`, how pods are named in logs and on the command line."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabTopology:
    """A validated lab: its nodes and pods, plus every object as the agent should see it."""

    nodes: tuple[LabNode, ...]
    pods: tuple[LabPod, ...]
    node_cidr: IPv4Network
    service_cidr: IPv4Network
    documents: tuple[Mapping[str, Any], ...] = field(repr=False)
    # a dual-stack lab's IPv6 node network and service CIDR; None in an IPv4-only lab
    node_cidr6: IPv6Network | None = None
    service_cidr6: IPv6Network | None = None

    @property
    def dual_stack(self) -> bool:
        """Whether nodes, pods and Services have IPv6 addresses besides their IPv4 ones."""
        return self.node_cidr6 is not None

    @property
    def service_cidrs(self) -> ServiceCIDRs:
        """The service CIDRs, IPv4 (the primary family) first, as kube-apiserver's --service-cluster-ip-range."""
        return ServiceCIDRs((self.service_cidr,) if self.service_cidr6 is None
                            else (self.service_cidr, self.service_cidr6))

    @property
    def api_server_address(self) -> IPv4Address:
        """Where the lab's API server listens (see `api_server_address`)."""
        return api_server_address(self.node_cidr)

    @property
    def api_server_address6(self) -> IPv6Address | None:
        """The lab API server namespace's IPv6 address on the fabric (a dual-stack lab's), mirroring the IPv4 one."""
        return None if self.node_cidr6 is None else _mirror(self.node_cidr6, self.node_cidr,
                                                                 self.api_server_address)

    def node(self, name: str) -> LabNode:
        """The node called `name` (KeyError if there is none)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

def _mirror(net6: IPv6Network, net4: IPv4Network, address: IPv4Address) -> IPv6Address:
    """The IPv6 address of `net6` at the offset `address` has in `net4` (fd00:18::2 for 172.18.0.2)."""
    return net6.network_address + (int(address) - int(net4.network_address))


def api_server_address(node_cidr: IPv4Network) -> IPv4Address:
    """The lab API server's address: the node network's last host (172.18.0.254 by default), never given to
    a node. Not the first host: that one is the mesh CA's, on the fabric bridge itself."""
    return node_cidr.broadcast_address - 1


class _Problems:
    """Collects problems so that every one of them is reported, not just the first."""

    def __init__(self) -> None:
        self.items: list[ManifestProblem] = []

    def add(self, doc: Document, field_path: str, message: str) -> None:
        self.items.append(ManifestProblem(doc.source, _describe(doc.body), field_path, message))


def _describe(body: Mapping[str, Any]) -> str:
    kind = body.get("kind") or "<no kind>"
    meta = _meta(body)
    name = meta.get("name") or "<no name>"
    namespace = meta.get("namespace")
    if kind in ("Pod", "Service", "EndpointSlice") and not namespace:
        namespace = "default"
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _ipv4(value: Any) -> IPv4Address | None:
    """Parse strictly: no leading zeros, no IPv6, no surrounding junk."""
    if not isinstance(value, str):
        return None
    try:
        return IPv4Address(value)
    except ValueError:
        return None


def _ipv4_net(value: Any) -> IPv4Network | None:
    if not isinstance(value, str):
        return None
    try:
        return IPv4Network(value, strict=True)
    except ValueError:
        return None


def _ipv6(value: Any) -> IPv6Address | None:
    if not isinstance(value, str):
        return None
    try:
        return IPv6Address(value)
    except ValueError:
        return None


def _ipv6_net(value: Any) -> IPv6Network | None:
    if not isinstance(value, str):
        return None
    try:
        return IPv6Network(value, strict=True)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Ranges:
    """The lab's ranges from its LabConfig: IPv4 always, IPv6 when the lab is dual-stack."""

    node_cidr: IPv4Network
    service_cidr: IPv4Network
    node_cidr6: IPv6Network | None = None
    service_cidr6: IPv6Network | None = None

    @property
    def service_cidrs(self) -> ServiceCIDRs:
        return ServiceCIDRs((self.service_cidr,) if self.service_cidr6 is None
                            else (self.service_cidr, self.service_cidr6))


def build_topology(documents: Sequence[Document]) -> LabTopology:
    """Validate `documents` and allocate what a cluster would; raise LabManifestError listing every problem."""
    problems = _Problems()
    by_kind: dict[str, list[Document]] = {}
    for doc in documents:
        kind = doc.body.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.add(doc, "kind", "missing")
            continue
        if kind not in BUILT_KINDS + CARRIED_KINDS:
            problems.add(doc, "kind", f"unknown kind {kind!r}; the lab knows {', '.join(BUILT_KINDS + CARRIED_KINDS)}")
            continue
        if not isinstance(doc.body.get("apiVersion"), str):
            problems.add(doc, "apiVersion", "missing")
        name = _meta(doc.body).get("name")
        if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name):
            problems.add(doc, "metadata.name", f"must be a lower-case DNS name, got {name!r}")
            continue
        by_kind.setdefault(kind, []).append(doc)

    ranges = _lab_config(by_kind.get("LabConfig", []), by_kind.get("Node", []), problems)
    node_cidr, service_cidr = ranges.node_cidr, ranges.service_cidr
    namespaces = _namespaces(by_kind.get("Namespace", []), problems)
    nodes = _nodes(by_kind.get("Node", []), ranges, problems)
    pods = _pods(by_kind.get("Pod", []), {n.name: n for n in nodes}, namespaces, problems)
    services = _services(by_kind.get("Service", []), namespaces, ranges.service_cidrs, problems)
    if problems.items:
        raise LabManifestError(problems.items)
    if not nodes:
        raise LabManifestError([ManifestProblem("manifests", "-", "kind", "at least one Node is needed")])

    node_by_name = {n.name: n for n in nodes}
    resolved: list[Mapping[str, Any]] = []
    for ns in sorted(namespaces):
        resolved.append(namespaces[ns])
    for node in nodes:
        resolved.append(_resolved_node(node, by_kind["Node"]))
    for pod, doc in pods:
        resolved.append(_resolved_pod(pod, doc, node_by_name[pod.node]))
    resolved.extend(services)
    user_slices = [dict(d.body) for d in by_kind.get("EndpointSlice", [])]
    resolved.extend(user_slices)
    resolved.extend(derive_endpoint_slices(services, [p for p, _ in pods], user_slices))
    for kind in CARRIED_KINDS:
        resolved.extend(dict(d.body) for d in by_kind.get(kind, []))
    if ranges.node_cidr6 is not None:
        # the ranges the lab was built with, so that reading its resolved manifests again (`lab.load`) gives the
        # same lab; the agents and the API server skip the kind
        resolved.append({"apiVersion": LAB_CONFIG_API, "kind": "LabConfig", "metadata": {"name": "lab"},
                         "spec": {"nodeCIDR": f"{node_cidr},{ranges.node_cidr6}",
                                  "serviceCIDR": str(ranges.service_cidrs)}})
    _check_as_the_agent_reads(resolved, documents, problems)
    if problems.items:
        raise LabManifestError(problems.items)
    return LabTopology(
        nodes=tuple(nodes),
        pods=tuple(p for p, _ in pods),
        node_cidr=node_cidr,
        service_cidr=service_cidr,
        documents=tuple(resolved),
        node_cidr6=ranges.node_cidr6,
        service_cidr6=ranges.service_cidr6,
    )


def _lab_config(docs: list[Document], nodes: list[Document], problems: _Problems) -> _Ranges:
    """The lab's node and service CIDRs. Each may name an IPv6 CIDR after the IPv4 one (`10.96.0.0/12,
    fd00:10:96::/112`, as kube-apiserver's --service-cluster-ip-range): the lab is then dual-stack, as it is
    when a Node gives an IPv6 podCIDR or InternalIP; IPv6 ranges not given are the defaults."""
    node_cidr, service_cidr = DEFAULT_NODE_CIDR, DEFAULT_SERVICE_CIDR
    node_cidr6: IPv6Network | None = None
    service_cidr6: IPv6Network | None = None
    if len(docs) > 1:
        problems.add(docs[1], "kind", "only one LabConfig may be given")
    for doc in docs[:1]:
        if doc.body.get("apiVersion") != LAB_CONFIG_API:
            problems.add(doc, "apiVersion", f"must be {LAB_CONFIG_API}")
        spec = doc.body.get("spec") or {}
        for key in ("nodeCIDR", "serviceCIDR"):
            if key not in spec:
                continue
            parts = [p.strip() for p in spec[key].split(",")] if isinstance(spec[key], str) else [spec[key]]
            net = _ipv4_net(parts[0])
            net6 = _ipv6_net(parts[1]) if len(parts) == 2 else None
            if net is None:
                problems.add(doc, f"spec.{key}", f"not an IPv4 CIDR: {spec[key]!r} (IPv4 is the lab's primary "
                                                 "family: an IPv6 CIDR goes second, after a comma)")
            elif len(parts) > 2 or (len(parts) == 2 and net6 is None):
                problems.add(doc, f"spec.{key}", f"not an IPv4 CIDR and an IPv6 CIDR: {spec[key]!r}")
            elif key == "nodeCIDR":
                node_cidr, node_cidr6 = net, net6
            else:
                service_cidr, service_cidr6 = net, net6
    if node_cidr6 is not None and node_cidr6.num_addresses < node_cidr.num_addresses:
        problems.add(docs[0], "spec.nodeCIDR", f"the IPv6 node CIDR {node_cidr6} must hold at least as many "
                                               f"addresses as {node_cidr} (node addresses mirror the IPv4 ones)")
        node_cidr6 = None
    if node_cidr6 is not None or service_cidr6 is not None or any(_gives_ipv6(d) for d in nodes):
        node_cidr6 = node_cidr6 or DEFAULT_NODE_CIDR6
        service_cidr6 = service_cidr6 or DEFAULT_SERVICE_CIDR6
    return _Ranges(node_cidr, service_cidr, node_cidr6, service_cidr6)


def _gives_ipv6(doc: Document) -> bool:
    """Whether a Node's manifest gives an IPv6 InternalIP or pod CIDR (which makes the lab dual-stack)."""
    addresses = (doc.body.get("status") or {}).get("addresses") or []
    cidrs = (doc.body.get("spec") or {}).get("podCIDRs") or []
    values = [a.get("address") for a in addresses if isinstance(a, Mapping) and a.get("type") == "InternalIP"]
    return any(isinstance(v, str) and ":" in v for v in [*values, *(cidrs if isinstance(cidrs, list) else [])])


def _namespaces(docs: list[Document], problems: _Problems) -> dict[str, Mapping[str, Any]]:
    # The API server always has these two; a lab that names neither still gets them.
    namespaces: dict[str, Mapping[str, Any]] = {
        ns: {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in ("default", "kube-system")
    }
    explicit: set[str] = set()
    for doc in docs:
        name = _meta(doc.body)["name"]
        if not _DNS_LABEL.match(name):
            problems.add(doc, "metadata.name", "a namespace name must be a DNS label (no dots)")
        elif name in explicit:
            problems.add(doc, "metadata.name", "duplicate Namespace")
        _labels(doc, problems)
        explicit.add(name)
        namespaces[name] = dict(doc.body)
    return namespaces


def _labels(doc: Document, problems: _Problems) -> dict[str, str]:
    labels = _meta(doc.body).get("labels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        problems.add(doc, "metadata.labels", "must map strings to strings")
        return {}
    return {str(k): v for k, v in labels.items()}


def _nodes(docs: list[Document], ranges: _Ranges, problems: _Problems) -> list[LabNode]:
    node_cidr, service_cidr = ranges.node_cidr, ranges.service_cidr
    names: set[str] = set()
    wanted: list[tuple[Document, IPv4Address | None, IPv4Network | None, IPv6Address | None,
                       IPv6Network | None]] = []
    for doc in docs:
        name = _meta(doc.body)["name"]
        if name in names:
            problems.add(doc, "metadata.name", "duplicate Node")
        names.add(name)
        address, address6 = None, None
        for index, entry in enumerate((doc.body.get("status") or {}).get("addresses") or []):
            if isinstance(entry, Mapping) and entry.get("type") == "InternalIP":
                raw = entry.get("address")
                if isinstance(raw, str) and ":" in raw:
                    address6 = _node_address6(doc, index, raw, ranges, problems)
                    continue
                address = _ipv4(raw)
                if address is None:
                    problems.add(doc, f"status.addresses[{index}].address",
                                 f"not an IPv4 address: {entry.get('address')!r}")
                elif address not in node_cidr or address in (node_cidr.network_address,
                                                             node_cidr.broadcast_address):
                    problems.add(doc, f"status.addresses[{index}].address",
                                 f"{address} is not a host address of the lab's node CIDR {node_cidr}")
                    address = None
                elif address == api_server_address(node_cidr):
                    problems.add(doc, f"status.addresses[{index}].address",
                                 f"{address} is the lab API server's address (the node CIDR's last host)")
                    address = None
        spec = doc.body.get("spec") or {}
        pod_cidr = None
        if "podCIDR" in spec:
            pod_cidr = _ipv4_net(spec["podCIDR"])
            if pod_cidr is None:
                problems.add(doc, "spec.podCIDR", f"not an IPv4 CIDR: {spec['podCIDR']!r}")
            elif pod_cidr.prefixlen > 30:
                problems.add(doc, "spec.podCIDR", f"{pod_cidr} is too small for a gateway and a pod")
                pod_cidr = None
            elif pod_cidr.overlaps(node_cidr) or pod_cidr.overlaps(service_cidr):
                problems.add(doc, "spec.podCIDR", f"{pod_cidr} overlaps the node CIDR {node_cidr} "
                                                  f"or the service CIDR {service_cidr}")
                pod_cidr = None
        pod_cidr6 = _pod_cidr6(doc, pod_cidr, ranges, problems)
        wanted.append((doc, address, pod_cidr, address6, pod_cidr6))

    used_addresses = {a for _, a, _, _, _ in wanted if a is not None}
    used_cidrs = [c for _, _, c, _, _ in wanted if c is not None]
    used_addresses6 = {a for *_, a, _ in wanted if a is not None}
    used_cidrs6 = [c for *_, c in wanted if c is not None]
    for i, (doc_i, addr_i, cidr_i, addr6_i, cidr6_i) in enumerate(wanted):
        for doc_j, addr_j, cidr_j, addr6_j, cidr6_j in wanted[i + 1:]:
            if addr_i is not None and addr_i == addr_j:
                problems.add(doc_j, "status.addresses", f"InternalIP {addr_j} is already used by "
                                                        f"{_describe(doc_i.body)}")
            if cidr_i is not None and cidr_j is not None and cidr_i.overlaps(cidr_j):
                problems.add(doc_j, "spec.podCIDR", f"{cidr_j} overlaps {cidr_i} of {_describe(doc_i.body)}")
            if addr6_i is not None and addr6_i == addr6_j:
                problems.add(doc_j, "status.addresses", f"InternalIP {addr6_j} is already used by "
                                                        f"{_describe(doc_i.body)}")
            if cidr6_i is not None and cidr6_j is not None and cidr6_i.overlaps(cidr6_j):
                problems.add(doc_j, "spec.podCIDRs[1]", f"{cidr6_j} overlaps {cidr6_i} of {_describe(doc_i.body)}")
    free_addresses = (a for a in node_cidr.hosts() if a not in used_addresses
                      and a not in (node_cidr[1], api_server_address(node_cidr)))
    free_cidrs = (c for c in DEFAULT_POD_SUPERNET.subnets(new_prefix=24)
                  if c.network_address.packed[2] != 0 and not any(c.overlaps(u) for u in used_cidrs))
    nodes = []
    for doc, address, pod_cidr, address6, pod_cidr6 in wanted:
        address = address if address is not None else next(free_addresses)
        pod_cidr = pod_cidr if pod_cidr is not None else next(free_cidrs)
        if ranges.node_cidr6 is not None:
            if address6 is None:
                address6 = _free_mirrored(ranges.node_cidr6, node_cidr, address, used_addresses6)
                used_addresses6.add(address6)
            if pod_cidr6 is None:
                pod_cidr6 = _free_pod_cidr6(pod_cidr, used_cidrs6)
                used_cidrs6.append(pod_cidr6)
        nodes.append(LabNode(name=_meta(doc.body)["name"], address=address, pod_cidr=pod_cidr,
                             address6=address6, pod_cidr6=pod_cidr6))
    return nodes


def _node_address6(doc: Document, index: int, raw: str, ranges: _Ranges, problems: _Problems) -> IPv6Address | None:
    """A Node's IPv6 InternalIP: a host of the lab's IPv6 node CIDR that is not the API server's."""
    where = f"status.addresses[{index}].address"
    address6 = _ipv6(raw)
    net6 = ranges.node_cidr6
    assert net6 is not None  # an IPv6 InternalIP makes the lab dual-stack
    if address6 is None:
        problems.add(doc, where, f"not an IPv6 address: {raw!r}")
    elif address6 not in net6 or address6 == net6.network_address:
        problems.add(doc, where, f"{address6} is not a host address of the lab's IPv6 node CIDR {net6}")
    elif address6 in (_mirror(net6, ranges.node_cidr, ranges.node_cidr[1]),
                      _mirror(net6, ranges.node_cidr, api_server_address(ranges.node_cidr))):
        problems.add(doc, where, f"{address6} is the lab API server's or the fabric's IPv6 address")
    else:
        return address6
    return None


def _pod_cidr6(doc: Document, pod_cidr: IPv4Network | None, ranges: _Ranges,
               problems: _Problems) -> IPv6Network | None:
    """The IPv6 entry of a Node's spec.podCIDRs (its first entry is spec.podCIDR, the IPv4 one)."""
    raw = (doc.body.get("spec") or {}).get("podCIDRs")
    if raw is None:
        return None
    if not isinstance(raw, list) or not 1 <= len(raw) <= 2:
        problems.add(doc, "spec.podCIDRs", "must list the IPv4 pod CIDR and, in a dual-stack lab, an IPv6 one")
        return None
    if pod_cidr is not None and raw[0] != str(pod_cidr):
        problems.add(doc, "spec.podCIDRs[0]", f"must be spec.podCIDR ({pod_cidr}), the IPv4 one")
    if len(raw) < 2:
        return None
    net6 = _ipv6_net(raw[1])
    if net6 is None:
        problems.add(doc, "spec.podCIDRs[1]", f"not an IPv6 CIDR: {raw[1]!r}")
        return None
    assert ranges.node_cidr6 is not None and ranges.service_cidr6 is not None  # an IPv6 pod CIDR: dual-stack
    if pod_cidr is not None and net6.num_addresses < pod_cidr.num_addresses:
        problems.add(doc, "spec.podCIDRs[1]", f"{net6} must hold at least as many addresses as {pod_cidr} (pod "
                                              "addresses mirror the IPv4 ones)")
    elif net6.overlaps(ranges.node_cidr6) or net6.overlaps(ranges.service_cidr6):
        problems.add(doc, "spec.podCIDRs[1]", f"{net6} overlaps the IPv6 node CIDR {ranges.node_cidr6} or the "
                                              f"IPv6 service CIDR {ranges.service_cidr6}")
    else:
        return net6
    return None


def _free_mirrored(net6: IPv6Network, net4: IPv4Network, address: IPv4Address, used: set[IPv6Address]) -> IPv6Address:
    """`address`'s mirror in `net6` if no one has it, else the first free host after it."""
    candidate = _mirror(net6, net4, address)
    while candidate in used:
        candidate += 1
    return candidate


def _free_pod_cidr6(pod_cidr: IPv4Network, used: list[IPv6Network]) -> IPv6Network:
    """A /64 of the default IPv6 pod range: the one numbered as the IPv4 pod CIDR's third byte if free."""
    subnets = list(DEFAULT_POD_SUPERNET6.subnets(new_prefix=64))
    preferred = subnets[pod_cidr.network_address.packed[2]]
    for candidate in (preferred, *subnets[1:]):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise LabManifestError([ManifestProblem("manifests", "-", "spec.podCIDRs",
                                            f"the default IPv6 pod range {DEFAULT_POD_SUPERNET6} is full")])


def _containers(doc: Document, problems: _Problems) -> tuple[Container, ...]:
    spec = doc.body.get("spec") or {}
    raw = spec.get("containers")
    if not isinstance(raw, list) or not raw:
        problems.add(doc, "spec.containers", "at least one container with a command is needed")
        return ()
    containers = []
    for ci, c in enumerate(raw):
        where = f"spec.containers[{ci}]"
        if not isinstance(c, Mapping):
            problems.add(doc, where, "must be a mapping")
            continue
        command = list(c.get("command") or []) + list(c.get("args") or [])
        if not command or not all(isinstance(a, str) for a in command):
            problems.add(doc, f"{where}.command", "the lab runs no images: give the command to run as a list "
                                                  "of strings")
        env = []
        for ei, e in enumerate(c.get("env") or []):
            if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) \
                    or not isinstance(e.get("value", ""), str):
                problems.add(doc, f"{where}.env[{ei}]", "needs a name and a string value")
            else:
                env.append((e["name"], e.get("value", "")))
        ports = []
        for pi, p in enumerate(c.get("ports") or []):
            port = p.get("containerPort") if isinstance(p, Mapping) else None
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                problems.add(doc, f"{where}.ports[{pi}].containerPort", f"must be 1-65535, got {port!r}")
                continue
            protocol = p.get("protocol", "TCP")
            if protocol not in PROTOCOLS:
                problems.add(doc, f"{where}.ports[{pi}].protocol", f"must be one of {PROTOCOLS}, got {protocol!r}")
                continue
            ports.append(ContainerPort(port=port, protocol=protocol, name=p.get("name")))
        containers.append(Container(name=str(c.get("name") or f"c{ci}"), argv=tuple(map(str, command)),
                                    env=tuple(env), ports=tuple(ports)))
    return tuple(containers)


def _pods(
    docs: list[Document], nodes: Mapping[str, LabNode], namespaces: Mapping[str, Any], problems: _Problems
) -> list[tuple[LabPod, Document]]:
    seen: set[tuple[str, str]] = set()
    claimed: dict[IPv4Address, Document] = {}
    claimed6: dict[IPv6Address, Document] = {}
    wanted = []
    for doc in docs:
        meta = _meta(doc.body)
        namespace = meta.get("namespace") or "default"
        key = (namespace, meta["name"])
        if key in seen:
            problems.add(doc, "metadata.name", "duplicate Pod")
        seen.add(key)
        if namespace not in namespaces:
            problems.add(doc, "metadata.namespace", f"namespace {namespace!r} is not defined by any Namespace")
        spec = doc.body.get("spec") or {}
        if spec.get("hostNetwork"):
            problems.add(doc, "spec.hostNetwork", "host-network pods are not supported by the lab")
        node_name = spec.get("nodeName")
        node = nodes.get(node_name) if isinstance(node_name, str) else None
        if node is None:
            problems.add(doc, "spec.nodeName", f"unknown node {node_name!r}; the lab has {sorted(nodes)}")
        ip = None
        raw_ip = (doc.body.get("status") or {}).get("podIP")
        if raw_ip is not None:
            ip = _ipv4(raw_ip)
            if ip is None:
                problems.add(doc, "status.podIP", f"not an IPv4 address: {raw_ip!r}")
            elif node is not None and (ip not in node.pod_cidr or ip in (
                    node.gateway, node.pod_cidr.network_address, node.pod_cidr.broadcast_address)):
                problems.add(doc, "status.podIP", f"{ip} is not a free pod address of node {node.name}'s "
                                                  f"podCIDR {node.pod_cidr} (.1 is the node's gateway)")
                ip = None
            elif ip in claimed:
                problems.add(doc, "status.podIP", f"duplicate pod IP {ip}, also used by "
                                                  f"{_describe(claimed[ip].body)}")
                ip = None
            else:
                claimed[ip] = doc
        ip6 = _pod_ip6(doc, node, claimed6, problems)
        uid = meta.get("uid") or str(uuid.uuid5(LAB_UIDS, f"{namespace}/{meta['name']}"))
        if not isinstance(uid, str) or not _UID.match(uid):
            problems.add(doc, "metadata.uid", f"not a UID: {uid!r}")
        try:
            qos = qos_class(spec)
        except QuantityError as exc:
            problems.add(doc, "spec.containers[].resources", str(exc))
            qos = "BestEffort"
        wanted.append((doc, namespace, node, ip, ip6, _labels(doc, problems), _containers(doc, problems), str(uid),
                       qos))

    pods = []
    for doc, namespace, node, ip, ip6, labels, containers, uid, qos in wanted:
        if node is None:
            continue
        if ip is None:
            ip = next((a for a in node.pod_cidr.hosts() if a != node.gateway and a not in claimed), None)
            if ip is None:
                problems.add(doc, "spec.nodeName", f"node {node.name}'s podCIDR {node.pod_cidr} is full")
                continue
            claimed[ip] = doc
        if ip6 is None and node.pod_cidr6 is not None:
            # the IPv4 address's mirror (fd00:10:244:1::3 for 10.244.1.3), or the next free one after it
            ip6 = node.pod_cidr6.network_address + (int(ip) - int(node.pod_cidr.network_address))
            while ip6 in claimed6 or ip6 == node.gateway6:
                ip6 += 1
            claimed6[ip6] = doc
        pods.append((LabPod(namespace=namespace, name=_meta(doc.body)["name"], node=node.name, ip=ip,
                            labels=labels, containers=containers, ip6=ip6, uid=uid, qos_class=qos), doc))
    return pods


def _pod_ip6(doc: Document, node: LabNode | None, claimed6: dict[IPv6Address, Document],
             problems: _Problems) -> IPv6Address | None:
    """The IPv6 entry of a Pod's status.podIPs, if it gives one (the first entry is status.podIP, IPv4)."""
    raw = (doc.body.get("status") or {}).get("podIPs")
    if raw is None:
        return None
    entries = [e.get("ip") if isinstance(e, Mapping) else None for e in raw] if isinstance(raw, list) else [None]
    if not 1 <= len(entries) <= 2 or not all(isinstance(e, str) for e in entries):
        problems.add(doc, "status.podIPs", "must list {ip: IPv4 address} and, in a dual-stack lab, {ip: IPv6 address}")
        return None
    if len(entries) < 2:
        return None
    ip6 = _ipv6(entries[1])
    if ip6 is None:
        problems.add(doc, "status.podIPs[1].ip", f"not an IPv6 address: {entries[1]!r}")
    elif node is None:
        return None
    elif node.pod_cidr6 is None:
        problems.add(doc, "status.podIPs[1].ip", "the lab is not dual-stack (no Node has an IPv6 pod CIDR or "
                                                 "address, and LabConfig gives no IPv6 range)")
    elif ip6 not in node.pod_cidr6 or ip6 in (node.gateway6, node.pod_cidr6.network_address):
        problems.add(doc, "status.podIPs[1].ip", f"{ip6} is not a free pod address of node {node.name}'s IPv6 "
                                                 f"pod CIDR {node.pod_cidr6} (::1 is the node's gateway)")
    elif ip6 in claimed6:
        problems.add(doc, "status.podIPs[1].ip", f"duplicate pod IP {ip6}, also used by "
                                                 f"{_describe(claimed6[ip6].body)}")
    else:
        claimed6[ip6] = doc
        return ip6
    return None


def _services(
    docs: list[Document], namespaces: Mapping[str, Any], cidrs: ServiceCIDRs, problems: _Problems
) -> list[dict[str, Any]]:
    """Check what the lab itself uses of Services and fill in IP families, cluster IPs and node ports as
    kube-apiserver would (`nodeagent.lab.families`).

    Full Service validation (as kube-proxy does it) belongs to the agent's model; the lab only needs
    enough to allocate addresses and derive EndpointSlices.
    """
    used_ips = used_cluster_ips([d.body for d in docs])
    used_ports: set[int] = set()
    for doc in docs:
        spec = doc.body.get("spec") or {}
        for p in spec.get("ports") or []:
            if isinstance(p, Mapping) and isinstance(p.get("nodePort"), int):
                used_ports.add(p["nodePort"])
    free_ports = (p for p in NODE_PORT_RANGE if p not in used_ports)

    out = []
    for doc in docs:
        body: dict[str, Any] = copy.deepcopy(dict(doc.body))
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        if meta["namespace"] not in namespaces:
            problems.add(doc, "metadata.namespace", f"namespace {meta['namespace']!r} is not defined")
        spec = body.setdefault("spec", {})
        svc_type = spec.setdefault("type", "ClusterIP")
        if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            problems.add(doc, "spec.type", f"unknown Service type {svc_type!r}")
        if svc_type != "ExternalName":
            raw_ip = spec.get("clusterIP")
            if raw_ip not in (None, "", "None") and _ipv4(raw_ip) is None and _ipv6(raw_ip) is None:
                problems.add(doc, "spec.clusterIP", f"{raw_ip!r} is not an IP address in the service CIDR {cidrs}")
            else:
                found = init_ip_families(spec, cidrs)
                if not found:
                    found = allocate_cluster_ips(spec, cidrs, used_ips)
                for problem in found:
                    problems.add(doc, problem.field, problem.message)
        ports = spec.get("ports") or []
        for pi, port in enumerate(ports):
            if not isinstance(port, dict):
                problems.add(doc, f"spec.ports[{pi}]", "must be a mapping")
                continue
            number = port.get("port")
            if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
                problems.add(doc, f"spec.ports[{pi}].port", f"must be 1-65535, got {number!r}")
            port.setdefault("protocol", "TCP")
            if port["protocol"] not in PROTOCOLS:
                problems.add(doc, f"spec.ports[{pi}].protocol", f"must be one of {PROTOCOLS}")
            target = port.setdefault("targetPort", number)
            if not (isinstance(target, str) and _DNS_LABEL.match(target)) and not (
                    isinstance(target, int) and 1 <= target <= 65535):
                problems.add(doc, f"spec.ports[{pi}].targetPort", f"must be 1-65535 or a port name, got {target!r}")
            if svc_type in ("NodePort", "LoadBalancer"):
                node_port = port.get("nodePort")
                if node_port is None:
                    port["nodePort"] = next(free_ports)
                elif not isinstance(node_port, int) or node_port not in NODE_PORT_RANGE:
                    problems.add(doc, f"spec.ports[{pi}].nodePort", f"must be in 30000-32767, got {node_port!r}")
        selector = spec.get("selector")
        if selector is not None and not (isinstance(selector, Mapping)
                                         and all(isinstance(v, str) for v in selector.values())):
            problems.add(doc, "spec.selector", "must map label names to strings")
        out.append(body)
    return out


def _resolved_node(node: LabNode, docs: Iterable[Document]) -> Mapping[str, Any]:
    doc = next(d for d in docs if _meta(d.body)["name"] == node.name)
    body: dict[str, Any] = copy.deepcopy(dict(doc.body))
    spec = body.setdefault("spec", {})
    spec["podCIDR"] = str(node.pod_cidr)
    spec["podCIDRs"] = [str(cidr) for cidr in node.pod_cidrs]
    status = body.setdefault("status", {})
    addresses = [a for a in status.get("addresses") or [] if a.get("type") != "InternalIP"]
    status["addresses"] = [*({"type": "InternalIP", "address": str(address)} for address in node.addresses),
                           *(addresses or [{"type": "Hostname", "address": node.name}])]
    # What a kubelet reports (`kubectl get nodes` shows Ready and a version; the agent reads neither).
    status.setdefault("conditions", [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                      "message": "the lab's node namespace is up"}])
    status.setdefault("nodeInfo", {"kubeletVersion": "v1.32.0-lab", "containerRuntimeVersion": "nodeagent-lab",
                                   "osImage": "nodeagent lab", "kernelVersion": "", "operatingSystem": "linux",
                                   "architecture": "amd64"})
    return body


def _resolved_pod(pod: LabPod, doc: Document, node: LabNode) -> Mapping[str, Any]:
    body: dict[str, Any] = copy.deepcopy(dict(doc.body))
    body["metadata"].setdefault("namespace", pod.namespace)
    body["metadata"]["uid"] = pod.uid
    body["status"] = {**(body.get("status") or {}), "phase": "Running", "qosClass": pod.qos_class, "podIP": str(pod.ip),
                      "podIPs": [{"ip": str(ip)} for ip in pod.ips], "hostIP": str(node.address),
                      "hostIPs": [{"ip": str(ip)} for ip in node.addresses]}
    return body


def _check_as_the_agent_reads(resolved: Sequence[Mapping[str, Any]], documents: Sequence[Document],
                              problems: _Problems) -> None:
    """Decode every resolved object exactly as the agent will, so a lab never starts with input the agent drops.

    The lab's own checks cover what allocation needs; this covers everything else the datapath reads
    (source ranges, affinity, traffic policies, mesh policies...), with the agent's own validator.
    """
    written_at = {ref: doc.source for doc in documents if (ref := object_ref(doc.body)) is not None}
    for body in resolved:
        ref = object_ref(body)
        if ref is None:  # kinds only carried through (ConfigMap); the agent does not read them
            continue
        for rejection in decode(body).rejections:
            # A part is dropped, or (a policy part the tunnel cannot enforce) kept so that it can only narrow
            # access: either way the agent would not do what the manifest says, which the reason spells out.
            scope = "the agent would reject the object" if rejection.whole_object else \
                "the agent would not apply it as written"
            problems.items.append(ManifestProblem(written_at.get(rejection.ref, "derived by the lab"),
                                                  str(rejection.ref), rejection.field,
                                                  f"{rejection.reason} ({scope})"))
