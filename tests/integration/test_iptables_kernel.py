"""The iptables applier and printers against the real binaries, in a network namespace made for the test.

- What the kernel holds after a sync, as `iptables-save` and `iptables -L -n` print it, equals what
  `nodeagent chains` prints for the same input (both backends).
- A partial sync rewrites only the chains of the Service that changed; stale chains are deleted.
- A flush by someone else is noticed through the canary chains and repaired by a full sync.
- `cleanup` leaves the tables as they were before the agent ran.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.kernel.netfilter import Iptables
from nodeagent.kernel.netns import command_in
from nodeagent.service.config import ProxyConfig
from nodeagent.service.iptables import cleanup, names
from nodeagent.service.iptables.formats import format_list, format_save, node_tables
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.integration.conftest import unique_lab_name
from tests.support.services import OVERALL_OBJECTS, ep, slice_, snapshot_of

pytestmark = pytest.mark.root

CONFIG = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                     cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), random_fully=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = unique_lab_name() + "-ipt"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def live_save(ipt: Iptables) -> str:
    text = "".join(ipt.save(table) for table in ("filter", "nat", "mangle"))
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"


def sync(proxier: IptablesProxier, snapshot: Any, changed: set[ObjectRef] | None = None) -> Any:
    return proxier.sync(snapshot, CONFIG, changed if changed is not None else snapshot.changed_services)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_the_kernel_prints_exactly_what_chains_prints(netns: str, backend: str) -> None:
    ipt = Iptables(backend, netns)
    report = sync(IptablesProxier(ipt), snapshot_of(*OVERALL_OBJECTS))
    views = node_tables(report.rendered)
    assert live_save(ipt).splitlines() == format_save(views).splitlines()
    for view in views[:2]:
        assert ipt.list_table(view.name).splitlines() == format_list(view).splitlines(), view.name


def test_partial_sync_rewrites_only_the_changed_service_and_deletes_its_stale_chains(netns: str) -> None:
    ipt = Iptables("nft", netns)
    proxier = IptablesProxier(ipt)
    first = snapshot_of(*OVERALL_OBJECTS)
    assert sync(proxier, first).full
    moved = [o for o in OVERALL_OBJECTS if not (o["kind"] == "EndpointSlice" and o["metadata"]["namespace"] == "ns1")]
    second = snapshot_of(*moved, slice_("ns1", "svc1", ep("10.180.0.9")))
    report = sync(proxier, second, {ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert not report.full
    nat_input = report.restore_input.split("*nat", 1)[1]
    written = {line.split()[0][1:] for line in nat_input.splitlines() if line.startswith(":")}
    new_sep = names.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.9:80")
    assert {c for c in written if names.is_service_chain(c)} == {
        "KUBE-SVC-XPGD46QRK7WJZT7O", new_sep, "KUBE-SEP-SXIVWICOYRO3J4NJ"}, "svc1's chains and its stale one only"
    assert report.deleted_chains == ["KUBE-SEP-SXIVWICOYRO3J4NJ"], "the old endpoint's chain is stale"
    nat = ipt.save("nat")
    assert "10.180.0.9:80" in nat and "10.180.0.1:80" not in nat
    assert "--to-destination 10.180.0.3:80" in nat, "unchanged Services keep their chains"


def test_a_flush_by_someone_else_is_repaired_by_a_full_sync(netns: str) -> None:
    ipt = Iptables("nft", netns)
    proxier = IptablesProxier(ipt)
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    sync(proxier, snapshot)
    assert proxier.canaries_intact()
    subprocess.run(command_in(netns, ["iptables-nft", "-t", "mangle", "-F"]), check=True)
    subprocess.run(command_in(netns, ["iptables-nft", "-t", "mangle", "-X"]), check=True)
    assert not proxier.canaries_intact()
    proxier.force_full_sync()
    assert sync(proxier, snapshot, set()).full
    assert proxier.canaries_intact()


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_cleanup_restores_the_tables_as_they_were(netns: str, backend: str) -> None:
    ipt = Iptables(backend, netns)
    # someone else's rules, which must survive
    subprocess.run(command_in(netns, [f"iptables-{backend}", "-t", "nat", "-A", "POSTROUTING",
                    "-s", "10.9.0.0/16", "-j", "MASQUERADE"]), check=True)
    subprocess.run(command_in(netns, [f"iptables-{backend}", "-t", "filter", "-N", "MINE"]), check=True)
    before = live_save(ipt)
    sync(IptablesProxier(ipt), snapshot_of(*OVERALL_OBJECTS))
    assert "KUBE-SERVICES" in live_save(ipt)
    removed = cleanup.cleanup(ipt)
    assert removed, "cleanup reports what it removed"
    assert live_save(ipt) == before


def test_a_batched_nft_full_sync_programs_exactly_what_one_restore_does(netns: str) -> None:
    """Large first syncs on iptables-nft go in batches (its restore is quadratic); the result must not differ."""
    ipt = Iptables("nft", netns)
    batched = IptablesProxier(ipt, nft_batch_threshold=2, nft_ports_per_batch=2)
    report = sync(batched, snapshot_of(*OVERALL_OBJECTS))
    assert report.full and len(report.rendered.port_chains) > 2
    assert live_save(ipt).splitlines() == format_save(node_tables(report.rendered)).splitlines()


def test_a_failed_restore_names_the_offending_line_and_changes_nothing(netns: str) -> None:
    from nodeagent.kernel.netfilter import IptablesError

    ipt = Iptables("nft", netns)
    sync(IptablesProxier(ipt), snapshot_of(*OVERALL_OBJECTS))
    before = live_save(ipt)
    bad = "*nat\n:KUBE-SVC-BROKEN - [0:0]\n-A KUBE-SVC-BROKEN -m tcp -p tcp --dport 99999 -j RETURN\nCOMMIT\n"
    with pytest.raises(IptablesError) as failed:
        ipt.restore(bad)
    assert ">      3 -A KUBE-SVC-BROKEN -m tcp -p tcp --dport 99999 -j RETURN" in str(failed.value)
    assert live_save(ipt) == before, "a failed restore is atomic"
