"""Running a command inside a test's network namespace (by name, as `ip netns` knows it)."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator


def netns_run(netns: str, *argv: str, check: bool = True) -> str:
    """Run `argv` in `netns` and return its standard output; a non-zero exit raises unless `check` is off."""
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check, capture_output=True,
                          text=True, timeout=120).stdout


@contextlib.contextmanager
def scratch_netns(prefix: str = "na-test") -> Iterator[str]:
    """A new, empty network namespace (loopback up) named `prefix`-<random>, removed afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        netns_run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
