"""The nftables proxier against the kernel, in a network namespace made for the test.

- What `nft list table ip kube-proxy` prints after a sync is, element by element, the rendered table
  (kube-proxy's text, as `chains --format nft` prints it), for IPv4 and IPv6.
- A partial sync's transaction names only the Service that changed, and the kernel then holds the new table.
- Stale chains are flushed, then deleted a second later; cleanup removes the table.
"""

from __future__ import annotations

import difflib
import ipaddress
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.kernel.nftables import Nft
from nodeagent.service.config import ProxyConfig
from nodeagent.service.nftables import cleanup
from nodeagent.service.nftables.listing import canonical_dump, parse_listing
from nodeagent.service.nftables.proxier import NftablesProxier
from nodeagent.service.nftables.ruleset import Table
from tests.integration.conftest import unique_lab_name
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

pytestmark = pytest.mark.root

CONFIG = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                     cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                     nodeport_ips=(ipaddress.ip_address("192.168.0.2"),),
                     service_cidrs=(ipaddress.ip_network("172.30.0.0/16"),))
CONFIG6 = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("2001:db8::1"), family=6,
                      cluster_cidrs=(ipaddress.ip_network("fd00:10::/64"),),
                      service_cidrs=(ipaddress.ip_network("fd00:10:96::/112"),))


@pytest.fixture
def netns() -> Iterator[str]:
    name = unique_lab_name() + "-nft"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def live(nft: Nft, family: str = "ip") -> Table:
    text = nft.list_table(family, "kube-proxy")
    assert text is not None
    return parse_listing(text)


def assert_same(live_table: Table, expected: Table) -> None:
    got, want = canonical_dump(live_table), canonical_dump(expected)
    assert got == want, "\n".join(difflib.unified_diff(want, got, "rendered", "kernel", lineterm=""))


def test_the_kernel_holds_exactly_the_rendered_table(netns: str) -> None:
    nft = Nft(netns)
    report = NftablesProxier(nft).sync(snapshot_of(*OVERALL_OBJECTS), CONFIG, set())
    assert report.full
    assert_same(live(nft), report.rendered.table)
    # the listing, read back, holds every rendered line (spelled the kernel's way), no more
    assert len(canonical_dump(live(nft))) == len(report.rendered.dump().splitlines())


def test_ipv6_table(netns: str) -> None:
    nft = Nft(netns)
    raw = service("ns1", "svc1", "fd00:10:96::41", type_="NodePort", node_port=3001,
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    raw["spec"]["ipFamilies"] = ["IPv6"]
    eps = slice_("ns1", "svc1", ep("fd00:10::5"), ep("fd00:10::6", node="test-node"))
    eps["addressType"] = "IPv6"
    report = NftablesProxier(nft, family=6).sync(snapshot_of(raw, eps), CONFIG6, set())
    assert_same(live(nft, "ip6"), report.rendered.table)


def test_partial_sync_changes_only_what_changed(netns: str) -> None:
    nft = Nft(netns)
    clock = [100.0]
    proxier = NftablesProxier(nft, clock=lambda: clock[0])
    proxier.sync(snapshot_of(*OVERALL_OBJECTS), CONFIG, set())
    objects: list[dict[str, Any]] = [*OVERALL_OBJECTS]
    objects[6] = slice_("ns1", "svc1", ep("10.180.0.7"))  # svc1's endpoint moves
    report = proxier.sync(snapshot_of(*objects), CONFIG, {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert not report.full
    touched = {line.split(" ")[4] for line in report.plan.lines}
    assert touched == {"service-ULMVA6XW-ns1/svc1/tcp/p80",
                       "endpoint-P7VOJY6J-ns1/svc1/tcp/p80__10.180.0.7/80",
                       "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"}, report.transaction
    assert "flush chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80" in report.plan.lines
    assert proxier.known is not None
    assert_same(live(nft), proxier.known)
    # a second later the stale endpoint chain is deleted
    clock[0] += 2
    report = proxier.sync(snapshot_of(*objects), CONFIG, set())
    assert report.plan.lines == ["delete chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"]
    assert "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80" not in live(nft).chains
    assert_same(live(nft), report.rendered.table)


def test_restart_finds_and_removes_leftovers(netns: str) -> None:
    nft = Nft(netns)
    NftablesProxier(nft).sync(snapshot_of(*OVERALL_OBJECTS), CONFIG, set())
    clock = [100.0]
    again = NftablesProxier(nft, clock=lambda: clock[0])  # a new process; svc5 (and its affinity set) gone
    report = again.sync(snapshot_of(*OVERALL_OBJECTS[:4], OVERALL_OBJECTS[5], *OVERALL_OBJECTS[6:10]), CONFIG, set())
    assert any(line.startswith("delete set ip kube-proxy affinity-") for line in report.plan.lines)
    assert {c for c in live(nft).chains if "svc5" in c} == {c for c in report.plan.flushed_chains if "svc5" in c}
    clock[0] += 2
    again.sync(snapshot_of(*OVERALL_OBJECTS[:4], OVERALL_OBJECTS[5], *OVERALL_OBJECTS[6:10]), CONFIG, set())
    assert not [c for c in live(nft).chains if "svc5" in c]


def test_cleanup_removes_the_tables(netns: str) -> None:
    nft = Nft(netns)
    proxier = NftablesProxier(nft)
    proxier.sync(snapshot_of(*OVERALL_OBJECTS), CONFIG, set())
    assert proxier.canaries_intact()
    assert cleanup.cleanup(nft) == ["table ip kube-proxy"]
    assert nft.list_table("ip", "kube-proxy") is None
    assert not proxier.canaries_intact()  # (the agent then forces a full sync)
    assert cleanup.cleanup(nft) == []
