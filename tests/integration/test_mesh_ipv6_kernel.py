"""The mesh over IPv6 against the kernel, in namespaces each test makes.

- The in-pod capture written with ip6tables reads back exactly as rendered (both backends), beside the
  IPv4 set, with the `ip -6` policy route; removal leaves neither family's rules.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netns import command_in
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables.apply import apply_capture, live_state, remove_capture
from nodeagent.mesh.iptables.render import pod_capture
from tests.integration.conftest import unique_lab_name

pytestmark = pytest.mark.root
BACKENDS = ["nft", "legacy"]


@pytest.fixture
def netns() -> Iterator[str]:
    """A throw-away namespace's path (with lo up, as a pod's)."""
    name = unique_lab_name() + "-m6"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns(path: str, *argv: str) -> str:
    return subprocess.run(command_in(path, argv), check=True, capture_output=True, text=True).stdout


def ours6(path: str, backend: str) -> list[str]:
    text = "".join(ns(path, f"ip6tables-{backend}-save", "-t", t) for t in ("mangle", "nat"))
    return [line for line in text.splitlines() if line.startswith("-A") and "NODEAGENT" in line]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_capture_reads_back_exactly_as_rendered_and_is_removed(netns: str, backend: str) -> None:
    state = apply_capture(netns, backend=backend, pod="demo/client", ipv6=True)
    assert state.status is CaptureStatus.INSTALLED, state.missing + state.unexpected
    desired = pod_capture(family=6)
    expected = [f"-A {h.source} {desired.jump_spec(h)}" for h in desired.hooks]
    expected += [r.line for r in desired.rules]
    assert sorted(ours6(netns, backend)) == sorted(expected)
    assert "fwmark 0x111/0xfff lookup 100" in ns(netns, "ip", "-6", "rule", "show")
    assert "local default dev lo" in ns(netns, "ip", "-6", "route", "show", "table", "100")
    assert live_state(netns, backend=backend, ipv6=True).status is CaptureStatus.INSTALLED

    # IPv6 rules deleted by hand: the pod is no longer captured as a whole, and one apply repairs it.
    ns(netns, f"ip6tables-{backend}", "-t", "nat", "-F", "NODEAGENT_OUTPUT")
    assert live_state(netns, backend=backend, ipv6=True).status is CaptureStatus.DRIFTED
    assert apply_capture(netns, backend=backend, ipv6=True).status is CaptureStatus.INSTALLED

    assert remove_capture(netns, backend=backend, ipv6=True).status is CaptureStatus.ABSENT
    assert ours6(netns, backend) == []
    assert "lookup 100" not in ns(netns, "ip", "-6", "rule", "show")
