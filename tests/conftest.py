"""Test markers that say what a test needs, and make sure CI never silently skips them.

`root`: creates throw-away network namespaces and cgroups (never touches the root namespace or cgroup).
`bcc`: compiles and loads eBPF programs with bcc.
Outside CI a test whose needs are not met is skipped with the reason; in CI (CI=true) it fails instead,
so a green CI always means the kernel-level tests ran.
"""

from __future__ import annotations

import os
import shutil

import pytest


def _unmet(item: pytest.Item) -> str | None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        return "needs root (creates network namespaces and cgroups)"
    if item.get_closest_marker("root") and shutil.which("ip") is None:
        return "needs iproute2 (run scripts/setup.sh)"
    if item.get_closest_marker("bcc"):
        try:
            import bcc  # noqa: F401
        except ImportError:
            return "needs bcc (run scripts/setup.sh)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _unmet(item)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run every test, but this one {reason}")
    pytest.skip(reason)
