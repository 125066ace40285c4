"""The tunnel's view of the cluster's pods: who is who (IP -> identity, node, enrollment), and which pods
this node's tunnel serves. Pure: built from a snapshot, so the tunnel, `inspect` and tests agree.

As ztunnel's workload store (fed by WDS in Istio; by our snapshot or the agent's stream here), keyed by
pod IP because a captured connection knows only addresses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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

    @property
    def namespace(self) -> str:
        """The pod's namespace (from its identity when the name is not known)."""
        return self.name.split("/", 1)[0] if self.name else self.identity.namespace


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
    for pod in snapshot.pods.values():
        namespace = snapshot.namespaces.get(ObjectRef(Kind.NAMESPACE, "", pod.ref.namespace))
        decision = enrollment(pod, namespace)
        if pod.node_name == node:
            decisions[pod.ref.key] = decision
        if pod.host_network or not pod.ips:
            continue
        identity = SpiffeId(trust_domain, pod.ref.namespace, pod.service_account)
        for ip in pod.ips:
            if ip.version != 4:
                continue  # the tunnel speaks IPv4 for now, as the rest of the datapath
            workload = Workload(str(ip), identity, pod.node_name, enrolled=decision.enrolled, name=pod.ref.key,
                                labels=pod.labels)
            by_ip[workload.ip] = workload
            if decision.enrolled and pod.node_name == node:
                local[workload.ip] = workload
                local_pods[PodKey.of(pod.ref)] = workload
    return WorkloadTable(node, by_ip, local, decisions, frozenset(w.identity for w in by_ip.values()), local_pods)
