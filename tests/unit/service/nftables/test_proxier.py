# ruff: noqa: E501
"""The nftables proxier against kube-proxy's partial-sync tests, on a table that runs the transactions.

`FakeNft` applies each transaction to a `ruleset.Table`, as kube-proxy's tests run theirs on knftables' Fake;
the expected tables are kube-proxy's (pkg/proxy/nftables/proxier_test.go TestSyncProxyRulesRepeated and
TestSyncProxyRulesStartup), compared after kube-proxy's sort. Operation counts are kube-proxy's but for one
difference: stale chains are deleted at the head of the sync's single transaction, not in one of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from textwrap import dedent
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter
from nodeagent.service.datapath import Datapath, DatapathMode
from nodeagent.service.nftables import proxier as proxier_module
from nodeagent.service.nftables.proxier import NftablesProxier
from nodeagent.service.nftables.ruleset import Table, TransactionError, sort_transaction
from tests.support.services import ep, service, slice_, snapshot_of
from tests.unit.service.nftables.test_render import BASE_RULES, FAKE_PROXIER


@dataclass
class FakeNft:
    """knftables' Fake, for our commands: the table, the operations of the last transaction, every transaction."""

    table: Table = field(default_factory=lambda: Table("ip", "kube-proxy", exists=False))
    netns: str | None = None
    last_operations: int = 0
    transactions: list[str] = field(default_factory=list)
    fail_next: bool = False

    def run(self, transaction: str) -> None:
        self.transactions.append(transaction)
        if self.fail_next:
            self.fail_next = False
            raise TransactionError("refused")
        self.last_operations = self.table.apply(transaction)

    def chain_exists(self, family: str, table: str, chain: str) -> bool:
        return self.table.exists and chain in self.table.chains

    def list_names(self, kind: str, family: str, table: str) -> set[str]:
        if not self.table.exists:
            return set()
        if kind == "chain":
            return set(self.table.chains)
        return {name for name, c in self.table.containers.items() if c.kind == "set"}


class NoConntrack:
    def flows(self, family: int, protocol: str = "udp") -> list[Any]:
        return []

    def delete(self, family: int, match: Filter) -> int:
        return 0


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def proxier(nft: FakeNft, clock: Clock) -> NftablesProxier:
    return NftablesProxier(nft, clock=clock, conntrack=ConntrackReconciler(NoConntrack()))


def svc(ns: str, name: str) -> ObjectRef:
    return ObjectRef(Kind.SERVICE, ns, name)


def assert_table(nft: FakeNft, expected: str) -> None:
    assert sort_transaction(nft.table.dump()) == sort_transaction(BASE_RULES + dedent(expected))


SVC1 = service("ns1", "svc1", "172.30.0.41")
SVC2 = service("ns2", "svc2", "172.30.0.42", port_name="p8080", port=8080)
SVC3 = service("ns3", "svc3", "172.30.0.43")
SVC4 = service("ns4", "svc4", "172.30.0.44")
EPS1 = slice_("ns1", "svc1", ep("10.0.1.1"))
EPS2 = slice_("ns2", "svc2", ep("10.0.2.1"), port=8080, port_name="p8080")
EPS3 = slice_("ns3", "svc3", ep("10.0.3.1"))
EPS3_UPDATE = slice_("ns3", "svc3", ep("10.0.3.2"))
EPS3_UPDATE2 = slice_("ns3", "svc3", ep("10.0.3.2"), ep("10.0.3.3"))
EPS3_EMPTY = slice_("ns3", "svc3")
EPS4 = slice_("ns4", "svc4", ep("10.0.4.1"))

SVC1_RULES = """
    add element ip kube-proxy cluster-ips { 172.30.0.41 }
    add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
    add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
    add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 }
    add chain ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80
    add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
"""
SVC2_RULES = """
    add element ip kube-proxy cluster-ips { 172.30.0.42 }
    add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 8080 : goto service-MHHHYRWA-ns2/svc2/tcp/p8080 }
    add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080
    add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 numgen random mod 1 vmap { 0 : goto endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 }
    add chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080
    add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 ip saddr 10.0.2.1 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 meta l4proto tcp dnat to 10.0.2.1:8080
"""
SVC3_RULES = """
    add element ip kube-proxy cluster-ips { 172.30.0.43 }
    add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
    add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
    add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 }
    add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80
    add rule ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 ip saddr 10.0.3.1 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 meta l4proto tcp dnat to 10.0.3.1:80
"""
SVC3_TWO_ENDPOINTS = """
    add element ip kube-proxy cluster-ips { 172.30.0.43 }
    add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
    add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
    add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 , 1 : goto endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 }
    add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80
    add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 ip saddr 10.0.3.2 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 meta l4proto tcp dnat to 10.0.3.2:80
    add chain ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80
    add rule ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 ip saddr 10.0.3.3 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 meta l4proto tcp dnat to 10.0.3.3:80
"""
SVC4_RULES = """
    add element ip kube-proxy cluster-ips { 172.30.0.44 }
    add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }
    add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
    add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 }
    add chain ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80
    add rule ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 ip saddr 10.0.4.1 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 meta l4proto tcp dnat to 10.0.4.1:80
"""


def test_sync_proxy_rules_repeated() -> None:
    """TestSyncProxyRulesRepeated: partial syncs write only what changed; stale chains are flushed, then deleted
    once a second old by a sync that changes no Service."""
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)

    def sync(*objects: dict[str, Any], changed: set[ObjectRef] | None = None) -> None:
        p.sync(snapshot_of(*objects), FAKE_PROXIER, changed or set())

    sync(SVC1, SVC2, EPS1, EPS2)
    assert_table(nft, SVC1_RULES + SVC2_RULES)

    # add a Service and its endpoints: 2 elements, add+flush 2 chains with 2 rules each
    sync(SVC1, SVC2, SVC3, EPS1, EPS2, EPS3, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC2_RULES + SVC3_RULES)
    assert nft.last_operations == 10
    # sent to nft as chain blocks (no `add rule`: nft would fetch every chain of the table before it)
    assert "add rule" not in nft.transactions[-1]
    assert "add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 {\n" in nft.transactions[-1]

    # delete a Service: its chains are flushed, not deleted yet; 2 element deletions, 2 flushes
    sync(SVC1, SVC3, EPS1, EPS3, changed={svc("ns2", "svc2")})
    assert_table(nft, SVC1_RULES + SVC3_RULES + """
        add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080
        add chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080
    """)
    assert nft.last_operations == 4

    # a second later they go (kube-proxy: in a transaction of their own; here the sync's, 2 deletions)
    clock.now += 2
    sync(SVC1, SVC3, EPS1, EPS3)
    assert_table(nft, SVC1_RULES + SVC3_RULES)
    assert nft.last_operations == 2

    # add a Service without endpoints, then its endpoints
    sync(SVC1, SVC3, SVC4, EPS1, EPS3, changed={svc("ns4", "svc4")})
    assert_table(nft, SVC1_RULES + SVC3_RULES + """
        add element ip kube-proxy cluster-ips { 172.30.0.44 }
        add element ip kube-proxy no-endpoint-services { 172.30.0.44 . tcp . 80 comment "ns4/svc4:p80" : goto reject-chain }
    """)
    assert nft.last_operations == 2
    sync(SVC1, SVC3, SVC4, EPS1, EPS3, EPS4, changed={svc("ns4", "svc4")})
    assert_table(nft, SVC1_RULES + SVC3_RULES + SVC4_RULES)
    assert nft.last_operations == 10

    # change an endpoint: the old endpoint chain is flushed, not deleted yet
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE, EPS4, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC4_RULES + """
        add element ip kube-proxy cluster-ips { 172.30.0.43 }
        add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
        add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 }
        add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80
        add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80
        add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 ip saddr 10.0.3.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 meta l4proto tcp dnat to 10.0.3.2:80
    """)
    assert nft.last_operations == 9

    # add an endpoint once the old chain is a second stale: 3 chains rewritten; kube-proxy would delete the
    # stale chain now, here a sync that changes Services leaves it (nft fetches every chain for a deletion)...
    clock.now += 2
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE2, EPS4, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS + SVC4_RULES + """
        add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80
    """)
    assert nft.last_operations == 12
    assert "delete" not in nft.transactions[-1]
    # ... and the next sync that changes none (the periodic one) deletes it
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE2, EPS4)
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS + SVC4_RULES)
    assert nft.transactions[-1] == "delete chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80\n"

    # empty a Service's endpoints: 2 elements, 3 chains flushed and now stale
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_EMPTY, EPS4, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC4_RULES + """
        add element ip kube-proxy cluster-ips { 172.30.0.43 }
        add element ip kube-proxy no-endpoint-services { 172.30.0.43 . tcp . 80 comment "ns3/svc3:p80" : goto reject-chain }
        add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
        add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80
        add chain ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80
    """)
    assert nft.last_operations == 5
    assert set(p._stale) == {"service-4AT6LBPK-ns3/svc3/tcp/p80", "endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80",
                             "endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80"}

    # restore them at once: the chains are refilled and no longer stale
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE2, EPS4, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS + SVC4_RULES)
    assert nft.last_operations == 14
    assert not p._stale

    # empty and restore after the chains aged: deleted, then made again in the same transaction
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_EMPTY, EPS4, changed={svc("ns3", "svc3")})
    clock.now += 2
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE2, EPS4, changed={svc("ns3", "svc3")})
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS + SVC4_RULES)

    # nothing changed: nothing written, not even an empty transaction; hours later still no full resync
    clock.now += 7200
    sync(SVC1, SVC3, SVC4, EPS1, EPS3_UPDATE2, EPS4)
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS + SVC4_RULES)
    assert len(nft.transactions) == 13  # one transaction per sync that had something to write


def test_a_changing_sync_deletes_stale_chains_once_many_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferring deletions to the periodic sync is bounded: at the limit a sync that changes Services deletes."""
    monkeypatch.setattr(proxier_module, "STALE_DELETE_LIMIT", 3)
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, SVC3, EPS1, EPS3), FAKE_PROXIER, set())
    p.sync(snapshot_of(SVC1, SVC3, EPS1, EPS3_UPDATE), FAKE_PROXIER, {svc("ns3", "svc3")})  # 1 stale chain
    clock.now += 2
    p.sync(snapshot_of(SVC1, SVC3, EPS1, EPS3_EMPTY), FAKE_PROXIER, {svc("ns3", "svc3")})  # 3 stale, 1 aged
    assert "delete chain" not in nft.transactions[-1] and len(p._stale) == 3
    clock.now += 2
    p.sync(snapshot_of(SVC1, SVC3, EPS1, EPS3_UPDATE2), FAKE_PROXIER, {svc("ns3", "svc3")})
    assert "delete chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80\n" in nft.transactions[-1]
    assert_table(nft, SVC1_RULES + SVC3_TWO_ENDPOINTS)


def test_sync_proxy_rules_startup() -> None:
    """TestSyncProxyRulesStartup: a new proxier finds part of the table; one transaction makes it whole."""
    nft, clock = FakeNft(), Clock()
    proxier(nft, clock).sync(snapshot_of(), FAKE_PROXIER, set())
    setup_ops = nft.last_operations
    nft = FakeNft()
    nft.table.apply(BASE_RULES + SVC1_RULES + SVC2_RULES)
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, SVC2, SVC3, slice_("ns1", "svc1", ep("10.0.1.1"), ep("10.0.1.2")), EPS2),
           FAKE_PROXIER, set())
    assert_table(nft, SVC2_RULES + """
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy cluster-ips { 172.30.0.43 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy no-endpoint-services { 172.30.0.43 . tcp . 80 comment "ns3/svc3:p80" : goto reject-chain }
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 , 1 : goto endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 }
        add chain ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80
        add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
        add chain ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80
        add rule ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 ip saddr 10.0.1.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 meta l4proto tcp dnat to 10.0.1.2:80
    """)
    assert nft.last_operations > setup_ops


def test_first_full_sync_recreates_base_chains_once() -> None:
    """kube-proxy's `flushed`: the first sync of a process deletes and re-adds the base chains (a changed
    priority then takes); later full syncs only flush them."""
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, set())
    assert "delete chain ip kube-proxy filter-input\n" in nft.transactions[-1]
    p.force_full_sync()
    p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, set())
    assert "delete chain ip kube-proxy filter-input\n" not in nft.transactions[-1]
    assert "flush chain ip kube-proxy filter-input\n" in nft.transactions[-1]


def test_failed_sync_makes_the_next_one_full() -> None:
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, set())
    nft.fail_next = True
    with pytest.raises(TransactionError):
        p.sync(snapshot_of(SVC1, SVC2, EPS1, EPS2), FAKE_PROXIER, {svc("ns2", "svc2")})
    report = p.sync(snapshot_of(SVC1, SVC2, EPS1, EPS2), FAKE_PROXIER, set())
    assert report.full
    assert_table(nft, SVC1_RULES + SVC2_RULES)


def test_partial_sync_of_a_changed_service_only() -> None:
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, SVC2, EPS1, EPS2), FAKE_PROXIER, set())
    report = p.sync(snapshot_of(SVC1, SVC2, EPS1, slice_("ns2", "svc2", ep("10.0.2.9"), port=8080,
                                                               port_name="p8080")),
                    FAKE_PROXIER, {svc("ns2", "svc2")})
    assert not report.full
    assert "ns1/svc1" not in report.transaction


def test_affinity_sets_follow_their_endpoints() -> None:
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    sticky = service("ns1", "svc1", "172.30.0.41", sessionAffinity="ClientIP",
                     sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10}})
    p.sync(snapshot_of(sticky, EPS1), FAKE_PROXIER, set())
    sets = {n for n, c in nft.table.containers.items() if n.startswith("affinity-")}
    assert sets == {"affinity-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80"}
    p.sync(snapshot_of(sticky, slice_("ns1", "svc1", ep("10.0.1.2"))), FAKE_PROXIER, {svc("ns1", "svc1")})
    assert {n for n in nft.table.containers if n.startswith("affinity-")} == {
        "affinity-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80"}


def test_a_flushed_ruleset_is_noticed() -> None:
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    assert p.canaries_intact()  # nothing synced yet: nothing to miss
    p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, set())
    assert p.canaries_intact()
    nft.table.apply("delete table ip kube-proxy")
    assert not p.canaries_intact()


def test_satisfies_datapath() -> None:
    p: Datapath = proxier(FakeNft(), Clock())
    assert p.mode is DatapathMode.NFTABLES


def test_ipv6_proxier_refuses_an_ipv4_configuration() -> None:
    p = NftablesProxier(FakeNft(), family=6, conntrack=ConntrackReconciler(NoConntrack()))
    with pytest.raises(ValueError, match="IPv6 proxier"):
        p.sync(snapshot_of(), FAKE_PROXIER, set())


def test_config_change_is_a_full_sync() -> None:
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, set())
    other = ProxyConfig(**{**FAKE_PROXIER.__dict__, "masquerade_all": True})
    assert p.sync(snapshot_of(SVC1, EPS1), other, set()).full
    assert "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 jump mark-for-masquerade" \
        in nft.table.dump().splitlines()


def test_a_cluster_ip_shared_by_two_ports_stays_while_one_port_remains() -> None:
    """cluster-ips holds one element per Service: a partial sync that drops one of two ports keeps it."""
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    two = service("ns1", "svc1", "172.30.0.41")
    two["spec"]["ports"].append({"name": "p81", "port": 81, "protocol": "TCP", "targetPort": 81})
    p.sync(snapshot_of(two, EPS1), FAKE_PROXIER, set())
    assert "add element ip kube-proxy cluster-ips { 172.30.0.41 }" in nft.table.dump().splitlines()
    report = p.sync(snapshot_of(SVC1, EPS1), FAKE_PROXIER, {svc("ns1", "svc1")})
    assert not report.full
    assert "add element ip kube-proxy cluster-ips { 172.30.0.41 }" in nft.table.dump().splitlines()
    assert 'no-endpoint-services { 172.30.0.41 . tcp . 81 comment "ns1/svc1:p81" : goto reject-chain }' not in \
        nft.table.dump()
    assert sort_transaction(nft.table.dump()) == sort_transaction(p.known.dump() if p.known else "")


def test_partial_syncs_keep_the_table_equal_to_a_full_render() -> None:
    """Random edits, each followed by a partial sync: the table always equals the full render of the cluster
    (but for stale chains, empty until deleted), and the proxier's idea of the kernel equals the kernel."""
    import random

    from nodeagent.service.nftables.render import render

    rng = random.Random(7)
    nft, clock = FakeNft(), Clock()
    p = proxier(nft, clock)
    services: dict[str, dict[str, Any]] = {}
    slices: dict[str, dict[str, Any]] = {}

    def make_service(i: int) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        if kind != "ClusterIP" and rng.random() < 0.5:
            spec["externalTrafficPolicy"] = "Local"
        if rng.random() < 0.3:
            spec.update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
        if kind == "LoadBalancer":
            spec["status"] = {"loadBalancer": {"ingress": [{"ip": f"5.6.7.{i}"}]}}
            if rng.random() < 0.5:
                spec["loadBalancerSourceRanges"] = ["203.0.113.0/25"]
        raw = service("ns", f"s{i}", f"172.30.0.{i}", type_=kind,
                      node_port=30000 + i if kind != "ClusterIP" else None, **spec)
        if rng.random() < 0.3:
            raw["spec"]["ports"].append({"name": "p81", "port": 81, "protocol": "TCP", "targetPort": 81})
        return raw

    def make_slice(i: int) -> dict[str, Any]:
        count = rng.randrange(0, 4)
        return slice_("ns", f"s{i}", *(ep(f"10.0.{i}.{rng.randrange(1, 6)}", node=rng.choice(["test-node", "n2"]))
                                       for _ in range(count)))

    for step in range(40):
        i = rng.randrange(1, 9)
        action = rng.random()
        if action < 0.4 or f"s{i}" not in services:
            services[f"s{i}"] = make_service(i)
        elif action < 0.8:
            slices[f"s{i}"] = make_slice(i)
        else:
            services.pop(f"s{i}", None)
            slices.pop(f"s{i}", None)
        for j in list(slices):  # dedupe endpoint addresses within a slice (the decoder keeps the last)
            seen = {}
            for e in slices[j]["endpoints"]:
                seen[e["addresses"][0]] = e
            slices[j]["endpoints"] = list(seen.values())
        snapshot = snapshot_of(*services.values(), *slices.values())
        clock.now += rng.choice([0.1, 0.5, 2.0])
        # every other sync without the hint: the plan must find the changed ports by itself
        report = p.sync(snapshot, FAKE_PROXIER, {svc("ns", f"s{i}")} if step % 2 else set())
        assert report.full == (step == 0)
        expected = render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER).table
        live = nft.table.copy()
        for name in p._stale:
            assert not live.chains[name].rules
            del live.chains[name]
        assert sort_transaction(live.dump()) == sort_transaction(expected.dump()), step
        assert p.known is not None and sort_transaction(p.known.dump()) == sort_transaction(nft.table.dump())
