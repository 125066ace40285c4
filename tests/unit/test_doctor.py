"""doctor's report: every missing prerequisite comes with its fix; a crashing probe is a failed check."""

from __future__ import annotations

import pytest

from nodeagent import doctor


def test_format_shows_fix_only_for_missing() -> None:
    text = doctor.format_checks([doctor.Check("BTF", True, "present", "never shown"),
                                 doctor.Check("bpffs", False, "not mounted", "mount -t bpf bpf /sys/fs/bpf")])
    assert "ok       BTF" in text and "never shown" not in text
    assert "missing  bpffs" in text and "fix: mount -t bpf bpf /sys/fs/bpf" in text


def test_a_crashing_probe_becomes_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> doctor.Check:
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(doctor, "check_btf", boom)
    checks = doctor.run_all()
    crashed = [c for c in checks if "probe exploded" in c.detail]
    assert len(crashed) == 1 and not crashed[0].ok
