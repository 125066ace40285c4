"""The on-disk record of a lab: what `lab up` created, written before each object is created.

Because the record is written ahead of every creation (atomically: temp file + rename), `lab down`
can remove exactly what a lab made even when `lab up` was killed halfway. A per-lab lock keeps two
commands from working on the same lab at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/run/nodeagent/labs")
STATE_DIR_ENV = "NODEAGENT_LAB_STATE_DIR"
STATE_VERSION = 1


def state_root() -> Path:
    """Where labs are recorded: $NODEAGENT_LAB_STATE_DIR or /run/nodeagent/labs (gone at reboot, as netns are)."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


@dataclass
class Process:
    """A process the lab started, for `status` (the cgroup, not the pid, is what `down` relies on)."""

    owner: str
    container: str
    pid: int
    log: str


@dataclass
class LabRecord:
    """What one lab is and what of it exists. Mutable on purpose: it is the journal being written."""

    name: str
    source: str
    phase: str = "creating"
    created_at: float = field(default_factory=time.time)
    netns: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def directory(self) -> Path:
        """The lab's own directory: record, resolved manifests, logs."""
        return state_root() / self.name

    @property
    def manifests_path(self) -> Path:
        """The lab as the agent sees it: every object, with allocated addresses and derived EndpointSlices."""
        return self.directory / "manifests" / "cluster.yaml"

    def save(self) -> None:
        """Write the record atomically (a crash leaves the previous or the new version, never half)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "state.json.tmp"
        with open(tmp, "w") as out:
            json.dump(asdict(self), out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / "state.json")

    @classmethod
    def load(cls, name: str) -> LabRecord | None:
        """The record of lab `name`, or None if there is none."""
        path = state_root() / name / "state.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        raw["processes"] = [Process(**p) for p in raw.get("processes", [])]
        return cls(**raw)


def recorded_labs() -> list[str]:
    """Names of every lab with a record."""
    root = state_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists())


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the lab's lock; a second command on the same lab waits for the first."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
