"""One sync of the nftables datapath: kube-proxy's nftables `syncProxyRules` decisions around the pure parts.

- A **full** sync (the first one, after any failure, when the configuration changed, or when our table vanished; not
  every sync period: kube-proxy's nftables proxier passes its runner an hour, "arbitrary", and resyncs fully only
  when it must, since at 10,000 Services a full transaction takes tens of seconds) lists the per-service chains and
  affinity sets the kernel holds and runs `setupNFTables` and every chain and element
  (`service.nftables.transaction`). The first full sync of a process also deletes and re-adds the base chains, so a
  priority that changed between versions takes (kube-proxy's `flushed`).
- A **partial** sync writes only the chains of the Services that changed and the map and set elements that
  differ from what the last successful sync left (kept in memory, as kube-proxy's nftElementStorage).
- Stale per-service chains are flushed, and deleted by a later sync once stale for a second.
- Everything a sync changes goes in ONE transaction, `nft -f -`: the table changes atomically, or not at all.
- After a successful sync that changed a UDP Service's endpoints, stale UDP conntrack entries go
  (`service.conntrack`, kube-proxy's `CleanStaleEntries`), as in the iptables mode.
- One proxier per IP family (`table ip kube-proxy`, `table ip6 kube-proxy`), as kube-proxy's metaproxier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import structlog

from nodeagent.cluster.model import ObjectRef
from nodeagent.heap import collector_paused
from nodeagent.kernel.conntrack import Conntrack
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Reconciled
from nodeagent.service.datapath import DatapathMode, Gauges
from nodeagent.service.nftables import names as n
from nodeagent.service.nftables.render import RenderCache, Rendered, render
from nodeagent.service.nftables.ruleset import Table
from nodeagent.service.nftables.transaction import KernelState, Plan, plan
from nodeagent.state.tracker import Snapshot

# A sync that changes Services deletes the stale chains only once this many wait (see transaction.py); the
# periodic sync, which changes none, deletes them whatever their number.
STALE_DELETE_LIMIT = 1000

log = structlog.get_logger("nodeagent.service.nftables.proxier")


class NftRunner(Protocol):
    """What the proxier needs of nft (`kernel.nftables.Nft`; the tests give a `ruleset.Table`-backed fake)."""

    @property
    def netns(self) -> str | None:
        """The network namespace the rules go to (None: this one)."""
        ...

    def run(self, transaction: str) -> None:
        """Load the transaction atomically; raise when it is refused."""
        ...

    def list_names(self, kind: str, family: str, table: str) -> set[str]:
        """The names of the chains or sets (`kind`) of the table (empty when it does not exist)."""
        ...

    def chain_exists(self, family: str, table: str, chain: str) -> bool:
        """Whether the chain exists."""
        ...


@dataclass(frozen=True)
class NftablesSyncReport:
    """What one sync did (for logs, metrics and tests); a `service.datapath.SyncReport`."""

    full: bool
    rendered: Rendered
    plan: Plan
    conntrack: Reconciled | None = None
    seconds: float = 0.0

    @property
    def transaction(self) -> str:
        """The transaction this sync ran."""
        return self.plan.text()

    def gauges(self) -> Gauges:
        """Nothing of iptables' or eBPF's to publish: the table's size is in the logs."""
        return Gauges()


def family_name(family: int) -> str:
    """nftables' name of the address family of `family` (4 or 6)."""
    return "ip" if family == 4 else "ip6"


@dataclass
class NftablesProxier:
    """Keeps one family's `kube-proxy` table equal to the snapshots it is given (a `service.datapath.Datapath`)."""

    mode: ClassVar[DatapathMode] = DatapathMode.NFTABLES

    nft: NftRunner
    family: int = 4
    sync_period: float = 30.0  # (kept for the agent's wiring; the nftables proxier never resyncs on a timer)
    clock: Callable[[], float] = time.monotonic
    conntrack: ConntrackReconciler | None = None  # None: the kernel's table in nft.netns
    _need_full: bool = True
    _base_recreated: bool = False
    _config: ProxyConfig | None = None
    _known: KernelState | None = None
    _stale: dict[str, float] = field(default_factory=dict)
    _cache: RenderCache = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conntrack is None:
            self.conntrack = ConntrackReconciler(Conntrack(self.nft.netns))

    def force_full_sync(self) -> None:
        """Make the next sync a full one."""
        self._need_full = True

    def observe_conntrack(self, observer: Callable[[Reconciled], None]) -> None:
        """Call `observer` with every pass of the conntrack reconciler (a `service.datapath.ObservesConntrack`)."""
        assert self.conntrack is not None  # (__post_init__)
        self.conntrack.observers.append(observer)

    def canaries_intact(self) -> bool:
        """Whether our table and its dispatch chain still exist (someone's `nft flush ruleset` removes them)."""
        if self._known is None:
            return True
        return self.nft.chain_exists(family_name(self.family), n.TABLE, n.SERVICES)

    @property
    def known(self) -> Table | None:
        """The table as the last successful sync left it (None before one)."""
        return self._known.table if self._known is not None else None

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef]) -> NftablesSyncReport:
        """Program the table to match `snapshot` (a partial sync rewrites the Services in `changed`); raises on
        failure (and the next sync is then a full one)."""
        if config.family != self.family:
            raise ValueError(f"the IPv{self.family} proxier was given an IPv{config.family} configuration")
        started = self.clock()
        full = self._need_full or self._known is None or config != self._config
        self._need_full = True  # until this sync succeeds
        if config != self._config:
            self._cache.clear()
        with collector_paused():  # a full render allocates ~1M strings that are no garbage (nodeagent.heap)
            rendered = render(snapshot.service_ports, snapshot.endpoints, config, cache=self._cache)
        family = family_name(self.family)
        chains: set[str] = set()
        sets: set[str] = set()
        if full:
            chains = self.nft.list_names("chain", family, n.TABLE)
            sets = self.nft.list_names("set", family, n.TABLE)
        planned = plan(rendered, self._known, full=full, changed=changed,
                       existing_chains=chains, existing_sets=sets, stale=self._stale, now=started,
                       recreate_base=full and not self._base_recreated,
                       delete_stale=not changed or len(self._stale) >= STALE_DELETE_LIMIT)
        try:
            if planned.lines:  # (an idle periodic sync has nothing to write)
                self.nft.run(planned.text())
        except Exception:
            # the stale chains flushed by this transaction were not flushed; the next full sync finds them again
            self._stale.clear()
            self._known = None
            raise
        self._need_full = False
        self._known = planned.commit()
        self._stale = planned.stale
        if full:
            self._base_recreated = True
        self._config = config
        assert self.conntrack is not None  # (__post_init__)
        self.conntrack.family = config.family
        reconciled = self.conntrack.after_sync(snapshot.service_ports, snapshot.endpoints, changed)
        report = NftablesSyncReport(full, rendered, planned, reconciled, self.clock() - started)
        log.info("nftables synced", family=f"IPv{config.family}", full=full, services_changed=len(changed),
                 operations=len(planned.lines), chains_written=planned.written_chains,
                 stale_chains_flushed=len(planned.flushed_chains), stale_chains_deleted=len(planned.deleted_chains),
                 seconds=round(report.seconds, 4))
        return report
