"""The lab's manifests file, applied to the lab API server whenever it changes.

The lab's resolved manifests (`/run/nodeagent/labs/<lab>/manifests/cluster.yaml`) stay the lab's
record of what it built, and tests and users edit them to change the cluster. The API server applies
every change, as `kubectl apply --prune` of that one file would: an object whose written content
changed is replaced (keeping its uid and creation time), an object that left the file is deleted, an
unchanged one is not touched (no event, no new resourceVersion). Objects created through the API are
not the file's and are never pruned by it.

The file is polled by its (inode, size, mtime) signature, and one modified less than a second before
it was read is compared by content on later polls too (timestamps are coarse: two same-size writes
close together may leave the signature unchanged). A file that does not parse keeps what was applied.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import yaml

from nodeagent.lab.apiserver.resources import PLURAL_OF_KIND, RESOURCES
from nodeagent.lab.apiserver.server import LabApiServer
from nodeagent.lab.apiserver.store import ApiError, object_key

log = structlog.get_logger("nodeagent.lab.apiserver")
ORIGIN = "manifests"
_RACY_NS = 1_000_000_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ObjectId = tuple[str, tuple[str, str]]  # (plural, (namespace, name))


class ManifestSync:
    """Applies one manifests file to a server; `poll()` once, or `start()` a polling thread."""

    def __init__(self, server: LabApiServer, path: Path, interval: float = 0.25) -> None:
        self._server = server
        self._path = path
        self._interval = interval
        self._signature: tuple[int, int, int] | None = None
        self._digest = b""
        self._read_at = 0
        self._owned: dict[ObjectId, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manifest-sync", daemon=True)
        self.applied = 0

    def adopt(self, documents: list[dict[str, Any]]) -> None:
        """Take `documents` (as already loaded into the server) as the file's current content."""
        self._owned = self._index([self._server.normalized(d) for d in documents])
        self.poll()

    def start(self) -> ManifestSync:
        """Poll in the background until `stop()`."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # a bug here must not stop the sync; the next poll tries again
                log.exception("manifest.sync.failed", file=str(self._path))

    def poll(self) -> bool:
        """Apply the file if it changed; whether it did."""
        try:
            stat = self._path.stat()
        except OSError:
            return False  # a vanished file keeps what was applied (as the agent's manifest source does)
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        racy = self._read_at - stat.st_mtime_ns < _RACY_NS
        if signature == self._signature and not racy:
            return False
        read_at = time.time_ns()
        try:
            data = self._path.read_bytes()
        except OSError:
            return False
        self._signature, self._read_at = signature, read_at
        digest = hashlib.blake2b(data).digest()
        if digest == self._digest:
            return False
        try:
            documents = [d for d in yaml.load_all(data.decode(), Loader=_LOADER) if isinstance(d, dict)]
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            log.warning("manifest.sync.unreadable", file=str(self._path), error=str(exc))
            return False
        self._digest = digest
        self.apply(documents)
        return True

    def _index(self, documents: list[dict[str, Any]]) -> dict[ObjectId, dict[str, Any]]:
        index: dict[ObjectId, dict[str, Any]] = {}
        for doc in documents:
            plural = PLURAL_OF_KIND.get(str(doc.get("kind")))
            if plural is None or not (doc.get("metadata") or {}).get("name"):
                continue
            index[(plural, object_key(RESOURCES[plural], doc))] = doc
        return index

    def apply(self, documents: list[dict[str, Any]]) -> None:
        """Make the server hold `documents` as the file's objects (see the module doc)."""
        desired = self._index([self._server.normalized(d) for d in documents])
        changes = 0
        for object_id, doc in desired.items():
            if self._owned.get(object_id) == doc:
                continue
            self._server.store.upsert(RESOURCES[object_id[0]], doc, origin=ORIGIN)
            changes += 1
        for plural, (namespace, name) in set(self._owned) - set(desired):
            try:
                self._server.store.delete(RESOURCES[plural], namespace or None, name, origin=ORIGIN)
                changes += 1
            except ApiError:
                pass  # already deleted through the API
        self._owned = desired
        self.applied += 1
        log.info("manifest.sync.applied", file=str(self._path), changes=changes)
