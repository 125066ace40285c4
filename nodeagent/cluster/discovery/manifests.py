"""A directory of Kubernetes YAML (or JSON) manifests as a source, re-read when a file changes.

For the lab and for machines without a cluster. Every read produces one `Listed` event per kind,
the whole current content, so the tracker sees additions, edits and deletions alike (a file removed
means its objects are gone). Files are polled by (inode, size, mtime) signature: a rename-into-place
by an editor or `kubectl`-style tooling is seen as a change, and nothing depends on inotify limits.
File timestamps are coarse (the kernel stamps them from a jiffy clock), so two same-size writes a
few milliseconds apart can leave the signature unchanged; as git does for its index ("racy git"),
a file whose mtime is too close to the moment it was read is compared by content on the next poll.

Bad input stays local: a file that is not valid YAML keeps its last good content and is reported;
a document without a usable kind or name, or a second definition of an object, is reported and
skipped; everything else is delivered. Kinds nodeagent does not read (a Deployment, a ConfigMap) are
skipped silently, as the API source never sees them: a directory may hold a whole application.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from nodeagent.cluster.decode import Decoded
from nodeagent.cluster.discovery.bulk import decode_items
from nodeagent.cluster.events import Event, Listed, Sink, Unreadable
from nodeagent.cluster.model import Kind, ObjectRef

log = structlog.get_logger("nodeagent.cluster.discovery.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
KNOWN_KINDS = frozenset(kind.value for kind in Kind)
_RACY_NS = 1_000_000_000  # a file modified this close to our read of it may change without a new mtime
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster


@dataclass(frozen=True)
class _FileContent:
    signature: tuple[int, int, int]
    digest: bytes  # of the bytes read, to settle racy signatures
    read_at_ns: int
    items: tuple[tuple[str, ObjectRef | None, Decoded], ...]  # (where, ref, decoded)
    problems: tuple[Unreadable, ...]


def parse_documents(text: str, source: str) -> tuple[list[tuple[str, Any]], list[Unreadable]]:
    """The objects of a multi-document YAML text, each with where it was found; `kind: List` is flattened."""
    try:
        bodies = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        return [], [Unreadable(None, source, f"not valid YAML: {exc}")]
    found: list[tuple[str, Any]] = []
    problems: list[Unreadable] = []
    for index, body in enumerate(bodies):
        where = f"{source}#{index}"
        if body is None:
            continue
        if isinstance(body, dict) and body.get("kind") == "List":
            items = body.get("items")
            if not isinstance(items, list):
                problems.append(Unreadable(None, where, "a List needs a list of items"))
                continue
            found.extend((f"{where}.items[{i}]", item) for i, item in enumerate(items))
        else:
            found.append((where, body))
    return found, problems


class ManifestSource:
    """Reads `directory` now and whenever its files change; emits the complete state each time."""

    def __init__(self, directory: Path, sink: Sink, *, poll_interval: float = 1.0) -> None:
        self._directory = directory
        self._sink = sink
        self._poll_interval = poll_interval
        self._files: dict[Path, _FileContent] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manifests", daemon=True)
        self.reads = 0

    def start(self) -> ManifestSource:
        """Read once at once, then poll on a thread."""
        self.read()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                self.read()
            except Exception:  # a bug here must not stop the source; the next poll tries again
                log.exception("reading manifests failed", directory=str(self._directory))

    def read(self) -> bool:
        """Re-read changed files; emit the whole state if anything changed. Returns whether it did."""
        try:
            paths = sorted(p for p in self._directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
        except OSError as exc:
            # A directory that vanished or cannot be read keeps the state it had: withdrawing every
            # Service because of a transient error would be worse than serving the last known state.
            self._sink(Unreadable(None, str(self._directory), f"cannot list directory: {exc}"))
            return False
        changed = set(self._files) - set(paths)
        for path in changed:
            del self._files[path]
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            known = self._files.get(path)
            if known is not None and known.signature == signature and not self._racy(path, known):
                continue
            content = self._load(path, signature, known)
            if known is not None and content.digest == known.digest:
                self._files[path] = content  # same bytes: refresh the read time, nothing to emit
                continue
            self._files[path] = content
            changed.add(path)
        if not changed and self.reads:
            return False
        self.reads += 1
        self._emit()
        return True

    @staticmethod
    def _racy(path: Path, known: _FileContent) -> bool:
        """Whether the file may have changed since it was read although its signature did not."""
        if known.read_at_ns - known.signature[2] >= _RACY_NS:
            return False
        try:
            return hashlib.blake2b(path.read_bytes()).digest() != known.digest
        except OSError:
            return True

    def _load(self, path: Path, signature: tuple[int, int, int], previous: _FileContent | None) -> _FileContent:
        read_at = time.time_ns()
        try:
            data = path.read_bytes()
            text = data.decode()
        except (OSError, UnicodeDecodeError) as exc:
            return _FileContent(signature, b"", read_at, previous.items if previous else (),
                                (Unreadable(None, str(path), f"cannot read: {exc}"),))
        digest = hashlib.blake2b(data).digest()
        documents, problems = parse_documents(text, str(path))
        if problems and not documents and previous is not None:
            log.warning("manifest file unreadable, keeping its last good content", file=str(path),
                        reason=problems[0].reason)
            return _FileContent(signature, digest, read_at, previous.items, tuple(problems))
        read = [(where, body) for where, body in documents
                if not (isinstance(body, dict) and isinstance(body.get("kind"), str) and body["kind"]
                        and body["kind"] not in KNOWN_KINDS)]
        decoded = decode_items(body for _, body in read)
        items = tuple((where, ref, result) for (where, _), (ref, result) in zip(read, decoded, strict=True))
        return _FileContent(signature, digest, read_at, items, tuple(problems))

    def _emit(self) -> None:
        by_kind: dict[Kind, dict[ObjectRef, Decoded]] = {kind: {} for kind in Kind}
        defined_at: dict[ObjectRef, str] = {}
        events: list[Event] = []
        for content in self._files.values():
            events.extend(content.problems)
            for where, ref, decoded in content.items:
                if ref is None:
                    reason = "; ".join(r.reason if r.field == "-" else f"{r.field}: {r.reason}"
                                       for r in decoded.rejections)
                    events.append(Unreadable(None, where, reason))
                elif ref in defined_at:
                    events.append(Unreadable(ref.kind, where, f"{ref} is already defined at {defined_at[ref]}; "
                                                              "this definition is ignored"))
                else:
                    defined_at[ref] = where
                    by_kind[ref.kind][ref] = decoded
        version = f"manifests-{self.reads}"
        events.extend(Listed(kind, tuple(objects.items()), version) for kind, objects in by_kind.items())
        for event in events:
            self._sink(event)
        log.info("manifests read", directory=str(self._directory), files=len(self._files),
                 objects=len(defined_at), problems=sum(1 for e in events if isinstance(e, Unreadable)))
