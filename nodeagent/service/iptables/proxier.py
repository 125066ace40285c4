"""One sync of the iptables datapath: kube-proxy's `syncProxyRules` decisions around the pure renderer.

- A **full sync** (at start, every `sync_period`, after any failure, when the node's facts or the
  flags change, or when a canary chain vanished because someone flushed the tables) ensures the jump
  rules and rewrites every chain. A **partial sync** rewrites only the per-service chains of the
  Services that changed since the last successful sync, and the top-level chains whose rules changed
  (kube-proxy rewrites those every time; the kernel ends up the same, the restore is 10,000 rules
  smaller). Only changed Service ports are re-rendered (a cache keyed on the snapshot's shared values).
- Stale per-service chains are deleted in the same restore (`-X`), found with one iptables-save.
- After a successful sync that changed a UDP Service's endpoints (and after the first one, which finds what
  changed while the agent was down), UDP conntrack entries that point at no serving endpoint are deleted, found
  in the kernel's table, so a UDP client's next datagram goes to a live backend (kube-proxy's
  `CleanStaleEntries`, `service.conntrack`).
- One `iptables-restore --noflush` per sync: the tables change atomically, or not at all.
- One proxier per IP family, as kube-proxy runs them: the IPv6 one writes with ip6tables-restore
  (`Iptables(ipv6=True)`), from a configuration of its family, and reconciles IPv6 conntrack entries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from nodeagent.cluster.model import ObjectRef
from nodeagent.heap import collector_paused
from nodeagent.kernel.conntrack import Conntrack
from nodeagent.kernel.netfilter import Iptables, IptablesError
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Reconciled
from nodeagent.service.datapath import DatapathMode, Gauges, PartialRestoreError
from nodeagent.service.iptables import names as n
from nodeagent.service.iptables.jumps import CANARY_TABLES, JUMPS, KUBELET_JUMPS
from nodeagent.service.iptables.render import RenderCache, Rendered, render
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.service.iptables.proxier")


@dataclass(frozen=True)
class IptablesSyncReport:
    """What one sync did (for logs, metrics and tests); a `service.datapath.SyncReport`."""

    full: bool
    rendered: Rendered
    restore_input: str
    deleted_chains: list[str]
    conntrack: Reconciled | None = None  # None: no UDP conntrack cleanup was required
    seconds: float = 0.0

    def gauges(self) -> Gauges:
        """The rules this sync wrote per table (kube-proxy's sync_proxy_rules_iptables_last), and after a full
        sync the rules of ours per table (sync_proxy_rules_iptables_total): a partial sync writes only what
        changed, so it cannot count the tables."""
        # counted in place: joining the nat table's text again only to count its lines took ~25 MB. `rendered`
        # holds what was restored (a partial sync's unchanged chains were dropped from it), and kube-proxy
        # counts the same: its rule lines without the `-X` of stale chains.
        written = {"filter": sum(1 for r in self.rendered.filter.rules if r.startswith("-A ")),
                   "nat": sum(1 for r in self.rendered.nat.rules if r.startswith("-A "))}
        return Gauges(rules=written if self.full else {}, written=written)


@dataclass
class IptablesProxier:
    """Keeps one node's tables equal to the snapshots it is given (a `service.datapath.Datapath`)."""

    mode: ClassVar[DatapathMode] = DatapathMode.IPTABLES

    ipt: Iptables
    sync_period: float = 30.0
    clock: Callable[[], float] = time.monotonic
    conntrack: ConntrackReconciler | None = None  # None: the kernel's table in ipt.netns
    # iptables-nft: a full sync of more Service ports than this goes in batches (see Rendered.in_batches)
    nft_batch_threshold: int = 500
    nft_ports_per_batch: int = 50
    _need_full: bool = True
    _last_full: float = float("-inf")
    _config: ProxyConfig | None = None
    _active: set[str] = field(default_factory=set)
    _top_level: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    _cache: RenderCache = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conntrack is None:
            self.conntrack = ConntrackReconciler(Conntrack(self.ipt.netns))

    def force_full_sync(self) -> None:
        """Make the next sync a full one."""
        self._need_full = True

    def observe_conntrack(self, observer: Callable[[Reconciled], None]) -> None:
        """Call `observer` with every pass of the conntrack reconciler (a `service.datapath.ObservesConntrack`)."""
        assert self.conntrack is not None  # (__post_init__)
        self.conntrack.observers.append(observer)

    def canaries_intact(self) -> bool:
        """Whether our canary chains still exist (a flush by someone else removes them)."""
        return all(self.ipt.chain_exists(table, n.KUBE_PROXY_CANARY) for table in CANARY_TABLES)

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef]) -> IptablesSyncReport:
        """Program the node to match `snapshot` (a partial sync rewrites the Services in `changed`); raises on
        failure (and the next sync is then a full one)."""
        if config.family != self.ipt.family:  # a wiring error: IPv6 rules fed to iptables-restore, or the reverse
            raise ValueError(f"the IPv{self.ipt.family} proxier was given an IPv{config.family} configuration")
        service_ports, endpoints = snapshot.service_ports, snapshot.endpoints
        started = self.clock()
        full = (self._need_full or config != self._config or started - self._last_full >= self.sync_period)
        self._need_full = True  # until this sync succeeds
        # A full sync asks the kernel which chains exist (catching leftovers of anyone, any version); a
        # partial one knows them from the previous sync, which saves an iptables-save of the whole nat
        # table per change (0.3 s at 1,000 Services on iptables-nft). The kernel work of a full sync
        # (jump rules, that save) waits on iptables processes, so it runs beside the render.
        kernel_side = _Background(self._prepare_full_sync) if full else None
        if config != self._config:
            self._cache.clear()
        with collector_paused():  # a full render allocates ~1M strings that are no garbage (nodeagent.heap)
            rendered = render(service_ports, endpoints, config, partial=None if full else changed,
                              cache=self._cache)
        top_level = rendered.top_level()
        if not full:
            rendered.drop_unchanged(self._top_level)
        existing = kernel_side.result() if kernel_side is not None else self._active
        deleted = rendered.delete_stale(existing)
        if full and self.ipt.backend == "nft" and len(rendered.port_chains) > self.nft_batch_threshold:
            batches, text = rendered.in_batches(self.nft_ports_per_batch)
            for batch in batches:
                self.ipt.restore(batch)
        else:
            text = rendered.text()
        try:
            self.ipt.restore(text)
        except IptablesError as exc:
            if full:
                raise
            # kube-proxy counts a failed partial sync apart (its partial restore failures) before the full one
            raise PartialRestoreError(str(exc)) from exc
        self._need_full = False
        self._active = set(rendered.active_nat_chains)
        self._top_level = top_level
        if full:
            self._last_full = started
        self._config = config
        assert self.conntrack is not None  # (__post_init__)
        self.conntrack.family = config.family
        reconciled = self.conntrack.after_sync(service_ports, endpoints, changed)
        report = IptablesSyncReport(full, rendered, text, deleted, reconciled, self.clock() - started)
        log.info("iptables synced", family=f"IPv{config.family}", full=full, services_changed=len(changed),
                 nat_rules=len(rendered.nat.rules),
                 filter_rules=len(rendered.filter.rules), stale_chains_deleted=len(deleted),
                 seconds=round(report.seconds, 4))
        return report

    def _prepare_full_sync(self) -> set[str]:
        self._ensure_hooks()
        return self.ipt.chain_names("nat")

    def _ensure_hooks(self) -> None:
        for table in CANARY_TABLES:
            self.ipt.ensure_chain(table, n.KUBE_PROXY_CANARY)
        self.ipt.ensure_chain("nat", n.KUBE_MARK_MASQ)  # batched syncs jump to it before it is restored
        for jump in (*JUMPS, *KUBELET_JUMPS):
            self.ipt.ensure_chain(jump.table, jump.target)
            self.ipt.ensure_rule_first(jump.table, jump.source, jump.rule)


class _Background:
    """Runs `work` on a thread; `result()` joins and returns its value or raises its exception."""

    def __init__(self, work: Callable[[], set[str]]) -> None:
        self._value: set[str] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="iptables-prepare", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], set[str]]) -> None:
        try:
            self._value = work()
        except BaseException as exc:  # handed to the caller in result()
            self._error = exc

    def result(self) -> set[str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

