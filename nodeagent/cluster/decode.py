"""Kubernetes JSON to model objects, validated the way a proxy must: field by field, never all or nothing.

`decode(raw)` never raises. It returns the object (or None when the object as a whole is unusable)
and every rejection with the object and the field path. What makes an object unusable: no name, an
unknown kind, a Service without a parseable primary cluster IP, an EndpointSlice without its
Service label. Anything smaller (one port, one endpoint, one external IP) is dropped alone and
reported, and the rest of the object is kept: one bad port must not take its Service down.
AuthorizationPolicy parts the tunnel cannot enforce are the exception: they are kept on their rule (as
`Unenforceable`) and reported, so that the policy fails closed (see "mesh policies" below).

IP addresses are parsed strictly (no leading zeros, no zone, no surrounding space), except in the fields
kube-proxy reads with `netutils.ParseIPSloppy`/`ParseCIDRSloppy`: a Service's clusterIP(s), externalIPs,
load balancer ingress IPs and loadBalancerSourceRanges, and EndpointSlice addresses. There a legacy value
the API server refuses today but still serves from objects written before its validation tightened is
accepted as kube-proxy accepts it (`172.30.0.041` is 172.30.0.41: decimal, not octal; `203.0.113.5/025`
is 203.0.113.0/25), and the canonical form is what the datapath programs. Each such value is returned as
a `Canonicalized` and logged as a warning naming object, field and the value as written. Anything
ParseIPSloppy refuses (`172.17.0.300`) stays rejected with the field named.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from nodeagent.cluster.model import (
    MESH_GROUP,
    QOS_CLASSES,
    AddressType,
    AuthorizationPolicy,
    Canonicalized,
    ContainerPort,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    IPFamilyPolicy,
    IPNetwork,
    Kind,
    LoadBalancerIngress,
    LoadBalancerIPMode,
    Namespace,
    Node,
    Object,
    ObjectRef,
    PeerAuthentication,
    PeerAuthenticationMode,
    Pod,
    PolicyAction,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    Protocol,
    Rejection,
    Service,
    ServicePort,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
    Unenforceable,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_AFFINITY_TIMEOUT = 86400
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME
_NAMESPACED = {Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.POD, Kind.AUTHORIZATION_POLICY, Kind.PEER_AUTHENTICATION}
_API_GROUPS = {
    Kind.SERVICE: ("",), Kind.POD: ("",), Kind.NODE: ("",), Kind.NAMESPACE: ("",),
    Kind.ENDPOINT_SLICE: ("discovery.k8s.io",),
    Kind.AUTHORIZATION_POLICY: (MESH_GROUP, "security.istio.io"),
    Kind.PEER_AUTHENTICATION: (MESH_GROUP, "security.istio.io"),
}

T = TypeVar("T")

log = structlog.get_logger("nodeagent.cluster.decode")


@dataclass(frozen=True)
class Decoded:
    """The result of decoding one object: the object (None if unusable), why anything was dropped, and
    the legacy values that were accepted in their canonical form (see the module doc)."""

    obj: Object | None
    rejections: tuple[Rejection, ...] = ()
    canonicalized: tuple[Canonicalized, ...] = ()


class _Unusable(Exception):
    """The object as a whole cannot be used; raised inside decoding only, never out of `decode`."""


class _Ctx:
    """The object being decoded and the rejections found so far."""

    def __init__(self, ref: ObjectRef) -> None:
        self.ref = ref
        self.rejections: list[Rejection] = []
        self.canonicalized: list[Canonicalized] = []

    def note(self, field: str, written: str, canonical: IPAddress | IPNetwork) -> None:
        """A legacy value accepted in its canonical form (logged once decoding is done)."""
        self.canonicalized.append(Canonicalized(self.ref, field, written, str(canonical)))

    def drop(self, field: str, reason: str) -> None:
        self.rejections.append(Rejection(self.ref, field, reason))

    def fail(self, field: str, reason: str) -> _Unusable:
        self.rejections.append(Rejection(self.ref, field, reason, whole_object=True))
        return _Unusable()


def object_ref(raw: Any) -> ObjectRef | None:
    """The ref of a raw object if its kind is known and it has a name (namespace defaults to 'default')."""
    if not isinstance(raw, Mapping):
        return None
    try:
        kind = Kind(str(raw.get("kind")))
    except ValueError:
        return None
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace") if kind in _NAMESPACED else ""
    return ObjectRef(kind, namespace if isinstance(namespace, str) and namespace else
                     ("default" if kind in _NAMESPACED else ""), name)


def decode(raw: Any) -> Decoded:
    """Decode and validate one Kubernetes object; never raises (see the module doc)."""
    ref = object_ref(raw)
    if ref is None:
        return Decoded(None, (_unnamed_rejection(raw),))
    ctx = _Ctx(ref)
    try:
        obj = _decode_known(ctx, raw)
    except _Unusable:
        return Decoded(None, tuple(ctx.rejections))
    except Exception as exc:  # a decoder bug must not take the watch down; report it on the object
        ctx.fail("-", f"internal decoding error {type(exc).__name__}: {exc}")
        return Decoded(None, tuple(ctx.rejections))
    for value in ctx.canonicalized:
        log.warning("legacy value read as kube-proxy reads it", object=str(value.ref), field=value.field,
                    written=value.written, canonical=value.canonical)
    return Decoded(obj, tuple(ctx.rejections), tuple(ctx.canonicalized))


def _unnamed_rejection(raw: Any) -> Rejection:
    kind = raw.get("kind") if isinstance(raw, Mapping) else None
    known = {k.value for k in Kind}
    if not isinstance(raw, Mapping):
        reason, field = f"not an object but {type(raw).__name__}", "-"
    elif kind not in known:
        reason, field = f"unknown kind {kind!r}; nodeagent reads {sorted(known)}", "kind"
    else:
        reason, field = "missing", "metadata.name"
    return Rejection(ObjectRef(Kind.NAMESPACE, "", "<unknown>"), field, reason, whole_object=True)


def _decode_known(ctx: _Ctx, raw: Mapping[str, Any]) -> Object:
    group = str(raw.get("apiVersion", "")).rpartition("/")[0]
    if group not in _API_GROUPS[ctx.ref.kind]:
        raise ctx.fail("apiVersion", f"{raw.get('apiVersion')!r} is not an API version of {ctx.ref.kind}")
    name_ok = _DNS_LABEL if ctx.ref.kind is Kind.NAMESPACE else _DNS_SUBDOMAIN
    if not name_ok.match(ctx.ref.name):
        raise ctx.fail("metadata.name", f"{ctx.ref.name!r} is not a valid name")
    if ctx.ref.namespace and not _DNS_LABEL.match(ctx.ref.namespace):
        raise ctx.fail("metadata.namespace", f"{ctx.ref.namespace!r} is not a valid namespace name")
    decoder: Callable[[_Ctx, Mapping[str, Any]], Object] = _DECODERS[ctx.ref.kind]
    return decoder(ctx, raw)


# --- small typed accessors -------------------------------------------------------------------------


def _map(ctx: _Ctx, value: Any, field: str, *, whole: bool = False) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if whole:
        raise ctx.fail(field, f"must be an object, got {type(value).__name__}")
    ctx.drop(field, f"must be an object, got {type(value).__name__}")
    return {}


def _list(ctx: _Ctx, value: Any, field: str) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, list):
        return value
    ctx.drop(field, f"must be a list, got {type(value).__name__}")
    return ()


def _string_map(ctx: _Ctx, value: Any, field: str) -> dict[str, str]:
    """Labels, annotations, selectors: wrong ones make the object unusable (selection would be wrong)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise ctx.fail(field, "must map strings to strings")
    return dict(value)


def _meta(ctx: _Ctx, raw: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str], str]:
    meta = _map(ctx, raw.get("metadata"), "metadata", whole=True)
    rv = meta.get("resourceVersion", "")
    return (_string_map(ctx, meta.get("labels"), "metadata.labels"),
            _string_map(ctx, meta.get("annotations"), "metadata.annotations"), rv if isinstance(rv, str) else "")


def _int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _enum(ctx: _Ctx, enum: type[T], value: Any, default: T, field: str) -> T:
    if value is None or value == "":
        return default
    try:
        return enum(value)  # type: ignore[call-arg]
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ctx.fail(field, f"{value!r} is not one of {allowed}") from None


def parse_ip(value: Any) -> IPAddress | None:
    """A strictly parsed address (no leading zeros, no zone, no surrounding space), or None."""
    # inet_pton is as strict as the API server (it refuses leading zeros, zones and spaces) and four
    # times faster than ipaddress' own parser, which matters at 100,000 endpoint addresses per list.
    if not isinstance(value, str):
        return None
    try:
        if ":" in value:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, value))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
    except (OSError, ValueError):
        return None


def parse_cidr(value: Any) -> IPNetwork | None:
    """A strictly parsed CIDR whose host bits are zero, or None."""
    if not isinstance(value, str) or "/" not in value:
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        return None


def _ips(ctx: _Ctx, values: Any, field: str, family: int | None = None) -> Iterator[IPAddress]:
    for i, value in enumerate(_list(ctx, values, field)):
        ip = parse_ip(value)
        if ip is None:
            ctx.drop(f"{field}[{i}]", f"{value!r} is not a valid IP address")
        elif family is not None and ip.version != family:
            ctx.drop(f"{field}[{i}]", f"{ip} is IPv{ip.version} but the Service is IPv{family}")
        else:
            yield ip


# --- kube-proxy's sloppy parsers -------------------------------------------------------------------
#
# k8s.io/utils/net ParseIPSloppy and ParseCIDRSloppy are Go 1.16's net.ParseIP and net.ParseCIDR, kept
# from before Go refused leading zeros: an IPv4 part is any run of ASCII decimal digits up to 255 (`010`
# is 10, never octal), the whole string must be used (no space, no zone), and an IPv4-mapped IPv6
# address is an IPv4 address. These are ports of that code, used only where kube-proxy uses them; a
# strict parse is tried first, so valid input (nearly all of it) costs no more than before.

_GO_BIG = 0xFFFFFF  # Go's `big`: dtoi and xtoi give up at this value
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_HEX = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}


def _go_dtoi(s: str, start: int) -> tuple[int, int] | None:
    """Go's dtoi from `start`: (value, end) of the ASCII decimal digits there, None if none or too many."""
    n, i = 0, start
    while i < len(s) and "0" <= s[i] <= "9":
        n = n * 10 + ord(s[i]) - 48
        if n >= _GO_BIG:
            return None
        i += 1
    return (n, i) if i > start else None


def _go_ipv4(s: str) -> bytes | None:
    """Go 1.16's parseIPv4: four decimal parts 0-255 separated by dots, leading zeros allowed."""
    out = bytearray()
    i = 0
    for part in range(4):
        if i >= len(s):
            return None
        if part > 0:
            if s[i] != ".":
                return None
            i += 1
        parsed = _go_dtoi(s, i)
        if parsed is None or parsed[0] > 0xFF:
            return None
        out.append(parsed[0])
        i = parsed[1]
    return bytes(out) if i == len(s) else None


def _go_xtoi(s: str) -> tuple[int, int] | None:
    """Go's xtoi: (value, length) of the hex digits at the start of `s`, None if none or too many."""
    n, i = 0, 0
    while i < len(s) and s[i] in _HEX:
        n = n * 16 + _HEX[s[i]]
        if n >= _GO_BIG:
            return None
        i += 1
    return (n, i) if i else None


def _go_ipv6(s: str) -> bytes | None:
    """Go 1.16's parseIPv6 (no zone): hex groups, one `::`, an optional trailing dotted IPv4 part."""
    ip = bytearray(16)
    ellipsis = -1
    if s.startswith("::"):
        ellipsis, s = 0, s[2:]
        if not s:
            return bytes(ip)
    i = 0
    while i < 16:
        parsed = _go_xtoi(s)
        if parsed is None or parsed[0] > 0xFFFF:
            return None
        n, c = parsed
        if c < len(s) and s[c] == ".":  # the trailing IPv4 part, read from the start of this group
            if (ellipsis < 0 and i != 12) or i + 4 > 16:
                return None
            v4 = _go_ipv4(s)
            if v4 is None:
                return None
            ip[i:i + 4] = v4
            s, i = "", i + 4
            break
        ip[i], ip[i + 1] = n >> 8, n & 0xFF
        i += 2
        s = s[c:]
        if not s:
            break
        if s[0] != ":" or len(s) == 1:
            return None
        s = s[1:]
        if s[0] == ":":
            if ellipsis >= 0:
                return None
            ellipsis, s = i, s[1:]
            if not s:
                break
    if s:
        return None
    if i < 16:
        if ellipsis < 0:
            return None
        ip[ellipsis:] = bytes(16 - i) + ip[ellipsis:i]
    elif ellipsis >= 0:  # `::` must stand for at least one group
        return None
    return bytes(ip)


def _go_address(raw: bytes) -> IPAddress:
    """An address as Go sees it: 16 bytes of IPv4-mapped IPv6 are the IPv4 address (`To4() != nil`)."""
    if len(raw) == 16 and raw[:12] == _V4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


def parse_ip_sloppy(value: Any) -> IPAddress | None:
    """The address kube-proxy's `netutils.ParseIPSloppy` reads in `value`, canonical, or None.

    `172.30.0.041` is 172.30.0.41 and `::ffff:10.0.0.1` is 10.0.0.1; `172.17.0.300`, `0x0a.0.0.1`,
    ` 10.0.0.1` and `fe80::1%eth0` are None.
    """
    if not isinstance(value, str):
        return None
    for ch in value:  # Go's ParseIP: the first '.' or ':' decides the family
        if ch == ".":
            v4 = _go_ipv4(value)
            return None if v4 is None else ipaddress.IPv4Address(v4)
        if ch == ":":
            v6 = _go_ipv6(value)
            return None if v6 is None else _go_address(v6)
    return None


def parse_cidr_sloppy(value: Any) -> IPNetwork | None:
    """The network kube-proxy's `netutils.ParseCIDRSloppy` reads in `value` (host bits masked), or None.

    `203.0.113.000/025` and `203.0.113.5/25` are 203.0.113.0/25; a netmask (`/255.255.255.0`), a space or
    a prefix beyond the family's length are None. (No trimming: the caller trims where kube-proxy does.)
    """
    if not isinstance(value, str) or "/" not in value:
        return None
    address, _, mask = value.partition("/")
    raw, bits = _go_ipv4(address), 32
    if raw is None:
        raw, bits = _go_ipv6(address), 128
    prefix = _go_dtoi(mask, 0)
    if raw is None or prefix is None or prefix[1] != len(mask) or prefix[0] > bits:
        return None
    length = prefix[0]
    if bits == 32:
        return ipaddress.IPv4Network((ipaddress.IPv4Address(raw), length), strict=False)
    network = ipaddress.IPv6Network((ipaddress.IPv6Address(raw), length), strict=False)
    packed = network.network_address.packed
    if packed[:12] == _V4_MAPPED_PREFIX:  # Go prints a masked IPv4-mapped network as IPv4 (prefix - 96)
        return ipaddress.IPv4Network((ipaddress.IPv4Address(packed[12:]), length - 96), strict=False)
    return network


def _strict_cidr(value: str) -> bool:
    """Whether the API server's strict validation would take `value` as written (canonical CIDR)."""
    address, slash, mask = value.partition("/")
    return (bool(slash) and parse_ip(address) is not None and mask.isascii() and mask.isdigit()
            and (mask == "0" or not mask.startswith("0")) and parse_cidr(value) is not None)


def _read_sloppy(value: Any) -> tuple[IPAddress | None, bool]:
    """`value` read as kube-proxy reads it, and whether that differs from a strict reading (a legacy value)."""
    ip = parse_ip(value)
    if ip is None:
        ip = parse_ip_sloppy(value)
        return ip, ip is not None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # Go's To4(): an IPv4 address to kube-proxy
        return ip.ipv4_mapped, True
    return ip, False


def _sloppy_ip(ctx: _Ctx, value: Any, field: str, families: tuple[int, ...] | None = None) -> IPAddress | None:
    """`value` read as kube-proxy reads it (noted when it is a legacy value), None if it is not an address
    (reported) or not of one of the Service's `families` (reported)."""
    ip, legacy = _read_sloppy(value)
    if ip is None:
        ctx.drop(field, f"{value!r} is not a valid IP address")
        return None
    if families is not None and ip.version not in families:
        # kube-proxy's proxier of that family skips a Service without a clusterIP of its family
        # (GetClusterIPByFamily), and the other family's filters the address out (MapIPsByIPFamily)
        ctx.drop(field, f"{ip} is IPv{ip.version} but the Service is {'/'.join(f'IPv{f}' for f in families)}")
        return None
    if legacy:
        ctx.note(field, value, ip)
    return ip


def _sloppy_ips(ctx: _Ctx, values: Any, field: str, families: tuple[int, ...] | None = None) -> Iterator[IPAddress]:
    for i, value in enumerate(_list(ctx, values, field)):
        if (ip := _sloppy_ip(ctx, value, f"{field}[{i}]", families)) is not None:
            yield ip


# --- kinds -----------------------------------------------------------------------------------------


def _service(ctx: _Ctx, raw: Mapping[str, Any]) -> Service:
    labels, annotations, rv = _meta(ctx, raw)
    spec = _map(ctx, raw.get("spec"), "spec", whole=True)
    svc_type = _enum(ctx, ServiceType, spec.get("type"), ServiceType.CLUSTER_IP, "spec.type")
    if svc_type is ServiceType.EXTERNAL_NAME:
        name = spec.get("externalName")
        if not isinstance(name, str) or not name:
            raise ctx.fail("spec.externalName", "an ExternalName Service needs externalName")
        return Service(ref=ctx.ref, type=svc_type, cluster_ips=(), ports=(), external_name=name, labels=labels,
                       annotations=annotations, resource_version=rv)

    cluster_ips, headless = _cluster_ips(ctx, spec)
    # each family's proxier reads its own clusterIP, externalIPs and ingress IPs (kube-proxy's newBaseServiceInfo
    # filters them by family); an address of a family the Service has no clusterIP of is served by neither
    policy, cluster_ips = _ip_families(ctx, spec, cluster_ips, headless)
    families = tuple(ip.version for ip in cluster_ips) if cluster_ips else None
    ports = _service_ports(ctx, spec, svc_type)
    selector = spec.get("selector")
    affinity = _enum(ctx, SessionAffinity, spec.get("sessionAffinity"), SessionAffinity.NONE, "spec.sessionAffinity")
    timeout = 10800
    if affinity is SessionAffinity.CLIENT_IP:
        raw_timeout = _map(ctx, _map(ctx, spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
                           .get("clientIP"), "spec.sessionAffinityConfig.clientIP").get("timeoutSeconds")
        if raw_timeout is not None:
            parsed = _int(raw_timeout, 1, MAX_AFFINITY_TIMEOUT)
            if parsed is None:
                ctx.drop("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                         f"must be 1-{MAX_AFFINITY_TIMEOUT}, got {raw_timeout!r}; using 10800")
            else:
                timeout = parsed
    etp_raw = spec.get("externalTrafficPolicy")
    etp = _enum(ctx, TrafficPolicy, "Cluster" if etp_raw == "Global" else etp_raw, TrafficPolicy.CLUSTER,
                "spec.externalTrafficPolicy")
    itp = _enum(ctx, TrafficPolicy, spec.get("internalTrafficPolicy"), TrafficPolicy.CLUSTER,
                "spec.internalTrafficPolicy")
    hc_port = None
    if spec.get("healthCheckNodePort") is not None:
        hc_port = _int(spec.get("healthCheckNodePort"), 1, 65535)
        if hc_port is None:
            ctx.drop("spec.healthCheckNodePort", f"must be 1-65535, got {spec.get('healthCheckNodePort')!r}")
    status = _map(ctx, raw.get("status"), "status")
    lb_ingress = _load_balancer_ingress(ctx, status, families)
    source_ranges = []
    for i, value in enumerate(_list(ctx, spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")):
        # kube-proxy's MapCIDRsByIPFamily: trimmed, then ParseCIDRSloppy, whose network masks host bits
        cidr = parse_cidr_sloppy(value.strip() if isinstance(value, str) else value)
        if cidr is None:
            ctx.drop(f"spec.loadBalancerSourceRanges[{i}]", f"{value!r} is not a CIDR")
        else:
            if not _strict_cidr(value):
                ctx.note(f"spec.loadBalancerSourceRanges[{i}]", value, cidr)
            source_ranges.append(cidr)
    distribution = spec.get("trafficDistribution")
    if distribution is not None and not isinstance(distribution, str):
        ctx.drop("spec.trafficDistribution", f"must be a string, got {distribution!r}; no preference")
    return Service(
        ref=ctx.ref, type=svc_type, cluster_ips=cluster_ips, headless=headless, ports=ports,
        selector=None if selector is None else _string_map(ctx, selector, "spec.selector"),
        external_ips=tuple(_sloppy_ips(ctx, spec.get("externalIPs"), "spec.externalIPs", families)),
        load_balancer_ingress=lb_ingress, load_balancer_source_ranges=tuple(source_ranges),
        session_affinity=affinity, affinity_timeout_seconds=timeout, external_traffic_policy=etp,
        internal_traffic_policy=itp, health_check_node_port=hc_port, labels=labels, annotations=annotations,
        resource_version=rv, endpoint_weights=_endpoint_weights(ctx, annotations),
        traffic_distribution=distribution if isinstance(distribution, str) else "",
        ip_families=families or (), ip_family_policy=policy,
    )


def _load_balancer_ingress(ctx: _Ctx, status: Mapping[str, Any],
                           families: tuple[int, ...] | None) -> tuple[LoadBalancerIngress, ...]:
    """status.loadBalancer.ingress as kube-proxy's newBaseServiceInfo reads it: an entry without an IP
    (hostname-only, or "") is skipped silently; a Proxy-mode IP is kept whatever its family (kube-proxy
    skips it before the family check, and programs nothing for it); a VIP-mode one must be of one of the
    Service's families (each family's proxier keeps the ingress IPs of its family).
    An ipMode other than VIP or Proxy is not VIP to kube-proxy either (no rule): the
    entry is dropped, reported."""
    entries = []
    for i, raw in enumerate(_list(ctx, _map(ctx, status.get("loadBalancer"), "status.loadBalancer")
                                  .get("ingress"), "status.loadBalancer.ingress")):
        field = f"status.loadBalancer.ingress[{i}]"
        ingress = _map(ctx, raw, field)
        if ingress.get("ip") in (None, ""):
            continue
        raw_mode = ingress.get("ipMode")
        try:
            mode = None if raw_mode is None else LoadBalancerIPMode(raw_mode)
        except ValueError:
            ctx.drop(f"{field}.ipMode", f"{raw_mode!r} is not VIP or Proxy; like kube-proxy (which programs only "
                                        "VIP-mode ingress IPs), no rule for this IP")
            continue
        vip = mode is not LoadBalancerIPMode.PROXY
        ip = _sloppy_ip(ctx, ingress["ip"], f"{field}.ip", families if vip else None)
        if ip is not None:
            entries.append(LoadBalancerIngress(ip, mode))
    return tuple(entries)


WEIGHTS_ANNOTATION = "nodeagent.io/endpoint-weights"
MAX_WEIGHT = 10000


def _endpoint_weights(ctx: _Ctx, annotations: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """`{"pod-name": weight, ...}` (JSON); anything else is dropped whole with the reason."""
    text = annotations.get(WEIGHTS_ANNOTATION)
    if text is None:
        return ()
    field_path = f"metadata.annotations[{WEIGHTS_ANNOTATION}]"
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        ctx.drop(field_path, f"not JSON: {exc}; weights ignored")
        return ()
    if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_WEIGHT
            for k, v in parsed.items()):
        ctx.drop(field_path, f"must map pod names to integer weights 0-{MAX_WEIGHT}; weights ignored")
        return ()
    return tuple(sorted(parsed.items()))


_FAMILIES = {"IPv4": 4, "IPv6": 6}


def _ip_families(ctx: _Ctx, spec: Mapping[str, Any], cluster_ips: tuple[IPAddress, ...],
                 headless: bool) -> tuple[IPFamilyPolicy | None, tuple[IPAddress, ...]]:
    """spec.ipFamilyPolicy, and the cluster IPs served: kube-proxy's `GetClusterIPByFamily` gives each family's
    proxier `clusterIPs[i]` where `ipFamilies[i]` is its family, so spec.ipFamilies decides which of the cluster
    IPs are served. An entry that disagrees with the address at its index (which would hand the IPv6 proxier an
    IPv4 address) is reported and the address is served in its own family; a family listed without an address,
    or an address whose family is not listed, is reported and not served. Without spec.ipFamilies (a manifest
    written by hand: the API server always writes it) the cluster IPs are read as they are (kube-proxy's skew
    path would read only spec.clusterIP). Nothing here makes the Service unusable: the API server's validation
    makes these disagreements impossible for the Services it wrote."""
    raw_policy = spec.get("ipFamilyPolicy")
    policy = None
    if raw_policy not in (None, ""):
        try:
            policy = IPFamilyPolicy(raw_policy)
        except ValueError:
            allowed = ", ".join(p.value for p in IPFamilyPolicy)
            ctx.drop("spec.ipFamilyPolicy", f"{raw_policy!r} is not one of {allowed}; read as unset (SingleStack)")
    if headless:
        return policy, cluster_ips
    written = _list(ctx, spec.get("ipFamilies"), "spec.ipFamilies")
    listed: set[int] = set()
    for i, name in enumerate(written):
        field = f"spec.ipFamilies[{i}]"
        family = _FAMILIES.get(name) if isinstance(name, str) else None
        if family is None:
            ctx.drop(field, f"{name!r} is not IPv4 or IPv6")
        elif family in listed:
            ctx.drop(field, f"{name} is listed twice")
        elif i >= len(cluster_ips):
            ctx.drop(field, f"{name} has no address in spec.clusterIPs (the API server allocates one per family): "
                            f"no {name} rules for this Service")
        elif cluster_ips[i].version != family:
            ctx.drop(field, f"{name} but spec.clusterIPs[{i}] {cluster_ips[i]} is IPv{cluster_ips[i].version}: "
                            "each clusterIP is served in its own family")
            listed.add(cluster_ips[i].version)
        else:
            listed.add(family)
    served = list(cluster_ips)
    if listed:
        served = [cluster_ips[0], *(ip for ip in cluster_ips[1:] if ip.version in listed)]
        for i, ip in enumerate(cluster_ips[1:], start=1):
            if ip.version not in listed:
                ctx.drop(f"spec.clusterIPs[{i}]", f"{ip} is IPv{ip.version}, which spec.ipFamilies does not list: "
                                                  f"no IPv{ip.version} rules for this Service")
    if policy is IPFamilyPolicy.REQUIRE_DUAL_STACK and len(served) < 2:
        ctx.drop("spec.ipFamilyPolicy", f"RequireDualStack but the Service has only an IPv{served[0].version} "
                                        "clusterIP: served single-stack")
    elif policy is IPFamilyPolicy.SINGLE_STACK and len(served) > 1:
        ctx.drop("spec.ipFamilyPolicy", "SingleStack but the Service has an IPv4 and an IPv6 clusterIP: both are "
                                        "served, as kube-proxy serves each family's clusterIP")
    return policy, tuple(served)


def _cluster_ips(ctx: _Ctx, spec: Mapping[str, Any]) -> tuple[tuple[IPAddress, ...], bool]:
    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") is not None else [])
    field = "spec.clusterIPs" if spec.get("clusterIPs") else "spec.clusterIP"
    if not isinstance(raw_ips, list) or not raw_ips:
        raise ctx.fail(field, "missing: the API server allocates it, so this object is incomplete")
    if raw_ips[0] == "None":
        return (), True
    primary_field = f"{field}[0]" if field.endswith("s") else field
    primary, legacy = _read_sloppy(raw_ips[0])
    if primary is None:
        raise ctx.fail(primary_field, f"{raw_ips[0]!r} is not a valid IP address")
    if legacy:
        ctx.note(primary_field, raw_ips[0], primary)
    ips = [primary]
    other = 6 if primary.version == 4 else 4
    for i, value in enumerate(raw_ips[1:], start=1):
        ip, legacy = _read_sloppy(value)
        if ip is None:
            ctx.drop(f"spec.clusterIPs[{i}]", f"{value!r} is not a valid IP address: no IPv{other} rules for this "
                                              "Service")
        elif i > 1 or ip.version == primary.version:
            # the API server allows one address per family, the primary's first
            ctx.drop(f"spec.clusterIPs[{i}]", f"{value!r} is not a secondary IP of the other family "
                                              f"(the primary is IPv{primary.version})")
        else:
            if legacy:
                ctx.note(f"spec.clusterIPs[{i}]", value, ip)
            ips.append(ip)
    return tuple(ips), False


def _service_ports(ctx: _Ctx, spec: Mapping[str, Any], svc_type: ServiceType) -> tuple[ServicePort, ...]:
    raw_ports = _list(ctx, spec.get("ports"), "spec.ports")
    ports: list[ServicePort] = []
    seen: set[tuple[int, Protocol]] = set()
    names: set[str] = set()
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            ctx.drop(field, "must be an object")
            continue
        port = _int(raw.get("port"), 1, 65535)
        if port is None:
            ctx.drop(f"{field}.port", f"must be 1-65535, got {raw.get('port')!r}")
            continue
        try:
            protocol = Protocol(raw.get("protocol") or "TCP")
        except ValueError:
            ctx.drop(f"{field}.protocol", f"{raw.get('protocol')!r} is not TCP, UDP or SCTP")
            continue
        name = raw.get("name") or ""
        if not isinstance(name, str) or (name and not _DNS_LABEL.match(name)):
            ctx.drop(f"{field}.name", f"{name!r} is not a valid port name")
            continue
        if len(raw_ports) > 1 and not name:
            ctx.drop(f"{field}.name", "required when a Service has more than one port")
            continue
        if name in names:
            ctx.drop(f"{field}.name", f"duplicate port name {name!r}")
            continue
        if (port, protocol) in seen:
            ctx.drop(field, f"duplicate port {port}/{protocol}")
            continue
        target = raw.get("targetPort", port)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if not ((isinstance(target, int) and _int(target, 1, 65535) is not None)
                or (isinstance(target, str) and _PORT_NAME.match(target))):
            ctx.drop(f"{field}.targetPort", f"must be 1-65535 or a port name, got {target!r}")
            continue
        node_port = None
        if svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) and raw.get("nodePort") is not None:
            node_port = _int(raw.get("nodePort"), 1, 65535)
            if node_port is None:
                ctx.drop(f"{field}.nodePort", f"must be 1-65535, got {raw.get('nodePort')!r}")
                continue
        seen.add((port, protocol))
        names.add(name)
        ports.append(ServicePort(name=name, protocol=protocol, port=port, target_port=target, node_port=node_port))
    return tuple(ports)


def _endpoint_slice(ctx: _Ctx, raw: Mapping[str, Any]) -> EndpointSlice:
    labels, _, rv = _meta(ctx, raw)
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        raise ctx.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "missing: the slice belongs to no Service")
    if not raw.get("addressType"):
        raise ctx.fail("addressType", "missing")
    address_type = _enum(ctx, AddressType, raw.get("addressType"), AddressType.IPV4, "addressType")
    endpoints = [endpoint for i, raw_ep in enumerate(_list(ctx, raw.get("endpoints"), "endpoints"))
                 if (endpoint := _endpoint(ctx, raw_ep, i, address_type)) is not None]
    ports = []
    for i, raw_port in enumerate(_list(ctx, raw.get("ports"), "ports")):
        p = _map(ctx, raw_port, f"ports[{i}]")
        number = _int(p.get("port"), 1, 65535)
        try:
            protocol = Protocol(p.get("protocol") or "TCP")
        except ValueError:
            ctx.drop(f"ports[{i}].protocol", f"{p.get('protocol')!r} is not TCP, UDP or SCTP")
            continue
        if number is None:
            ctx.drop(f"ports[{i}].port", f"must be 1-65535, got {p.get('port')!r}")
            continue
        name = p.get("name") or ""
        ports.append(EndpointPort(name=name if isinstance(name, str) else "", protocol=protocol, port=number))
    return EndpointSlice(ref=ctx.ref, service_name=service, address_type=address_type, endpoints=tuple(endpoints),
                         ports=tuple(ports), resource_version=rv)


def _endpoint(ctx: _Ctx, raw: Any, i: int, address_type: AddressType) -> Endpoint | None:
    # The hot loop of a full list (100,000 endpoints at 10,000 Services): field paths are built only
    # when something is wrong.
    if not isinstance(raw, dict):
        ctx.drop(f"endpoints[{i}]", f"must be an object, got {type(raw).__name__}")
        return None
    if address_type is AddressType.FQDN:
        return None  # FQDN slices carry names no proxy can dial; they are kept only to be counted
    parse = _parse_v4 if address_type is AddressType.IPV4 else _parse_v6
    family = 4 if address_type is AddressType.IPV4 else 6
    addresses = []
    for j, value in enumerate(_list(ctx, raw.get("addresses"), f"endpoints[{i}].addresses")):
        ip = parse(value)
        if ip is None:  # not strictly valid (or IPv4-mapped): read it as kube-proxy does, off the hot path
            ip, _ = _read_sloppy(value)
            if ip is not None and ip.version == family:
                ctx.note(f"endpoints[{i}].addresses[{j}]", value, ip)
            else:
                ip = None
        if ip is None:
            ctx.drop(f"endpoints[{i}].addresses[{j}]", f"{value!r} is not a valid {address_type} address")
        else:
            addresses.append(ip)
    if not addresses:
        ctx.drop(f"endpoints[{i}]", "no valid address; endpoint ignored")
        return None
    cond = raw.get("conditions")
    if not isinstance(cond, dict):
        cond = _map(ctx, cond, f"endpoints[{i}].conditions")
    # The API contract, as kube-proxy's EndpointSliceCache reads it: unset ready and serving mean
    # true, unset terminating means false.
    conditions = (_READY if not cond else EndpointConditions(
        ready=cond.get("ready") is not False, serving=cond.get("serving") is not False,
        terminating=cond.get("terminating") is True))
    zones: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    if (hints := raw.get("hints")) is not None:
        hints = _map(ctx, hints, f"endpoints[{i}].hints")
        zones = _hint_names(ctx, hints, "forZones", i)
        nodes = _hint_names(ctx, hints, "forNodes", i)
    target_ref = None
    target = raw.get("targetRef")
    if isinstance(target, dict) and target.get("kind") == "Pod" and isinstance(target.get("name"), str):
        namespace = target.get("namespace")
        target_ref = ObjectRef(Kind.POD, namespace if isinstance(namespace, str) and namespace
                               else ctx.ref.namespace, target["name"])
    node_name, zone = raw.get("nodeName"), raw.get("zone")
    return Endpoint(addresses=tuple(addresses), conditions=conditions,
                    node_name=node_name if isinstance(node_name, str) else None,
                    zone=zone if isinstance(zone, str) else None, hint_zones=zones, target=target_ref,
                    hint_nodes=nodes)


def _hint_names(ctx: _Ctx, hints: Mapping[str, Any], key: str, i: int) -> tuple[str, ...]:
    """The names of `hints.forZones` or `hints.forNodes` (entries without a string name are skipped)."""
    return tuple(h["name"] for h in _list(ctx, hints.get(key), f"endpoints[{i}].hints.{key}")
                 if isinstance(h, dict) and isinstance(h.get("name"), str))


_READY = EndpointConditions()


def _parse_v4(value: Any) -> IPAddress | None:
    ip = parse_ip(value)
    return ip if ip is not None and ip.version == 4 else None


def _parse_v6(value: Any) -> IPAddress | None:
    ip = parse_ip(value)
    # an IPv4-mapped address is IPv4 to kube-proxy: left to the sloppy path (which refuses it here)
    return ip if ip is not None and ip.version == 6 and ip.ipv4_mapped is None else None


def _pod(ctx: _Ctx, raw: Mapping[str, Any]) -> Pod:
    labels, annotations, rv = _meta(ctx, raw)
    spec = _map(ctx, raw.get("spec"), "spec")
    status = _map(ctx, raw.get("status"), "status")
    raw_ips = [e.get("ip") for e in _list(ctx, status.get("podIPs"), "status.podIPs") if isinstance(e, Mapping)]
    if not raw_ips and status.get("podIP"):
        raw_ips = [status.get("podIP")]
    ips = tuple(_ips(ctx, raw_ips, "status.podIPs"))
    ports = []
    for ci, container in enumerate(_list(ctx, spec.get("containers"), "spec.containers")):
        container = _map(ctx, container, f"spec.containers[{ci}]")
        for pi, p in enumerate(_list(ctx, container.get("ports"), f"spec.containers[{ci}].ports")):
            p = _map(ctx, p, f"spec.containers[{ci}].ports[{pi}]")
            number = _int(p.get("containerPort"), 1, 65535)
            try:
                protocol = Protocol(p.get("protocol") or "TCP")
            except ValueError:
                number = None
            if number is None:
                ctx.drop(f"spec.containers[{ci}].ports[{pi}]", "needs containerPort 1-65535 and TCP, UDP or SCTP")
                continue
            name = p.get("name") or ""
            ports.append(ContainerPort(port=number, protocol=protocol, name=name if isinstance(name, str) else ""))
    node, phase, sa = spec.get("nodeName"), status.get("phase"), spec.get("serviceAccountName")
    uid = _map(ctx, raw.get("metadata"), "metadata").get("uid")
    qos = status.get("qosClass")
    if qos not in (None, "", *QOS_CLASSES):
        ctx.drop("status.qosClass", f"{qos!r} is not one of {', '.join(QOS_CLASSES)}")
        qos = ""
    return Pod(ref=ctx.ref, ips=ips, node_name=node if isinstance(node, str) else "",
               phase=phase if isinstance(phase, str) else "Unknown",
               service_account=sa if isinstance(sa, str) and sa else "default", labels=labels,
               annotations=annotations, container_ports=tuple(ports), host_network=spec.get("hostNetwork") is True,
               resource_version=rv, uid=uid if isinstance(uid, str) else "", qos_class=qos or "")


def _node(ctx: _Ctx, raw: Mapping[str, Any]) -> Node:
    labels, _, rv = _meta(ctx, raw)
    spec = _map(ctx, raw.get("spec"), "spec")
    status = _map(ctx, raw.get("status"), "status")
    addresses: dict[str, list[IPAddress]] = {}
    for i, entry in enumerate(_list(ctx, status.get("addresses"), "status.addresses")):
        entry = _map(ctx, entry, f"status.addresses[{i}]")
        kind = entry.get("type")
        if kind in ("InternalIP", "ExternalIP"):
            addresses.setdefault(kind, []).extend(_ips(ctx, [entry.get("address")], f"status.addresses[{i}].address"))
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    pod_cidrs = []
    for i, value in enumerate(_list(ctx, cidrs, "spec.podCIDRs")):
        cidr = parse_cidr(value)
        if cidr is None:
            ctx.drop(f"spec.podCIDRs[{i}]", f"{value!r} is not a CIDR")
        else:
            pod_cidrs.append(cidr)
    taint_keys = set()
    for i, taint in enumerate(_list(ctx, spec.get("taints"), "spec.taints")):
        taint = _map(ctx, taint, f"spec.taints[{i}]")
        if isinstance(taint.get("key"), str):
            taint_keys.add(taint["key"])
    metadata = raw.get("metadata")
    being_deleted = isinstance(metadata, Mapping) and bool(metadata.get("deletionTimestamp"))
    return Node(ref=ctx.ref, addresses={k: tuple(v) for k, v in addresses.items()}, pod_cidrs=tuple(pod_cidrs),
                labels=labels, resource_version=rv, being_deleted=being_deleted, taint_keys=frozenset(taint_keys))


def _namespace(ctx: _Ctx, raw: Mapping[str, Any]) -> Namespace:
    labels, _, rv = _meta(ctx, raw)
    return Namespace(ref=ctx.ref, labels=labels, resource_version=rv)


def _selector(ctx: _Ctx, spec: Mapping[str, Any]) -> dict[str, str] | None:
    selector = _map(ctx, spec.get("selector"), "spec.selector", whole=True)
    return _string_map(ctx, selector.get("matchLabels"), "spec.selector.matchLabels") if selector else None


# --- mesh policies ---------------------------------------------------------------------------------
#
# AuthorizationPolicy fails closed, field by field, the way istiod converts a policy for ztunnel
# (pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go, handleRule): a part the tunnel
# cannot enforce (an L7 attribute, an unknown field, a value it cannot read) is not dropped silently and
# does not reject the policy (which would fail open); it is kept on the rule as `Unenforceable`, where it
# makes an ALLOW rule match nothing and leaves a DENY rule denying on its other parts alone. Each one is
# also reported as a Rejection that says what the tunnel does with it.

_SOURCE_FIELDS = frozenset({"principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
                            "notServiceAccounts", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"})
_SOURCE_L7 = frozenset({"requestPrincipals", "notRequestPrincipals"})  # JWT: HTTP only
_OPERATION_FIELDS = frozenset({"ports", "notPorts"})
_OPERATION_L7 = frozenset({"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"})
# Istio's condition keys (pilot/pkg/security/authz/model/model.go); istiod's l4WhenAttributes lists the
# ones ztunnel enforces; remote.ip is added here because nothing in front of the tunnel rewrites the peer
# address, so remote.ip is the peer address, as in a sidecar without numTrustedProxies.
_WHEN_L4 = frozenset({"source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip",
                      "destination.port"})
_WHEN_L7_PREFIXES = ("request.", "connection.sni", "experimental.envoy.filters.")
_L7 = "is L7, unenforceable at L4"
_UNKNOWN = "is not a field of AuthorizationPolicy nodeagent knows, unenforceable"


class _Parts:
    """The unenforceable parts found while decoding one source, operation, condition or rule."""

    def __init__(self) -> None:
        self.items: list[Unenforceable] = []

    def add(self, field: str, reason: str) -> None:
        self.items.append(Unenforceable(field, reason))

    def done(self) -> tuple[Unenforceable, ...]:
        return tuple(self.items)


def _policy_strings(value: Any, field: str, parts: _Parts) -> tuple[str, ...]:
    """A list of non-empty strings, or () with the field unenforceable (a DENY then treats it as matching)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        parts.add(field, f"({_short(value)}) is not a list of non-empty strings, unenforceable")
        return ()
    return tuple(value)


def _policy_ports(value: Any, field: str, parts: _Parts) -> tuple[int, ...]:
    """Ports as Istio writes them (strings of digits; numbers accepted); one bad entry makes the whole
    field unenforceable, never a shorter list (which would narrow a DENY, or widen a notPorts)."""
    ports = []
    for i, item in enumerate(_policy_list(value, field, parts)):
        number = _int(int(item) if isinstance(item, str) and item.isdigit() else item, 1, 65535)
        if number is None:
            parts.add(f"{field}[{i}]", f"({_short(item)}) is not a port, unenforceable")
            return ()
        ports.append(number)
    return tuple(ports)


def _policy_networks(value: Any, field: str, parts: _Parts) -> tuple[IPNetwork, ...]:
    """IP blocks: CIDRs or bare addresses (a /32 or /128), v4 or v6; host bits allowed, as istiod's
    netip.ParsePrefix allows them. One bad entry makes the whole field unenforceable."""
    networks = []
    for i, item in enumerate(_policy_list(value, field, parts)):
        network = _ip_block(item)
        if network is None:
            parts.add(f"{field}[{i}]", f"({_short(item)}) is not an IP address or CIDR, unenforceable")
            return ()
        networks.append(network)
    return tuple(networks)


def _ip_block(value: Any) -> IPNetwork | None:
    if not isinstance(value, str):
        return None
    if "/" not in value:
        ip = parse_ip(value)
        return ipaddress.ip_network(ip) if ip is not None else None
    address, _, length = value.partition("/")
    if parse_ip(address) is None or not length.isdigit():
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _service_accounts(value: Any, field: str, namespace: str, parts: _Parts) -> tuple[tuple[str, str], ...]:
    """`ns/sa`, or `sa` for the policy's own namespace (Istio's Source.serviceAccounts, no wildcard)."""
    accounts = []
    for i, item in enumerate(_policy_list(value, field, parts)):
        ns, slash, name = item.partition("/") if isinstance(item, str) else ("", "", "")
        if not slash:
            ns, name = namespace, ns
        if not (ns and name and _DNS_LABEL.match(ns) and _DNS_SUBDOMAIN.match(name)):
            parts.add(f"{field}[{i}]", f"({_short(item)}) is not a service account (`ns/sa` or `sa`, "
                                       "no wildcard), unenforceable")
            return ()
        accounts.append((ns, name))
    return tuple(accounts)


def _policy_list(value: Any, field: str, parts: _Parts) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, list):
        return value
    parts.add(field, f"({_short(value)}) is not a list, unenforceable")
    return ()


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown_and_l7(raw: Mapping[str, Any], known: frozenset[str], l7: frozenset[str], path: str,
                    parts: _Parts) -> None:
    """Record every key of `raw` that is L7 or unknown (an empty L7 list constrains nothing: skipped)."""
    for key in sorted(raw):
        if key in known or raw[key] in (None, [], ""):
            continue
        parts.add(f"{path}.{key}", _L7 if key in l7 else _UNKNOWN)


def _policy_inner(raw: Any, name: str, path: str, parts: _Parts) -> dict[str, Any] | None:
    """The object under `name` of a `from[]`/`to[]` entry (`source`, `operation`), or None with the part
    recorded as unenforceable; other keys beside it are unknown parts."""
    inner = raw.get(name) if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not isinstance(inner, dict):
        parts.add(f"{path}.{name}" if isinstance(raw, dict) else path, "is not an object, unenforceable")
        return None
    _unknown_and_l7(raw, frozenset({name}), frozenset(), path, parts)
    return inner


def _policy_source(raw: Any, path: str, namespace: str) -> PolicySource:
    parts = _Parts()
    src = _policy_inner(raw, "source", path, parts)
    if src is None:
        return PolicySource(unenforceable=parts.done())
    path = f"{path}.source"
    _unknown_and_l7(src, _SOURCE_FIELDS, _SOURCE_L7, path, parts)
    source = PolicySource(
        principals=_policy_strings(src.get("principals"), f"{path}.principals", parts),
        not_principals=_policy_strings(src.get("notPrincipals"), f"{path}.notPrincipals", parts),
        namespaces=_policy_strings(src.get("namespaces"), f"{path}.namespaces", parts),
        not_namespaces=_policy_strings(src.get("notNamespaces"), f"{path}.notNamespaces", parts),
        service_accounts=_service_accounts(src.get("serviceAccounts"), f"{path}.serviceAccounts", namespace, parts),
        not_service_accounts=_service_accounts(src.get("notServiceAccounts"), f"{path}.notServiceAccounts",
                                               namespace, parts),
        ip_blocks=_policy_networks(src.get("ipBlocks"), f"{path}.ipBlocks", parts),
        not_ip_blocks=_policy_networks(src.get("notIpBlocks"), f"{path}.notIpBlocks", parts),
        remote_ip_blocks=_policy_networks(src.get("remoteIpBlocks"), f"{path}.remoteIpBlocks", parts),
        not_remote_ip_blocks=_policy_networks(src.get("notRemoteIpBlocks"), f"{path}.notRemoteIpBlocks", parts))
    if source == PolicySource() and not parts.items:
        # Istio's validation refuses an empty source; ztunnel skips an empty match (it matches nothing).
        parts.add(path, "is empty (Istio's validation refuses it), unenforceable")
    return dataclasses.replace(source, unenforceable=parts.done())


def _policy_operation(raw: Any, path: str) -> PolicyOperation:
    parts = _Parts()
    op = _policy_inner(raw, "operation", path, parts)
    if op is None:
        return PolicyOperation(unenforceable=parts.done())
    path = f"{path}.operation"
    _unknown_and_l7(op, _OPERATION_FIELDS, _OPERATION_L7, path, parts)
    operation = PolicyOperation(ports=_policy_ports(op.get("ports"), f"{path}.ports", parts),
                                not_ports=_policy_ports(op.get("notPorts"), f"{path}.notPorts", parts))
    if operation == PolicyOperation() and not parts.items:
        parts.add(path, "is empty (Istio's validation refuses it), unenforceable")
    return dataclasses.replace(operation, unenforceable=parts.done())


def _policy_condition(raw: Any, path: str) -> PolicyCondition:
    """A `when` entry as istiod converts it for ztunnel: one match on the field its key names."""
    parts = _Parts()
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or not raw["key"]:
        parts.add(path, "has no key, unenforceable")
        return PolicyCondition(key="", unenforceable=parts.done())
    key: str = raw["key"]
    _unknown_and_l7(raw, frozenset({"key", "values", "notValues"}), frozenset(), path, parts)
    if key not in _WHEN_L4:
        what = _L7 if key.startswith(_WHEN_L7_PREFIXES) else "is not a condition key of Istio, unenforceable"
        parts.add(path, f"({key}) {what}")
        return PolicyCondition(key=key, unenforceable=parts.done())
    values, not_values = raw.get("values"), raw.get("notValues")
    if not values and not not_values:
        parts.add(path, f"({key}) has neither values nor notValues (Istio's validation refuses it), unenforceable")
        return PolicyCondition(key=key, unenforceable=parts.done())
    vpath, npath = f"{path}.values", f"{path}.notValues"
    source, operation = PolicySource(), PolicyOperation()
    if key == "source.ip":
        source = PolicySource(ip_blocks=_policy_networks(values, vpath, parts),
                              not_ip_blocks=_policy_networks(not_values, npath, parts))
    elif key == "remote.ip":
        source = PolicySource(remote_ip_blocks=_policy_networks(values, vpath, parts),
                              not_remote_ip_blocks=_policy_networks(not_values, npath, parts))
    elif key == "source.namespace":
        source = PolicySource(namespaces=_policy_strings(values, vpath, parts),
                              not_namespaces=_policy_strings(not_values, npath, parts))
    elif key == "source.principal":
        source = PolicySource(principals=_policy_strings(values, vpath, parts),
                              not_principals=_policy_strings(not_values, npath, parts))
    elif key == "destination.ip":
        operation = PolicyOperation(destination_ips=_policy_networks(values, vpath, parts),
                                    not_destination_ips=_policy_networks(not_values, npath, parts))
    else:  # destination.port
        operation = PolicyOperation(ports=_policy_ports(values, vpath, parts),
                                    not_ports=_policy_ports(not_values, npath, parts))
    return PolicyCondition(key=key, source=source, operation=operation, unenforceable=parts.done())


def _policy_rule(raw: Any, path: str, namespace: str) -> PolicyRule:
    parts = _Parts()
    if not isinstance(raw, dict):
        parts.add(path, "is not an object, unenforceable")
        return PolicyRule(unenforceable=parts.done())
    _unknown_and_l7(raw, frozenset({"from", "to", "when"}), frozenset(), path, parts)
    return PolicyRule(
        sources=tuple(_policy_source(e, f"{path}.from[{j}]", namespace)
                      for j, e in enumerate(_policy_list(raw.get("from"), f"{path}.from", parts))),
        operations=tuple(_policy_operation(e, f"{path}.to[{j}]")
                         for j, e in enumerate(_policy_list(raw.get("to"), f"{path}.to", parts))),
        conditions=tuple(_policy_condition(e, f"{path}.when[{j}]")
                         for j, e in enumerate(_policy_list(raw.get("when"), f"{path}.when", parts))),
        unenforceable=parts.done())


def _authorization_policy(ctx: _Ctx, raw: Mapping[str, Any]) -> AuthorizationPolicy:
    _, _, rv = _meta(ctx, raw)
    spec = _map(ctx, raw.get("spec"), "spec", whole=True)
    action = _enum(ctx, PolicyAction, spec.get("action"), PolicyAction.ALLOW, "spec.action")
    if action in (PolicyAction.AUDIT, PolicyAction.CUSTOM):
        ctx.drop("spec.action", f"{action} is not enforced by the tunnel (ztunnel ignores it: istiod does not send "
                                "it; a waypoint would): the policy neither allows nor denies anything")
    raw_rules = spec.get("rules")
    rules_parts = _Parts()
    rules = tuple(_policy_rule(r, f"rules[{i}]", ctx.ref.namespace)
                  for i, r in enumerate(_policy_list(raw_rules, "rules", rules_parts)))
    if rules_parts.items:  # `rules` is not a list: one rule that cannot be enforced, so it fails closed
        rules = (PolicyRule(unenforceable=rules_parts.done()),)
    if action in (PolicyAction.ALLOW, PolicyAction.DENY):
        effect = ("this ALLOW rule matches nothing" if action is PolicyAction.ALLOW
                  else "this DENY rule denies on its other parts alone")
        for rule in rules:
            for part in rule.all_unenforceable:
                ctx.drop(f"spec.{part.field}", f"{part.reason}: {effect}")
    for key in ("targetRef", "targetRefs"):
        if spec.get(key):
            ctx.drop(f"spec.{key}", "attaches the policy to a waypoint or gateway, which nodeagent does not run; "
                                    "the tunnel applies the policy by its selector (namespace-wide without one)")
    selector, readable = _policy_selector(spec)
    if not readable:
        # Dropping the policy would fail open (a DENY gone; an ALLOW gone, so "no ALLOW applies"). Applied
        # to the whole namespace instead: a DENY denies as written there, an ALLOW allows nothing.
        effect = ("its rules then match nothing" if action is PolicyAction.ALLOW else "it denies as written there")
        ctx.drop("spec.selector", f"({_short(spec.get('selector'))}) is not a selector with string matchLabels: "
                                  f"the policy applies to every workload of the namespace and {effect}")
        if action is PolicyAction.ALLOW:
            rules = (PolicyRule(unenforceable=(Unenforceable("selector", "unreadable selector"),)),)
    return AuthorizationPolicy(ref=ctx.ref, action=action, selector=selector, rules=rules, resource_version=rv)


def _policy_selector(spec: Mapping[str, Any]) -> tuple[dict[str, str] | None, bool]:
    """(matchLabels or None for the whole namespace, whether the selector could be read at all)."""
    raw = spec.get("selector")
    if raw is None:
        return None, True
    labels = raw.get("matchLabels") if isinstance(raw, Mapping) else raw
    if labels is None and isinstance(raw, Mapping):
        return None, True
    if isinstance(labels, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return (dict(labels) or None), True
    return None, False


def _peer_authentication(ctx: _Ctx, raw: Mapping[str, Any]) -> PeerAuthentication:
    _, _, rv = _meta(ctx, raw)
    spec = _map(ctx, raw.get("spec"), "spec", whole=True)
    mtls = _map(ctx, spec.get("mtls"), "spec.mtls", whole=True)
    # No mode (or UNSET) inherits from the level above (PeerAuthentication.MutualTLS.Mode.UNSET).
    mode = _enum(ctx, PeerAuthenticationMode, mtls.get("mode"), PeerAuthenticationMode.UNSET, "spec.mtls.mode")
    selector = _selector(ctx, spec)
    port_level: dict[int, PeerAuthenticationMode] = {}
    raw_ports = _map(ctx, spec.get("portLevelMtls"), "spec.portLevelMtls", whole=True)
    if raw_ports and not selector:
        ctx.drop("spec.portLevelMtls", "applies only to a policy with a selector (Istio ignores it otherwise): ignored")
        raw_ports = {}
    for key, value in raw_ports.items():
        field = f"spec.portLevelMtls[{key}]"
        port = _int(int(key) if isinstance(key, str) and key.isdigit() else key, 1, 65535)
        if port is None:
            raise ctx.fail(field, f"{key!r} is not a port")
        port_level[port] = _enum(ctx, PeerAuthenticationMode, _map(ctx, value, field, whole=True).get("mode"),
                                 PeerAuthenticationMode.UNSET, f"{field}.mode")
    return PeerAuthentication(ref=ctx.ref, mode=mode, selector=selector, resource_version=rv,
                              port_level_mtls=port_level)


_DECODERS: dict[Kind, Callable[[_Ctx, Mapping[str, Any]], Object]] = {
    Kind.SERVICE: _service,
    Kind.ENDPOINT_SLICE: _endpoint_slice,
    Kind.POD: _pod,
    Kind.NODE: _node,
    Kind.NAMESPACE: _namespace,
    Kind.AUTHORIZATION_POLICY: _authorization_policy,
    Kind.PEER_AUTHENTICATION: _peer_authentication,
}
