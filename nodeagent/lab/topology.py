"""What a lab is made of, decided from its manifests: validation and address allocation, no I/O.

The lab needs a few things the API server and the controllers would fill in on a real cluster (pod IPs,
node pod CIDRs, Service cluster IPs and node ports, EndpointSlices); they are allocated here,
deterministically, so the same manifests always give the same lab. Every problem is collected and
reported with file, object and field before anything is created.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.lab.endpoints import derive_endpoint_slices
from nodeagent.lab.errors import LabManifestError, ManifestProblem
from nodeagent.lab.manifests import Document

DEFAULT_NODE_CIDR = IPv4Network("172.18.0.0/24")
DEFAULT_POD_SUPERNET = IPv4Network("10.244.0.0/16")
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/12")
NODE_PORT_RANGE = range(30000, 32768)
LAB_CONFIG_API = "lab.nodeagent.io/v1alpha1"
PROTOCOLS = ("TCP", "UDP", "SCTP")

# Kinds the lab builds from, and kinds it only carries through to the agent's manifest source.
BUILT_KINDS = ("Node", "Namespace", "Pod", "Service", "EndpointSlice", "LabConfig")
CARRIED_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "ConfigMap")

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
    """A node: one network namespace on the fabric bridge and one cgroup."""

    name: str
    address: IPv4Address
    pod_cidr: IPv4Network

    @property
    def gateway(self) -> IPv4Address:
        """The node's address inside its pod CIDR: every pod's default gateway."""
        return self.pod_cidr.network_address + 1


@dataclass(frozen=True)
class LabPod:
    """A pod: one network namespace with a veth to its node, one cgroup under its node's."""

    namespace: str
    name: str
    node: str
    ip: IPv4Address
    labels: Mapping[str, str]
    containers: tuple[Container, ...]

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

    @property
    def api_server_address(self) -> IPv4Address:
        """Where the lab's API server listens (see `api_server_address`)."""
        return api_server_address(self.node_cidr)

    def node(self, name: str) -> LabNode:
        """The node called `name` (KeyError if there is none)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

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

    node_cidr, service_cidr = _lab_config(by_kind.get("LabConfig", []), problems)
    namespaces = _namespaces(by_kind.get("Namespace", []), problems)
    nodes = _nodes(by_kind.get("Node", []), node_cidr, service_cidr, problems)
    pods = _pods(by_kind.get("Pod", []), {n.name: n for n in nodes}, namespaces, problems)
    services = _services(by_kind.get("Service", []), namespaces, service_cidr, problems)
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
    _check_as_the_agent_reads(resolved, documents, problems)
    if problems.items:
        raise LabManifestError(problems.items)
    return LabTopology(
        nodes=tuple(nodes),
        pods=tuple(p for p, _ in pods),
        node_cidr=node_cidr,
        service_cidr=service_cidr,
        documents=tuple(resolved),
    )


def _lab_config(docs: list[Document], problems: _Problems) -> tuple[IPv4Network, IPv4Network]:
    node_cidr, service_cidr = DEFAULT_NODE_CIDR, DEFAULT_SERVICE_CIDR
    if len(docs) > 1:
        problems.add(docs[1], "kind", "only one LabConfig may be given")
    for doc in docs[:1]:
        if doc.body.get("apiVersion") != LAB_CONFIG_API:
            problems.add(doc, "apiVersion", f"must be {LAB_CONFIG_API}")
        spec = doc.body.get("spec") or {}
        for key in ("nodeCIDR", "serviceCIDR"):
            if key in spec:
                net = _ipv4_net(spec[key])
                if net is None:
                    problems.add(doc, f"spec.{key}", f"not an IPv4 CIDR: {spec[key]!r}")
                elif key == "nodeCIDR":
                    node_cidr = net
                else:
                    service_cidr = net
    return node_cidr, service_cidr


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


def _nodes(
    docs: list[Document], node_cidr: IPv4Network, service_cidr: IPv4Network, problems: _Problems
) -> list[LabNode]:
    names: set[str] = set()
    wanted: list[tuple[Document, IPv4Address | None, IPv4Network | None]] = []
    for doc in docs:
        name = _meta(doc.body)["name"]
        if name in names:
            problems.add(doc, "metadata.name", "duplicate Node")
        names.add(name)
        address = None
        for index, entry in enumerate((doc.body.get("status") or {}).get("addresses") or []):
            if isinstance(entry, Mapping) and entry.get("type") == "InternalIP":
                address = _ipv4(entry.get("address"))
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
        wanted.append((doc, address, pod_cidr))

    used_addresses = {a for _, a, _ in wanted if a is not None}
    used_cidrs = [c for _, _, c in wanted if c is not None]
    for i, (doc_i, addr_i, cidr_i) in enumerate(wanted):
        for doc_j, addr_j, cidr_j in wanted[i + 1:]:
            if addr_i is not None and addr_i == addr_j:
                problems.add(doc_j, "status.addresses", f"InternalIP {addr_j} is already used by "
                                                        f"{_describe(doc_i.body)}")
            if cidr_i is not None and cidr_j is not None and cidr_i.overlaps(cidr_j):
                problems.add(doc_j, "spec.podCIDR", f"{cidr_j} overlaps {cidr_i} of {_describe(doc_i.body)}")
    free_addresses = (a for a in node_cidr.hosts() if a not in used_addresses
                      and a not in (node_cidr[1], api_server_address(node_cidr)))
    free_cidrs = (c for c in DEFAULT_POD_SUPERNET.subnets(new_prefix=24)
                  if c.network_address.packed[2] != 0 and not any(c.overlaps(u) for u in used_cidrs))
    nodes = []
    for doc, address, pod_cidr in wanted:
        nodes.append(LabNode(
            name=_meta(doc.body)["name"],
            address=address if address is not None else next(free_addresses),
            pod_cidr=pod_cidr if pod_cidr is not None else next(free_cidrs),
        ))
    return nodes


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
        wanted.append((doc, namespace, node, ip, _labels(doc, problems), _containers(doc, problems)))

    pods = []
    for doc, namespace, node, ip, labels, containers in wanted:
        if node is None:
            continue
        if ip is None:
            ip = next((a for a in node.pod_cidr.hosts() if a != node.gateway and a not in claimed), None)
            if ip is None:
                problems.add(doc, "spec.nodeName", f"node {node.name}'s podCIDR {node.pod_cidr} is full")
                continue
            claimed[ip] = doc
        pods.append((LabPod(namespace=namespace, name=_meta(doc.body)["name"], node=node.name, ip=ip,
                            labels=labels, containers=containers), doc))
    return pods


def _services(
    docs: list[Document], namespaces: Mapping[str, Any], service_cidr: IPv4Network, problems: _Problems
) -> list[dict[str, Any]]:
    """Check what the lab itself uses of Services and fill in cluster IPs and node ports.

    Full Service validation (as kube-proxy does it) belongs to the agent's model; the lab only needs
    enough to allocate addresses and derive EndpointSlices.
    """
    used_ips = {service_cidr.network_address, service_cidr.network_address + 1}  # .1 is `kubernetes`
    used_ports: set[int] = set()
    for doc in docs:
        spec = doc.body.get("spec") or {}
        ip = _ipv4(spec.get("clusterIP"))
        if ip is not None:
            used_ips.add(ip)
        for p in spec.get("ports") or []:
            if isinstance(p, Mapping) and isinstance(p.get("nodePort"), int):
                used_ports.add(p["nodePort"])
    free_ips = (a for a in service_cidr.hosts() if int(a) - int(service_cidr.network_address) >= 10
                and a not in used_ips)
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
            if raw_ip in (None, ""):
                spec["clusterIP"] = str(next(free_ips))
                spec["clusterIPs"] = [spec["clusterIP"]]
            elif raw_ip != "None":
                ip = _ipv4(raw_ip)
                if ip is None or ip not in service_cidr:
                    problems.add(doc, "spec.clusterIP", f"{raw_ip!r} is not an IPv4 address in the service CIDR "
                                                        f"{service_cidr}")
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
    spec["podCIDRs"] = [str(node.pod_cidr)]
    status = body.setdefault("status", {})
    addresses = [a for a in status.get("addresses") or [] if a.get("type") != "InternalIP"]
    status["addresses"] = [{"type": "InternalIP", "address": str(node.address)},
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
    body["status"] = {**(body.get("status") or {}), "phase": "Running", "podIP": str(pod.ip),
                      "podIPs": [{"ip": str(pod.ip)}], "hostIP": str(node.address)}
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
