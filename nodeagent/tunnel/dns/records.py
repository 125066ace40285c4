"""Which names the tunnel's DNS proxy answers itself, and with what. Pure: strings and addresses, no wire format.

A `DnsTable` is made from a snapshot (`dns_table`): every Service by (namespace, name) with its cluster IPs,
whether it is headless (then its ready endpoints' addresses) or an ExternalName (then a CNAME), its ports,
and the namespaces that exist. `resolve(table, name, family)` answers one A (family 4) or AAAA (6) question.

What is answered, and how, follows CoreDNS's kubernetes plugin (plugin/kubernetes/parse.go `parseRequest`,
kubernetes.go `Records` and `findServices`), which implements the Kubernetes DNS specification:
- `<service>.<namespace>.svc.<domain>`: a ClusterIP Service's cluster IPs of the asked family (NODATA when it
  has none of that family: a single-stack IPv4 Service asked for AAAA); a headless Service's ready endpoint
  addresses (none ready: NXDOMAIN, as CoreDNS answers a headless Service without endpoints); an ExternalName
  Service a CNAME to its external name (an external name that is an IP address is no CNAME: CoreDNS skips
  it, so NXDOMAIN); a Service that does not exist, or a namespace that does not, NXDOMAIN.
- `<endpoint>.<service>.<namespace>.svc.<domain>`: the endpoint whose hostname is `<endpoint>`. The model
  carries no endpoint hostnames, so only the form CoreDNS gives an endpoint without one (its IP with dashes:
  `10-244-1-3`, `fd00-10-244-1--3`) is answered here; another label of an existing Service with ready
  endpoints may be a pod's hostname (a StatefulSet's) and is forwarded to the pod's resolver, which knows;
  so is any endpoint name of a ClusterIP Service (its endpoints are not held here).
- `_<port>._<protocol>.<service>.<namespace>.svc.<domain>`: the Service's addresses if it has that port.
- `<namespace>.svc.<domain>` of an existing namespace, and `svc.<domain>` itself: NODATA (empty non-terminals).
- more labels than those, or a name of the cluster domain neither under `svc.<domain>` nor `pod.<domain>`:
  NXDOMAIN (CoreDNS's errInvalidRequest); the domain's apex: NODATA.
Names are matched case-insensitively, with or without the trailing dot. Pod records (`pod.<domain>`, which
CoreDNS's `pods` setting decides), every name outside the cluster domain and any question other than A/AAAA
go to the pod's own resolver (ztunnel forwards whatever it does not hold). Answering the whole cluster domain
here, as CoreDNS does, matters when the cluster DNS is unreachable: a stub resolver walking its search list
gets its NXDOMAINs at once instead of a timeout that ends the walk (glibc stops searching on one).

Search paths need nothing more: a pod's stub resolver expands `echo` to `echo.<ns>.svc.<domain>` (kubelet
writes `search <ns>.svc.<domain> svc.<domain> <domain>` with `ndots:5`) and tries the next form on NXDOMAIN
or NODATA, so `echo`, `echo.demo` and `echo.demo.svc` all end at `echo.demo.svc.<domain>` (`search_names`
is that expansion, for tests and the docs).

Istio's ServiceEntry hosts are not answered: this project has no ServiceEntry kind (nodeagent.cluster.model
lists the kinds it watches), so there is nothing to read them from.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

from nodeagent.cluster.model import EndpointSlice, IPAddress, Kind, ObjectRef, Service, ServiceType
from nodeagent.heap import collector_paused
from nodeagent.state.tracker import Snapshot

CLUSTER_DOMAIN = "cluster.local"
# The kinds a table reads: before all three are listed, a missing Service may exist, so nothing is answered
# from the table (every question is forwarded) rather than NXDOMAIN given for a name that exists.
DNS_KINDS = (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NAMESPACE)


class Outcome(StrEnum):
    """What the table says about one question."""

    ANSWER = "answer"      # `addresses` is the answer
    CNAME = "cname"        # an ExternalName: `cname` is the answer, its target is resolved further
    NODATA = "nodata"      # the name exists, not with records of this type (NOERROR, empty answer)
    NXDOMAIN = "nxdomain"  # the name does not exist
    FORWARD = "forward"    # not the table's to answer: ask the pod's resolver


@dataclass(frozen=True, slots=True)
class Resolution:
    """The table's answer to one question."""

    outcome: Outcome
    addresses: tuple[IPAddress, ...] = ()
    cname: str = ""  # for CNAME: the external name, lower case, without the trailing dot
    zone: str = ""  # the cluster domain the name fell in (for the SOA of a negative answer)


FORWARD = Resolution(Outcome.FORWARD)


@dataclass(frozen=True, slots=True)
class DnsService:
    """What DNS needs of one Service."""

    type: ServiceType
    cluster_ips: tuple[IPAddress, ...] = ()
    headless: bool = False
    external_name: str = ""
    ports: frozenset[tuple[str, str]] = frozenset()  # (port name, protocol), lower case
    ready: tuple[IPAddress, ...] = ()  # a headless Service's ready endpoint addresses, unique, in slice order


@dataclass(frozen=True)
class DnsTable:
    """The Services and namespaces of one snapshot, by name (lower case), for one cluster domain."""

    domain: str = CLUSTER_DOMAIN
    services: Mapping[tuple[str, str], DnsService] = field(default_factory=dict)  # (namespace, name) -> Service
    namespaces: frozenset[str] = frozenset()
    generation: int = 0  # of the snapshot that last changed it: the SOA serial of negative answers

    def __len__(self) -> int:
        return len(self.services)


def dns_service(service: Service, ready: Iterable[IPAddress] = ()) -> DnsService:
    """A Service as DNS reads it; `ready` are its ready endpoint addresses (used when it is headless)."""
    ports = frozenset((p.name.lower(), p.protocol.value.lower()) for p in service.ports)
    return DnsService(service.type, service.cluster_ips, service.headless, service.external_name.rstrip(".").lower(),
                      ports, tuple(dict.fromkeys(ready)) if service.headless else ())


def _key(ref: ObjectRef) -> tuple[str, str]:
    return ref.namespace.lower(), ref.name.lower()


def _ready(slices: Mapping[ObjectRef, EndpointSlice], services: Container[ObjectRef]
           ) -> dict[ObjectRef, list[IPAddress]]:
    """Ready endpoint addresses of `services`, as CoreDNS reads EndpointSlices: an endpoint counts when its ready
    condition is unset or true (object/endpoint.go); the slice controller already sets ready for Services that
    publishNotReadyAddresses."""
    ready: dict[ObjectRef, list[IPAddress]] = {}
    for endpoint_slice in slices.values():
        service_ref = endpoint_slice.service
        if service_ref not in services:
            continue
        addresses = ready.setdefault(service_ref, [])
        for endpoint in endpoint_slice.endpoints:
            if endpoint.conditions.ready:
                addresses.extend(endpoint.addresses)
    return ready


def dns_table(snapshot: Snapshot, domain: str = CLUSTER_DOMAIN, since: tuple[DnsTable, Snapshot] | None = None
              ) -> DnsTable | None:
    """The table of `snapshot`, or None while Services, EndpointSlices or Namespaces are not all listed.

    With `since` (the table made from an earlier snapshot, and that snapshot), only the Services whose object
    or EndpointSlices changed are redone, found by comparing the two snapshots object by object (a snapshot
    shares every object, and a kind's whole map, that did not change; ~1 us an object when the kind changed,
    as ServiceTable.updated's scan), and that table itself is returned when DNS reads no change (the proxy
    keeps its answers while the table is the same object). A full build costs ~10-20 us a Service (0.1-0.2 s
    at 10,000) on the tunnel's event loop."""
    if not snapshot.synced(DNS_KINDS):
        return None
    domain = normalize(domain)
    if since is None or since[0].domain != domain:
        with collector_paused():  # a burst of acyclic allocations (see nodeagent.heap)
            ready = _ready(snapshot.endpoint_slices, {ref for ref, svc in snapshot.services.items() if svc.headless})
            services = {_key(ref): dns_service(svc, ready.get(ref, ())) for ref, svc in snapshot.services.items()}
        return DnsTable(domain, services, frozenset(ref.name.lower() for ref in snapshot.namespaces),
                        snapshot.generation)
    previous, before = since
    old_services, old_slices = before.services, before.endpoint_slices
    new_services, new_slices = snapshot.services, snapshot.endpoint_slices
    dirty: set[ObjectRef] = set()
    if new_services is not old_services:
        dirty.update(ref for ref, svc in new_services.items() if old_services.get(ref) is not svc)
        dirty.update(ref for ref in old_services if ref not in new_services)
    if new_slices is not old_slices:
        for ref, endpoint_slice in new_slices.items():
            was = old_slices.get(ref)
            if was is not endpoint_slice:
                dirty.add(endpoint_slice.service)
                if was is not None:
                    dirty.add(was.service)
        dirty.update(endpoint_slice.service for ref, endpoint_slice in old_slices.items() if ref not in new_slices)
    namespaces = previous.namespaces if snapshot.namespaces is before.namespaces else frozenset(
        ref.name.lower() for ref in snapshot.namespaces)
    headless = {ref for ref in dirty if (svc := new_services.get(ref)) is not None and svc.headless}
    ready = _ready(new_slices, headless) if headless else {}
    changed: dict[tuple[str, str], DnsService | None] = {}
    for ref in dirty:
        service = new_services.get(ref)
        entry = None if service is None else dns_service(service, ready.get(ref, ()))
        if previous.services.get(_key(ref)) != entry:  # not for what DNS does not read (a target port, a label)
            changed[_key(ref)] = entry
    if not changed and namespaces == previous.namespaces:
        return previous
    services = dict(previous.services)
    for key, entry in changed.items():
        if entry is None:
            services.pop(key, None)
        else:
            services[key] = entry
    return DnsTable(domain, services, namespaces, snapshot.generation)


def normalize(name: str) -> str:
    """A name as the table compares it: lower case, without the trailing dot."""
    return name.rstrip(".").lower()


def dashed(address: IPAddress) -> str:
    """An endpoint's name when it has no hostname, as CoreDNS writes it (`endpointHostname`): its address with
    dashes for dots (IPv4) or colons (IPv6, compressed as written)."""
    return str(address).replace(".", "-").replace(":", "-")


def resolve(table: DnsTable | None, name: str, family: int) -> Resolution:
    """The table's answer to an A (`family` 4) or AAAA (6) question for `name` (see the module doc)."""
    if table is None:
        return FORWARD
    qname = normalize(name)
    domain = table.domain
    if qname == domain:  # the zone's apex: it has an SOA, no address
        return Resolution(Outcome.NODATA, zone=domain)
    if not qname.endswith("." + domain):
        return FORWARD
    labels = qname[:-len(domain) - 1].split(".")
    if labels[-1] == "pod":
        return FORWARD  # pod records: CoreDNS's `pods` setting decides them, the pod's resolver has it
    if labels[-1] != "svc":
        return Resolution(Outcome.NXDOMAIN, zone=domain)  # neither svc nor pod: CoreDNS's errInvalidRequest
    labels.pop()
    if not labels:  # svc.<domain>: an empty non-terminal
        return Resolution(Outcome.NODATA, zone=domain)
    namespace = labels[-1]
    if namespace not in table.namespaces:
        return Resolution(Outcome.NXDOMAIN, zone=domain)
    if len(labels) == 1:
        return Resolution(Outcome.NODATA, zone=domain)
    service = table.services.get((namespace, labels[-2]))
    rest = labels[:-2]
    if service is None or len(rest) > 2:
        return Resolution(Outcome.NXDOMAIN, zone=table.domain)
    if service.type is ServiceType.EXTERNAL_NAME:
        return _external(service, rest, table.domain)
    if len(rest) == 2:  # _port._protocol: the Service's addresses if it has that port (matchPortAndProtocol)
        port, protocol = (label.removeprefix("_") for label in rest)
        if not any(_wild_match(port, p) and _wild_match(protocol, proto) for p, proto in service.ports):
            return Resolution(Outcome.NXDOMAIN, zone=table.domain)
        rest = []
    if rest and not service.headless:
        return FORWARD  # endpoint names of a ClusterIP Service: its endpoints are not held here
    if service.headless:
        candidates = service.ready
        if rest:
            if not candidates:
                return Resolution(Outcome.NXDOMAIN, zone=table.domain)
            candidates = tuple(ip for ip in candidates if dashed(ip) == rest[0])
            if not candidates:
                return FORWARD  # perhaps an endpoint's hostname, which only the pod's resolver knows
        elif not candidates:
            return Resolution(Outcome.NXDOMAIN, zone=table.domain)
        return _of_family(candidates, family, table.domain)
    if not service.cluster_ips:  # a ClusterIP Service whose address the decoder could not read: nothing to give
        return Resolution(Outcome.NXDOMAIN, zone=table.domain)
    return _of_family(service.cluster_ips, family, table.domain)


def _wild_match(asked: str, has: str) -> bool:
    return asked in (has, "")


def _external(service: DnsService, rest: list[str], domain: str) -> Resolution:
    target = service.external_name
    if rest or not target or _is_address(target):
        # CoreDNS: an ExternalName has no endpoints, and an external name that is an address is no CNAME
        return Resolution(Outcome.NXDOMAIN, zone=domain)
    return Resolution(Outcome.CNAME, cname=target, zone=domain)


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _of_family(addresses: Iterable[IPAddress], family: int, domain: str) -> Resolution:
    kind = IPv4Address if family == 4 else IPv6Address
    matching = tuple(ip for ip in addresses if isinstance(ip, kind))
    return Resolution(Outcome.ANSWER if matching else Outcome.NODATA, matching, zone=domain)


def search_names(name: str, namespace: str, domain: str = CLUSTER_DOMAIN, ndots: int = 5) -> list[str]:
    """The names a pod's stub resolver tries for `name`, in order (resolv.conf(5) with the search list
    kubelet writes for a ClusterFirst pod: `<ns>.svc.<domain> svc.<domain> <domain>`, `options ndots:5`)."""
    if name.endswith("."):
        return [normalize(name)]
    search = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]
    expanded = [f"{name}.{suffix}".lower() for suffix in search]
    return [name.lower(), *expanded] if name.count(".") >= ndots else [*expanded, name.lower()]


def stub_lookup(table: DnsTable | None, name: str, namespace: str, family: int) -> tuple[str, Resolution]:
    """What a pod's stub resolver ends with for `name`: the first search form the table answers, or the last
    negative answer (for tests and the docs: the real walk happens in the pod's libc)."""
    last = (name, Resolution(Outcome.NXDOMAIN))
    for candidate in search_names(name, namespace):
        resolution = resolve(table, candidate, family)
        if resolution.outcome in (Outcome.ANSWER, Outcome.CNAME, Outcome.FORWARD):
            return candidate, resolution
        last = (candidate, resolution)
    return last

