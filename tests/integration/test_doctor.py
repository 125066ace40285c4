"""doctor on this machine: the real probes pass once scripts/setup.sh has run (CI runs it first)."""

from __future__ import annotations

import pytest

from nodeagent import doctor

pytestmark = [pytest.mark.root, pytest.mark.bcc]


def test_every_prerequisite_is_met_after_setup() -> None:
    checks = doctor.run_all()
    assert {c.name for c in checks} >= {"netns", "cgroup v2", "bpf syscall", "cgroup sock_addr attach",
                                        "tc clsact", "BTF", "bpffs", "iptables-legacy", "iptables-nft",
                                        "bcc compile"}
    assert [c for c in checks if not c.ok] == []
