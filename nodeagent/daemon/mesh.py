"""The mesh reconciler's loop: a thread that passes after each new snapshot, periodically, and while a pod
waits for the tunnel's acknowledgement."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from nodeagent.mesh.reconciler import MESH_INPUT_KINDS, MeshReconciler
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.daemon.mesh")


@dataclass
class MeshLoop:
    """Runs the reconciler on a thread: after each new snapshot, every `period`, and soon again while a
    pod waits for the tunnel's acknowledgement."""

    reconciler: MeshReconciler
    snapshot: Callable[[], Snapshot | None]
    period: float = 10.0  # a full pass at least this often (drift repair)
    poll: float = 0.25
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: int = 0

    def start(self) -> MeshLoop:
        self._thread = threading.Thread(target=self._run, name="mesh", daemon=True)
        self._thread.start()
        return self

    def request(self) -> None:
        """Pass again now (a new snapshot, or the tunnel acknowledged something)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        generation, due = -1, 0.0
        while not self._stop.is_set():
            snapshot = self.snapshot()
            woken = self._wake.is_set()
            self._wake.clear()
            if snapshot is not None and snapshot.synced(MESH_INPUT_KINDS) and (
                    woken or snapshot.generation != generation or self.reconciler.waiting()
                    or time.monotonic() >= due):
                try:
                    self.reconciler.sync(snapshot)
                except Exception:  # a bug in one pass must not end the loop; logged with the traceback
                    self.errors += 1
                    log.exception("mesh pass failed", node=self.reconciler.node)
                generation, due = snapshot.generation, time.monotonic() + self.period
            # New snapshots are noticed within the poll; the tunnel's acknowledgements wake it at once.
            self._wake.wait(self.poll)
