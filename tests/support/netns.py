"""Running a command inside a test's network namespace (by name, as `ip netns` knows it)."""

from __future__ import annotations

import subprocess


def netns_run(netns: str, *argv: str, check: bool = True) -> str:
    """Run `argv` in `netns` and return its standard output; a non-zero exit raises unless `check` is off."""
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check, capture_output=True,
                          text=True, timeout=120).stdout
