"""Fixtures that build real labs (namespaces, veths, cgroups, processes) and always remove them."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.lab import cgroups, netns, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.state import state_root


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    """Poll `condition` until it holds (a condition with a deadline, never a fixed sleep); the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)  # polling a condition with a deadline
    return time.monotonic() - started


def unique_lab_name() -> str:
    """A fresh lab name, so parallel or crashed runs never collide."""
    return "t" + secrets.token_hex(4)


def leftovers(name: str, pids: list[int]) -> list[str]:
    """Everything of lab `name` that still exists (empty when it is fully gone)."""
    found = [f"netns {ns}" for ns in netns.list_netns() if ns.startswith(f"{name}-")]
    if cgroups.path_of(f"{name}-lab").exists():
        found.append(f"cgroup {name}-lab")
    if (state_root() / name).exists():
        found.append(f"state dir {state_root() / name}")
    found.extend(f"process {pid}" for pid in processes.wait_gone(pids))
    return found


@pytest.fixture
def make_lab() -> Iterator[Callable[..., labs.Lab]]:
    """`make_lab(directory=None)` brings up a uniquely named lab; all of them are taken down afterwards."""
    made: list[str] = []

    def make(directory: Path | None = None) -> labs.Lab:
        name = unique_lab_name()
        made.append(name)
        return labs.up(name, directory)

    yield make
    for name in made:
        with contextlib.suppress(labs.LabNotFoundError):
            labs.down(name)
