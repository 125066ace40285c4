"""The node's probe SNAT in both families (root: a namespace of the test's own): a pod probed at its IPv6
address gets ip6tables' SNAT to Istio's IPv6 probe address, the IPv6 set goes away when no pod has an IPv6
address, and removal clears both families."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netns import command_in
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables.apply import apply_probe_snat, probe_snat_state, remove_probe_snat
from tests.integration.conftest import unique_lab_name

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[str]:
    name = unique_lab_name() + "-psn"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def snat_lines(path: str, binary: str) -> list[str]:
    out = subprocess.run(command_in(path, [binary, "-t", "nat", "-S"]), check=True, capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "NODEAGENT_POSTRT" in line and "SNAT" in line]


def test_each_family_gets_its_own_probe_snat_and_both_go_on_removal(netns: str) -> None:
    state = apply_probe_snat(netns, ["10.244.1.2", "fd00:10:244:1::2", "fd00:10:244:1::3"], backend="nft")
    assert state.status is CaptureStatus.INSTALLED, state
    assert snat_lines(netns, "iptables") == [
        "-A NODEAGENT_POSTRT -d 10.244.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127"]
    assert snat_lines(netns, "ip6tables") == [
        f"-A NODEAGENT_POSTRT -d fd00:10:244:1::{n}/128 -p tcp -m owner --socket-exists -j SNAT --to-source "
        "fd16:9254:7127:1337:ffff:ffff:ffff:ffff" for n in (2, 3)]
    assert probe_snat_state(netns, ["fd00:10:244:1::2", "fd00:10:244:1::3"], backend="nft",
                            family=6).status is CaptureStatus.INSTALLED
    # No pod with an IPv6 address any more: the IPv6 set goes, the IPv4 one stays.
    assert apply_probe_snat(netns, ["10.244.1.2"], backend="nft").status is CaptureStatus.INSTALLED
    assert snat_lines(netns, "ip6tables") == [] and len(snat_lines(netns, "iptables")) == 1
    apply_probe_snat(netns, ["10.244.1.2", "fd00:10:244:1::2"], backend="nft")
    assert remove_probe_snat(netns, backend="nft").status is CaptureStatus.ABSENT
    assert snat_lines(netns, "iptables") == [] == snat_lines(netns, "ip6tables")
