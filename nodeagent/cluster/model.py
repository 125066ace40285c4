"""The objects the datapath is computed from: validated, immutable, and only what the node needs.

They are built from Kubernetes JSON by `nodeagent.cluster.decode`, which rejects what is invalid field by
field; everything downstream (iptables rendering, eBPF maps, the tunnel, inspect) reads only these.
Addresses are `ipaddress` objects, never strings, so an invalid address cannot get this far.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from nodeagent.errors import NodeAgentError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

MESH_GROUP = "security.nodeagent.io"


class Protocol(StrEnum):
    """L4 protocols a Service port can carry."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ServiceType(StrEnum):
    """spec.type of a Service."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(StrEnum):
    """external/internalTrafficPolicy: send to any ready endpoint, or only to this node's."""

    CLUSTER = "Cluster"
    LOCAL = "Local"


class SessionAffinity(StrEnum):
    """spec.sessionAffinity."""

    NONE = "None"
    CLIENT_IP = "ClientIP"


class LoadBalancerIPMode(StrEnum):
    """status.loadBalancer.ingress[].ipMode. VIP (also what an unset mode means): traffic arrives addressed to
    the ingress IP, so the proxy programs it. Proxy: the load balancer delivers the traffic to the node or
    the pod itself, and kube-proxy programs nothing for the IP (`proxyutil.IsVIPMode`)."""

    VIP = "VIP"
    PROXY = "Proxy"


class IPFamilyPolicy(StrEnum):
    """spec.ipFamilyPolicy. Unset is SingleStack (the API server's default). kube-proxy does not read it: each
    family's proxier serves the Service when `spec.ipFamilies` names that family and `spec.clusterIPs` has its
    address (`proxyutil.GetClusterIPByFamily`); nodeagent reads it only to report what a node cannot serve."""

    SINGLE_STACK = "SingleStack"
    PREFER_DUAL_STACK = "PreferDualStack"
    REQUIRE_DUAL_STACK = "RequireDualStack"


def family_name(family: int) -> str:
    """`IPv4` or `IPv6`: kube-proxy's v1.IPFamily strings (`spec.ipFamilies`, its `ip_family` labels)."""
    return f"IPv{family}"


class AddressType(StrEnum):
    """EndpointSlice addressType (FQDN slices are not used by any proxy)."""

    IPV4 = "IPv4"
    IPV6 = "IPv6"
    FQDN = "FQDN"


class Kind(StrEnum):
    """The kinds nodeagent watches."""

    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    POD = "Pod"
    NODE = "Node"
    NAMESPACE = "Namespace"
    AUTHORIZATION_POLICY = "AuthorizationPolicy"
    PEER_AUTHENTICATION = "PeerAuthentication"


@dataclass(frozen=True, order=True, slots=True)
class ObjectRef:
    """Kind, namespace (empty for cluster-scoped objects) and name: how every object is named in logs."""

    kind: Kind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @property
    def key(self) -> str:
        """`namespace/name` (or `name`), the form kubectl and kube-proxy logs use."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class PodKeyError(NodeAgentError, ValueError):
    """A text that is not a pod's `namespace/name`."""


@dataclass(frozen=True, order=True, slots=True)
class PodKey:
    """A pod's namespace and name: how the mesh names a pod (its uid on the control stream, its key in the
    reconciler's maps). `str()` is the `namespace/name` form every wire format and log line carries."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> PodKey:
        """The key written as `namespace/name`; PodKeyError when either half is missing."""
        namespace, slash, name = text.partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise PodKeyError(f"pod key {text!r}: not namespace/name")
        return cls(namespace, name)

    @classmethod
    def of(cls, ref: ObjectRef) -> PodKey:
        """The key of a Pod's reference."""
        return cls(ref.namespace, ref.name)

    @property
    def ref(self) -> ObjectRef:
        """The Pod's object reference (for snapshot lookups)."""
        return ObjectRef(Kind.POD, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service; `target_port` is a number or a container port name."""

    name: str
    protocol: Protocol
    port: int
    target_port: int | str
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    """One `status.loadBalancer.ingress[]` entry with an IP (hostname-only entries are not proxied)."""

    ip: IPAddress
    ip_mode: LoadBalancerIPMode | None = None  # None: not written

    @property
    def is_vip(self) -> bool:
        """kube-proxy's `IsVIPMode`: an unset mode is VIP; only VIP-mode IPs get rules."""
        return self.ip_mode is None or self.ip_mode is LoadBalancerIPMode.VIP


@dataclass(frozen=True, slots=True)
class Service:
    """What the datapath needs of a Service."""

    ref: ObjectRef
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] | None = None
    headless: bool = False
    external_name: str = ""
    external_ips: tuple[IPAddress, ...] = ()
    # every ingress IP with its ipMode; the datapaths program only the VIP-mode ones
    # (state.translation.ServicePortInfo.load_balancer_ips, as kube-proxy's LoadBalancerVIPs)
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    session_affinity: SessionAffinity = SessionAffinity.NONE
    affinity_timeout_seconds: int = 10800
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    # pod name -> relative weight, from the nodeagent.io/endpoint-weights annotation (eBPF datapath; the
    # tunnel's canary splits); endpoints not named weigh 1, weight 0 takes an endpoint out
    endpoint_weights: tuple[tuple[str, int], ...] = ()
    # spec.trafficDistribution as written (PreferClose, PreferSameZone, PreferSameNode; "" when unset):
    # the tunnel's locality preference (nodeagent.tunnel.state.service_config)
    traffic_distribution: str = ""
    # the family of each entry of `cluster_ips`, in the same order (spec.ipFamilies as the decoder checked it
    # against spec.clusterIPs): the first is the Service's primary family
    ip_families: tuple[int, ...] = ()
    ip_family_policy: IPFamilyPolicy | None = None  # None: not written (SingleStack)

    @property
    def families(self) -> tuple[int, ...]:
        """The families the Service has a cluster IP of, primary first (4, 6)."""
        return self.ip_families or tuple(ip.version for ip in self.cluster_ips)

    def cluster_ip(self, family: int) -> IPAddress | None:
        """The cluster IP of `family`, or None: kube-proxy's `GetClusterIPByFamily`, which the proxier of each
        family asks first and, on None, skips the Service (pkg/proxy/servicechangetracker.go)."""
        return next((ip for ip in self.cluster_ips if ip.version == family), None)

    @property
    def skip_reason(self) -> str | None:
        """Why the proxy datapath ignores this Service, or None if it is programmed."""
        if self.type is ServiceType.EXTERNAL_NAME:
            return f"ExternalName Service (DNS alias for {self.external_name!r}), nothing to proxy"
        if self.headless:
            return "headless Service (clusterIP None): clients connect to pod IPs directly"
        if not self.ports:
            return "no valid ports"
        return None


@dataclass(frozen=True, slots=True)
class EndpointConditions:
    """EndpointSlice endpoint conditions; unset `ready` means ready, as the API documents."""

    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a slice: its addresses and where it runs."""

    addresses: tuple[IPAddress, ...]
    conditions: EndpointConditions = EndpointConditions()
    node_name: str | None = None
    zone: str | None = None
    hint_zones: tuple[str, ...] = ()
    target: ObjectRef | None = None
    # hints.forNodes (the EndpointSlice controller writes them for trafficDistribution: PreferSameNode)
    hint_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """A port of an EndpointSlice, matched to the Service port of the same name."""

    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """The endpoints of (part of) a Service."""

    ref: ObjectRef
    service_name: str
    address_type: AddressType
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]
    resource_version: str = ""

    @property
    def service(self) -> ObjectRef:
        """The Service this slice belongs to (label kubernetes.io/service-name)."""
        return ObjectRef(Kind.SERVICE, self.ref.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A named or unnamed port a pod's container declares."""

    port: int
    protocol: Protocol = Protocol.TCP
    name: str = ""


@dataclass(frozen=True, slots=True)
class Pod:
    """What the mesh and the proxy need of a pod."""

    ref: ObjectRef
    ips: tuple[IPAddress, ...]
    node_name: str
    phase: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    container_ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False
    resource_version: str = ""
    uid: str = ""  # metadata.uid: names the pod's cgroup (kubelet's pod<uid>)
    qos_class: str = ""  # status.qosClass: Guaranteed, Burstable or BestEffort ("" until the API server sets it)


QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")  # a pod's status.qosClass (its cgroup's parent)


@dataclass(frozen=True, slots=True)
class Node:
    """A node: its addresses (for NodePort) and pod CIDRs (for routing and masquerade decisions)."""

    ref: ObjectRef
    addresses: Mapping[str, tuple[IPAddress, ...]]
    pod_cidrs: tuple[IPNetwork, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    # kube-proxy's /healthz reports the node ineligible while it is being deleted or drained by the autoscaler
    being_deleted: bool = False
    taint_keys: frozenset[str] = frozenset()

    @property
    def internal_ips(self) -> tuple[IPAddress, ...]:
        """The node's InternalIP addresses."""
        return self.addresses.get("InternalIP", ())

    @property
    def families(self) -> frozenset[int]:
        """The IP families the Node object says the node has: those of its addresses and its pod CIDRs."""
        return frozenset({ip.version for ips in self.addresses.values() for ip in ips}
                         | {cidr.version for cidr in self.pod_cidrs})


@dataclass(frozen=True, slots=True)
class Namespace:
    """A namespace: its labels enroll its pods in the mesh."""

    ref: ObjectRef
    labels: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""


class PolicyAction(StrEnum):
    """`spec.action` of an AuthorizationPolicy.

    The tunnel enforces ALLOW and DENY. AUDIT and CUSTOM are kept (the object is valid for Istio) but the
    tunnel ignores them, as ztunnel does: istiod does not send them to ztunnel ("ztunnel does not support
    the ... action", pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go). AUDIT only logs
    in Istio; CUSTOM delegates to an external authorizer that only a waypoint can call.
    """

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True)
class Unenforceable:
    """A part of a policy rule the tunnel cannot enforce at L4: an L7 attribute, an unknown field, an
    invalid value. `field` is its path in the spec (`rules[0].to[0].operation.methods`), `reason` says why.

    An ALLOW rule holding one matches nothing; a DENY rule holding one denies on its other parts alone
    (see `nodeagent.tunnel.state.authz`), so such a part never widens access.
    """

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field} {self.reason}"


@dataclass(frozen=True, slots=True)
class PolicySource:
    """`from[].source` at L4: every non-empty list must match (AND), any entry of a list matches (OR).

    Principals are SPIFFE ids without the scheme, as Istio writes them (`cluster.local/ns/a/sa/b`),
    with `*` allowed as prefix or suffix. Service accounts are (namespace, name), exact. IP blocks are
    networks (a bare address is a /32 or /128); `remote_ip_blocks` are compared with the connection's
    peer address like `ip_blocks` (no proxy in front of the tunnel rewrites it). `unenforceable`: the
    parts of this source the tunnel cannot enforce (they are not in the fields above).
    """

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    remote_ip_blocks: tuple[IPNetwork, ...] = ()
    not_remote_ip_blocks: tuple[IPNetwork, ...] = ()
    unenforceable: tuple[Unenforceable, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyOperation:
    """`to[].operation` at L4: destination ports (and destination addresses, which only a `when` on
    `destination.ip` sets). `unenforceable`: the parts the tunnel cannot enforce (methods, paths...)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    unenforceable: tuple[Unenforceable, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyCondition:
    """One `when[]` entry: `key` as written, its `values`/`notValues` held as the source or operation
    field the key names (`source.ip` -> `source.ip_blocks`, `destination.port` -> `operation.ports`...),
    as istiod converts conditions for ztunnel. It matches when both parts match."""

    key: str
    source: PolicySource = PolicySource()
    operation: PolicyOperation = PolicyOperation()
    unenforceable: tuple[Unenforceable, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """A rule matches when any source matches (or there are none), any operation matches (or none) and
    every condition matches. `unenforceable`: problems of the rule itself (an unknown key, a malformed
    entry); `all_unenforceable` adds those of its sources, operations and conditions."""

    sources: tuple[PolicySource, ...] = ()
    operations: tuple[PolicyOperation, ...] = ()
    conditions: tuple[PolicyCondition, ...] = ()
    unenforceable: tuple[Unenforceable, ...] = ()

    @property
    def all_unenforceable(self) -> tuple[Unenforceable, ...]:
        """Every part of the rule the tunnel cannot enforce, in the order written."""
        return (*self.unenforceable, *(u for s in self.sources for u in s.unenforceable),
                *(u for o in self.operations for u in o.unenforceable),
                *(u for c in self.conditions for u in c.unenforceable))


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """L4 authorization for the workloads its selector picks in its namespace (all of them if None)."""

    ref: ObjectRef
    action: PolicyAction
    selector: Mapping[str, str] | None
    rules: tuple[PolicyRule, ...]
    resource_version: str = ""


class PeerAuthenticationMode(StrEnum):
    """STRICT: only mTLS (HBONE) inbound; PERMISSIVE: plaintext inbound accepted too; DISABLE: accepted
    as PERMISSIVE (ambient has no "no mTLS" for enrolled pods; istiod converts it as not STRICT);
    UNSET (or no mode written): inherit the level above (namespace, then mesh, then PERMISSIVE)."""

    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"
    UNSET = "UNSET"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """The mTLS mode for the workloads its selector picks in its namespace (all of them if None).

    `port_level_mtls` maps a workload port to its mode; Istio honours it only on a policy with a
    selector (the decoder drops it otherwise).
    """

    ref: ObjectRef
    mode: PeerAuthenticationMode
    selector: Mapping[str, str] | None = None
    resource_version: str = ""
    port_level_mtls: Mapping[int, PeerAuthenticationMode] = field(default_factory=dict)


Object = Service | EndpointSlice | Pod | Node | Namespace | AuthorizationPolicy | PeerAuthentication


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why (part of) an object was not accepted: the object, the field path, and the reason."""

    ref: ObjectRef
    field: str
    reason: str
    whole_object: bool = False

    def __str__(self) -> str:
        scope = "rejected" if self.whole_object else "ignored"
        return f"{self.ref}: {self.field}: {self.reason} ({scope})"


@dataclass(frozen=True, slots=True)
class Canonicalized:
    """A value the API server refuses today but kube-proxy accepts, read as kube-proxy reads it: an IPv4
    address with leading zeros (`172.30.0.041`, decimal: 172.30.0.41), a CIDR with host bits or surrounding
    space. Objects written before the API server's validation tightened still hold such values; the
    datapath programs `canonical`, and each one is logged as a warning (see `nodeagent.cluster.decode`)."""

    ref: ObjectRef
    field: str
    written: str
    canonical: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.field}: {self.written!r} read as {self.canonical}"
