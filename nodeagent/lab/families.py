"""A Service's IP families and cluster IPs as kube-apiserver gives them on create. Pure.

Both the lab's own allocation (`nodeagent.lab.topology`, Services of the manifests) and the lab API server
(`nodeagent.lab.apiserver.controllers.ServiceDefaults`, Services written through the API) fill Services in
here, so a Service gets the same fields whichever way it enters the lab. The rules are kube-apiserver's
(pkg/registry/core/service/storage/alloc.go, initIPFamilyFields and allocClusterIPs):
- ipFamilyPolicy unset: SingleStack, except headless (clusterIP None) without selector: RequireDualStack;
- ipFamilies inferred from the clusterIPs given, else the cluster's primary family (the first service CIDR),
  and for a policy other than SingleStack on a dual-stack cluster the other family is appended;
- RequireDualStack on a single-stack cluster, or a family the cluster has no service CIDR for, is refused;
- each family without a cluster IP gets the next free address of its service CIDR (headless gets none).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

SINGLE_STACK = "SingleStack"
PREFER_DUAL_STACK = "PreferDualStack"
REQUIRE_DUAL_STACK = "RequireDualStack"
POLICIES = (SINGLE_STACK, PREFER_DUAL_STACK, REQUIRE_DUAL_STACK)
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
FAMILY_NUMBERS = {name: number for number, name in FAMILY_NAMES.items()}
# The lab allocates from the tenth address of a service CIDR on (the first ones are the `kubernetes`
# Service's and the cluster DNS's on a cluster).
FIRST_ALLOCATED_OFFSET = 10


@dataclass(frozen=True)
class FamilyProblem:
    """A field of a Service the API server would refuse, and why."""

    field: str
    message: str


@dataclass(frozen=True)
class ServiceCIDRs:
    """The cluster's service CIDRs (kube-apiserver's --service-cluster-ip-range): the first is the primary."""

    cidrs: tuple[IPv4Network | IPv6Network, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.cidrs) <= 2 or len({c.version for c in self.cidrs}) != len(self.cidrs):
            raise ValueError(f"one service CIDR, or one of each family, not {[str(c) for c in self.cidrs]}")

    @classmethod
    def parse(cls, text: str) -> ServiceCIDRs:
        """`10.96.0.0/12` or `10.96.0.0/12,fd00:10:96::/112` (ValueError if it is neither)."""
        nets = []
        for part in (p.strip() for p in text.split(",")):
            parsed: IPv4Network | IPv6Network = (IPv6Network(part, strict=True) if ":" in part
                                                 else IPv4Network(part, strict=True))
            nets.append(parsed)
        return cls(tuple(nets))

    @property
    def primary(self) -> int:
        """The family of the first CIDR, which single-stack Services get by default."""
        return self.cidrs[0].version

    @property
    def families(self) -> frozenset[int]:
        """The families the cluster can give cluster IPs of."""
        return frozenset(c.version for c in self.cidrs)

    def of(self, family: int) -> IPv4Network | IPv6Network:
        """The CIDR of `family` (KeyError if the cluster has none)."""
        for cidr in self.cidrs:
            if cidr.version == family:
                return cidr
        raise KeyError(family)

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.cidrs)


def _family_of(text: Any) -> int | None:
    try:
        return ip_address(text).version if isinstance(text, str) else None
    except ValueError:
        return None


def init_ip_families(spec: MutableMapping[str, Any], cidrs: ServiceCIDRs) -> list[FamilyProblem]:
    """Default spec.ipFamilyPolicy and spec.ipFamilies of a Service being created, in place, as kube-apiserver's
    initIPFamilyFields; the problems that make it refuse the Service (then `spec` may be partly filled)."""
    if spec.get("type") == "ExternalName":
        return []
    cluster_ips = _cluster_ips(spec)
    if cluster_ips and "clusterIPs" not in spec:
        spec["clusterIPs"] = list(cluster_ips)
    headless_selectorless = bool(cluster_ips) and cluster_ips[0] == "None" and not spec.get("selector")
    policy = spec.get("ipFamilyPolicy")
    if policy is None:
        policy = spec["ipFamilyPolicy"] = REQUIRE_DUAL_STACK if headless_selectorless else SINGLE_STACK
    if policy not in POLICIES:
        return [FamilyProblem("spec.ipFamilyPolicy", f"{policy!r} is not one of {', '.join(POLICIES)}")]
    families = list(spec.get("ipFamilies") or [])
    problems = []
    for i, name in enumerate(families):
        if name not in FAMILY_NUMBERS:
            problems.append(FamilyProblem(f"spec.ipFamilies[{i}]", f"{name!r} is not IPv4 or IPv6"))
    if len(families) > 2 or len(set(families)) != len(families):
        problems.append(FamilyProblem("spec.ipFamilies", "at most one of each family"))
    if policy == SINGLE_STACK and len(cluster_ips) == 2:
        problems.append(FamilyProblem("spec.ipFamilyPolicy", "must be 'RequireDualStack' or 'PreferDualStack' "
                                                             "when multiple cluster IPs are specified"))
    if policy == SINGLE_STACK and len(families) == 2:
        problems.append(FamilyProblem("spec.ipFamilyPolicy", "must be 'RequireDualStack' or 'PreferDualStack' "
                                                             "when multiple IP families are specified"))
    for i, value in enumerate(cluster_ips):
        if value == "None":
            break
        family = _family_of(value)
        if family is None:
            problems.append(FamilyProblem(f"spec.clusterIPs[{i}]", f"{value!r} is not an IP address"))
        elif i < len(families):
            if families[i] in FAMILY_NUMBERS and FAMILY_NUMBERS[families[i]] != family:
                problems.append(FamilyProblem(f"spec.clusterIPs[{i}]",
                                              f"{value} is not of family {families[i]} (spec.ipFamilies[{i}])"))
        elif family not in cidrs.families:
            problems.append(FamilyProblem(f"spec.clusterIPs[{i}]", f"IPv{family} is not configured on this cluster"))
        else:
            families.append(FAMILY_NAMES[family])
    if problems:
        return problems
    if headless_selectorless:
        # headless without selector may carry both families even on a single-stack cluster (upstream allows it)
        families = families or [FAMILY_NAMES[cidrs.primary]]
        if len(families) < 2 and policy != SINGLE_STACK:
            families.append(FAMILY_NAMES[10 - FAMILY_NUMBERS[families[0]]])
        spec["ipFamilies"] = families
        return []
    if policy == REQUIRE_DUAL_STACK and len(cidrs.families) < 2:
        problems.append(FamilyProblem("spec.ipFamilyPolicy", "this cluster is not configured for dual-stack services"))
    for i, name in enumerate(families):
        if FAMILY_NUMBERS[name] not in cidrs.families:
            problems.append(FamilyProblem(f"spec.ipFamilies[{i}]", f"{name} is not configured on this cluster"))
    if problems:
        return problems
    families = families or [FAMILY_NAMES[cidrs.primary]]
    if policy != SINGLE_STACK and len(families) == 1 and len(cidrs.families) == 2:
        families.append(FAMILY_NAMES[10 - FAMILY_NUMBERS[families[0]]])
    spec["ipFamilies"] = families
    return []


def _cluster_ips(spec: Mapping[str, Any]) -> list[str]:
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and ips:
        return [str(ip) for ip in ips]
    if spec.get("clusterIP") not in (None, ""):
        return [str(spec["clusterIP"])]
    return []


def free_addresses(cidr: IPv4Network | IPv6Network, used: set[str]) -> Iterator[str]:
    """The addresses of `cidr` a new Service may get, in order, skipping `used` (as text, canonical form)."""
    first = int(cidr.network_address) + FIRST_ALLOCATED_OFFSET
    last = int(cidr.broadcast_address) - (1 if cidr.version == 4 else 0)
    for value in range(first, last + 1):
        text = str(ip_address(value))
        if text not in used:
            yield text


def allocate_cluster_ips(spec: MutableMapping[str, Any], cidrs: ServiceCIDRs,
                         used: set[str]) -> list[FamilyProblem]:
    """Give each family of spec.ipFamilies without a cluster IP the next free one (allocClusterIPs), in place;
    `used` is updated with the addresses given. Families must have been set by `init_ip_families`."""
    if spec.get("type") == "ExternalName":
        return []
    ips = _cluster_ips(spec)
    if ips and ips[0] == "None":
        spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
        return []
    problems = []
    for i, name in enumerate(spec.get("ipFamilies") or []):
        family = FAMILY_NUMBERS[name]
        cidr = cidrs.of(family)
        if i < len(ips):
            if ip_address(ips[i]) not in cidr:
                problems.append(FamilyProblem(f"spec.clusterIPs[{i}]", f"{ips[i]} is not in the {name} service CIDR "
                                                                      f"{cidr}"))
            used.add(str(ip_address(ips[i])))
            continue
        free = next(free_addresses(cidr, used), None)
        if free is None:
            problems.append(FamilyProblem(f"spec.clusterIPs[{i}]", f"the {name} service CIDR {cidr} is full"))
            continue
        used.add(free)
        ips.append(free)
    if ips:
        spec["clusterIPs"] = ips
        spec["clusterIP"] = ips[0]
    return problems


def used_cluster_ips(services: Sequence[Mapping[str, Any]]) -> set[str]:
    """The cluster IPs `services` hold (canonical text), what allocation must skip."""
    used = set()
    for service in services:
        for value in _cluster_ips(service.get("spec") or {}):
            if _family_of(value) is not None:
                used.add(str(ip_address(value)))
    return used
