"""Kernel parameters: read, set only when different (kube-proxy's EnsureSysctl), absent means off."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.kernel import sysctl


def test_ensure_writes_only_a_different_value(tmp_path: Path) -> None:
    path = sysctl.path_of(sysctl.ROUTE_LOCALNET, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("0\n")
    assert sysctl.ensure(sysctl.ROUTE_LOCALNET, 1, tmp_path) is True
    assert path.read_text() == "1\n"
    assert sysctl.ensure(sysctl.ROUTE_LOCALNET, 1, tmp_path) is False
    assert sysctl.read(sysctl.ROUTE_LOCALNET, tmp_path) == 1


def test_a_missing_parameter_is_an_error_to_read_and_off_to_check(tmp_path: Path) -> None:
    with pytest.raises(sysctl.SysctlError, match="nf_conntrack_tcp_be_liberal"):
        sysctl.read(sysctl.TCP_BE_LIBERAL, tmp_path)
    assert sysctl.enabled(sysctl.TCP_BE_LIBERAL, tmp_path) is False
    path = sysctl.path_of(sysctl.TCP_BE_LIBERAL, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("1\n")
    assert sysctl.enabled(sysctl.TCP_BE_LIBERAL, tmp_path) is True
