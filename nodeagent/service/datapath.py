"""The seam between the reconcile loop and a datapath: what the loop hands a datapath (a snapshot, the proxy
configuration, the Services changed since the last successful sync) and what it gets back (a sync report).

The mechanisms (`service.iptables.proxier.IptablesProxier`, `service.ebpf.proxier.EbpfProxier`,
`service.nftables.proxier.NftablesProxier`) satisfy
`Datapath`, and their reports satisfy `SyncReport`, so `daemon.agent` drives either without knowing which.
What `/metrics` needs besides: a failed partial iptables restore raises `PartialRestoreError`, and both let the
loop watch their conntrack reconcilers' passes (`ObservesConntrack`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from nodeagent.cluster.model import ObjectRef
from nodeagent.kernel.netfilter import IptablesError
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import Reconciled
from nodeagent.state.tracker import Snapshot


class DatapathMode(StrEnum):
    """The datapath a node runs (kube-proxy's `/proxyMode` answer)."""

    IPTABLES = "iptables"
    EBPF = "ebpf"
    NFTABLES = "nftables"


@dataclass(frozen=True)
class Gauges:
    """How much of ours a datapath holds after a sync, for `/metrics`. A mapping left empty was not measured
    by this sync (a partial iptables sync writes only what changed, so it cannot count the tables)."""

    rules: Mapping[str, int] = field(default_factory=dict)  # iptables table -> rules of ours
    # iptables table -> rules this sync wrote (kube-proxy's sync_proxy_rules_iptables_last; full or partial)
    written: Mapping[str, int] = field(default_factory=dict)
    map_entries: Mapping[str, int] = field(default_factory=dict)  # BPF map -> entries of ours
    # eBPF mode with tc: Service ports whose traffic from outside kube-proxy's iptables rules serve, by what tc
    # lacks for them (a port lacking two things counts under both)
    external_on_iptables: Mapping[str, int] = field(default_factory=dict)


class PartialRestoreError(IptablesError):
    """iptables-restore failed in a partial sync. kube-proxy counts these apart
    (`sync_proxy_rules_iptables_partial_restore_failures_total`, besides the restore failures): the next sync
    falls back to a full one."""


class SyncReport(Protocol):
    """What one sync did, as the loop reads it (each datapath's report carries more, for logs and tests)."""

    @property
    def full(self) -> bool:
        """Whether the sync rewrote everything (else only the changed Services)."""
        ...

    @property
    def seconds(self) -> float:
        """How long the sync took."""
        ...

    def gauges(self) -> Gauges:
        """The sizes to publish after this sync."""
        ...


class Datapath(Protocol):
    """What the reconcile loop needs of a datapath (iptables or eBPF)."""

    @property
    def mode(self) -> DatapathMode:
        """Which datapath this is (names its sync thread and its logs)."""
        ...

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef]) -> SyncReport:
        """Program the node to match `snapshot`; `changed` names the Services changed since the last
        successful sync (a partial sync rewrites only those). Raises on failure; the next sync is then full."""
        ...

    def force_full_sync(self) -> None:
        """Make the next sync a full one."""
        ...

    def canaries_intact(self) -> bool:
        """Whether nobody flushed what this datapath wrote (else the loop forces a full sync)."""
        ...


@runtime_checkable
class ObservesConntrack(Protocol):
    """A datapath whose conntrack reconciler passes can be watched (both proxiers; optional, so a datapath
    without stale flows to reconcile need not say so)."""

    def observe_conntrack(self, observer: Callable[[Reconciled], None]) -> None:
        """Call `observer` with every pass of the datapath's conntrack reconcilers, from now on."""
        ...
