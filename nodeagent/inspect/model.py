"""The report `nodeagent inspect` prints: plain frozen dataclasses, JSON-able through `as_document`. Pure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RuleLine:
    """One rule of ours as installed (iptables-save's spelling) with its packet counter."""

    table: str
    rule: str  # "-A CHAIN spec"
    packets: int | None = None


@dataclass(frozen=True)
class ProgramLine:
    """One eBPF program of ours found attached."""

    name: str
    prog_id: int
    where: str


@dataclass(frozen=True)
class Capture:
    """The pod's capture as read from the kernel."""

    mechanism: str  # iptables | ebpf | none
    backend: str  # nft | legacy | ebpf | ""
    status: str  # absent | installed | drifted | stale | netns-missing
    netns: str
    rules: tuple[RuleLine, ...] = ()
    programs: tuple[ProgramLine, ...] = ()
    map_entries: tuple[str, ...] = ()
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Tunnel:
    """What the node tunnel says about the pod (its admin config dump)."""

    reachable: bool
    error: str = ""
    served: bool = False
    state: str = ""  # the tunnel's per-pod state (served, netns-missing: …, error: …)
    listeners: tuple[int, ...] = ()
    certificate_subject: str = ""
    certificate_serial: str = ""
    certificate_expiry: str = ""
    pools: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One candidate of a translation, with its chance of being chosen for a new connection."""

    address: str
    probability: float
    via: str = ""  # the KUBE-SEP chain, or the map it sits in
    weight: int = 1


@dataclass(frozen=True)
class ServicePath:
    """How a new connection to one Service frontend is translated on the pod's node."""

    service: str  # namespace/name:port
    frontend: str  # VIP:port/PROTO
    kind: str  # ClusterIP | NodePort | ExternalIP
    via: str  # the chain (KUBE-SVC-…) or map entry it takes
    endpoints: tuple[Endpoint, ...]
    verdict: str  # translated | reject (no endpoints) | captured (the tunnel balances)
    live: str = "unknown"  # present | missing | unknown (not read)


@dataclass(frozen=True)
class PolicyLine:
    """One policy that applies to the pod, and every part of it the tunnel cannot enforce as written."""

    kind: str  # AuthorizationPolicy | PeerAuthentication
    policy: str  # namespace/name, or "" for the mesh default
    effect: str  # ALLOW | DENY | STRICT | PERMISSIVE | ...
    unenforceable: tuple[str, ...] = ()  # "field: reason: what the tunnel does instead"


@dataclass(frozen=True)
class Drift:
    """A difference between desired and live state."""

    where: str  # capture | agent | tunnel | service
    change: str  # missing | unexpected | state
    detail: str


@dataclass(frozen=True)
class PodReport:
    """Everything `inspect --pod` shows."""

    pod: str
    node: str
    ips: tuple[str, ...]
    identity: str
    enrolled: bool
    enrollment_reason: str
    source: str  # agent | kernel (the agent did not answer)
    source_note: str
    datapath_mode: str
    datapath_reason: str
    mesh_state: str
    capture: Capture
    tunnel: Tunnel
    services: tuple[ServicePath, ...] = ()
    drift: tuple[Drift, ...] = ()
    policies: tuple[PolicyLine, ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def drifted(self) -> bool:
        """Whether any difference was found."""
        return bool(self.drift)


def as_document(report: PodReport) -> dict[str, Any]:
    """The report as JSON-able data (the shape `schema.json` documents)."""
    document = dataclasses.asdict(report)
    document["drifted"] = report.drifted
    return document
