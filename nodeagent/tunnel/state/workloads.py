"""The tunnel's view of the cluster's pods: who is who (IP -> identity, node, enrollment), and which pods
this node's tunnel serves. Pure: built from a snapshot, so the tunnel, `inspect` and tests agree.

As ztunnel's workload store (fed by WDS in Istio; by our snapshot or the agent's stream here), keyed by
pod IP because a captured connection knows only addresses. A dual-stack pod is one workload under each of its
addresses (ztunnel's `workload_ips`); its `ip`, by which the tunnel serves it, is its IPv4 address when it has
one (what the IPv4-only paths, such as the eBPF capture's per-pod config, key by), else its first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from nodeagent.ca.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from nodeagent.cluster.enrollment import Enrollment, enrollment
from nodeagent.cluster.model import Kind, ObjectRef, PodKey
from nodeagent.state.tracker import Snapshot


@dataclass(frozen=True)
class Workload:
    """A pod as the tunnel needs it."""

    ip: str
    identity: SpiffeId
    node: str
    netns: str = ""  # the pod's network namespace path, for pods this node's tunnel serves
    enrolled: bool = True
    name: str = ""  # namespace/name, for logs and metrics
    labels: Mapping[str, str] = field(default_factory=dict)
    transparent: bool = False  # connect to the app from the client's address (the capture routes replies back)
    ips: tuple[str, ...] = ()  # every address of the pod, `ip` among them (empty: `ip` alone)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of the pod (IPv4 and IPv6 of a dual-stack pod), `ip` first."""
        return (self.ip, *(a for a in self.ips if a != self.ip))

    def address_for(self, host: str) -> str:
        """The pod's own address equal to `host` (compared as addresses, so any IPv6 spelling matches), else its
        `ip`: what a tunnel serving the pod dials, so it connects only ever to the pod itself and in the family
        the connection was made in."""
        try:
            wanted = ipaddress.ip_address(host)
        except ValueError:
            return self.ip
        return next((a for a in self.addresses if ipaddress.ip_address(a) == wanted), self.ip)

    @property
    def namespace(self) -> str:
        """The pod's namespace (from its identity when the name is not known)."""
        return self.name.split("/", 1)[0] if self.name else self.identity.namespace


def with_known_addresses(served: Workload, current: Workload | None) -> Workload:
    """`served` (a pod as the tunnel was told to serve it: the agent's assignment names one address) with every
    address `current` (the same pod in the current table) holds, so a dual-stack pod is served at its IPv6
    address too; `served` unchanged when the table does not know the pod under that name."""
    if current is None or current.name != served.name or set(current.addresses) <= set(served.addresses):
        return served
    return replace(served, ips=tuple(dict.fromkeys((*served.addresses, *current.addresses))))


@dataclass(frozen=True)
class WorkloadTable:
    """Every pod with an IP, by IP; plus the enrolled pods of `node` with why each is (not) served."""

    node: str
    by_ip: Mapping[str, Workload]
    local: Mapping[str, Workload]  # enrolled pods scheduled on `node`, by IP (netns still to be found)
    decisions: Mapping[str, Enrollment]  # namespace/name -> enrollment, for this node's pods
    identities: frozenset[SpiffeId] = frozenset()  # every identity some known pod holds
    local_pods: Mapping[PodKey, Workload] = field(default_factory=dict)  # `local` by pod, for the mesh reconciler

    def lookup(self, ip: str) -> Workload | None:
        """The workload holding `ip`, if it is a pod the table knows."""
        return self.by_ip.get(ip)

    def holds(self, identity: SpiffeId) -> bool:
        """Whether some pod the table knows runs as `identity` (a certificate of an identity no pod holds
        any more, its pods deleted, is refused: it can only be a leftover or a stolen one)."""
        return identity in self.identities


def workload_table(snapshot: Snapshot, node: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> WorkloadTable:
    """Build the table from a snapshot (which must hold every node's pods for cross-node identities)."""
    by_ip: dict[str, Workload] = {}
    local: dict[str, Workload] = {}
    local_pods: dict[PodKey, Workload] = {}
    decisions: dict[str, Enrollment] = {}
    identities: set[SpiffeId] = set()
    for pod in snapshot.pods.values():
        namespace = snapshot.namespaces.get(ObjectRef(Kind.NAMESPACE, "", pod.ref.namespace))
        decision = enrollment(pod, namespace)
        if pod.node_name == node:
            decisions[pod.ref.key] = decision
        if pod.host_network:
            continue
        identity = SpiffeId(trust_domain, pod.ref.namespace, pod.service_account)
        if pod.phase not in ("Succeeded", "Failed"):
            # Held from the pod's creation, not from when the kubelet publishes its IP: a pod enrolled at
            # sandbox creation (nodeagent-cni) connects before the API server has its address.
            identities.add(identity)
        if not pod.ips:
            continue
        ips = tuple(str(ip) for ip in pod.ips)
        primary = next((str(ip) for ip in pod.ips if ip.version == 4), ips[0])
        workload = Workload(primary, identity, pod.node_name, enrolled=decision.enrolled, name=pod.ref.key,
                            labels=pod.labels, ips=ips)
        for ip in ips:
            by_ip[ip] = workload
        if decision.enrolled and pod.node_name == node:
            local[workload.ip] = workload
            local_pods[PodKey.of(pod.ref)] = workload
    return WorkloadTable(node, by_ip, local, decisions, frozenset(identities), local_pods)
