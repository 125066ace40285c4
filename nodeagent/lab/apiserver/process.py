"""`nodeagent lab apiserver`: the lab API server as a process, the way `lab up` runs it.

It keeps its files in one directory (the lab's `apiserver/`): the CA and serving certificate
(ca.crt, tls.crt, tls.key), the bearer token (token), the fault-injection token (admin-token) and the
kubeconfig. Existing files are reused, so a restarted server keeps the certificate and token every
kubeconfig already holds. It loads the lab's resolved manifests, listens, and serves until SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import structlog
import yaml

from nodeagent.lab.apiserver.controllers import EndpointSliceController
from nodeagent.lab.apiserver.server import LabApiServer
from nodeagent.lab.apiserver.sync import ManifestSync
from nodeagent.lab.apiserver.tls import load_or_make
from nodeagent.lab.families import ServiceCIDRs

log = structlog.get_logger("nodeagent.lab.apiserver")
API_PORT = 6443
BOOKMARK_INTERVAL = 60.0  # kube-apiserver sends a bookmark about once a minute to watches that allow them


@dataclass(frozen=True)
class ServerFiles:
    """The files of one server directory."""

    directory: Path

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig clients use (server URL, CA data, token)."""
        return self.directory / "kubeconfig"

    @property
    def token(self) -> Path:
        """The bearer token clients present."""
        return self.directory / "token"

    @property
    def admin_token(self) -> Path:
        """The token of the fault-injection surface (`/admin/...`)."""
        return self.directory / "admin-token"


def read_or_make_secret(path: Path) -> str:
    """The secret in `path`, or a new one written there (mode 0600) if there is none."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


def build(address: str, port: int, directory: Path, service_cidr: IPv4Network | ServiceCIDRs | None = None,
          name: str = "lab") -> LabApiServer:
    """The server of `directory` with its kubeconfig written; not yet listening."""
    files = ServerFiles(directory)
    server = LabApiServer(read_or_make_secret(files.token), port, host=address,
                          credentials=load_or_make(directory, [address, "localhost"]),
                          admin_token=read_or_make_secret(files.admin_token), bookmark_interval=BOOKMARK_INTERVAL,
                          service_cidr=service_cidr)
    # Written before listening: whoever sees the port bound finds the kubeconfig complete.
    server.write_kubeconfig(files.kubeconfig, name)
    return server


def load_manifests(server: LabApiServer, manifests: Path) -> list[dict[str, Any]]:
    """Load a YAML file into `server` (no history, like a restored etcd); returns its documents."""
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(manifests.read_text()) if isinstance(d, dict)]
    loaded = server.load_documents(documents)
    log.info("apiserver.loaded", objects=loaded, skipped=len(documents) - loaded, manifests=str(manifests))
    return documents


def serve(address: str, port: int, directory: Path, manifests: Path | None, *, name: str = "lab",
          service_cidr: IPv4Network | ServiceCIDRs | None = None, follow: bool = True) -> None:
    """Run the server until SIGTERM or SIGINT: loaded with `manifests` and, with `follow`, applying every later
    change of that file (sync.py); the endpoint-slice controller handles changes made through the API."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    server = build(address, port, directory, service_cidr, name)
    sync = None
    if manifests is not None:
        documents = load_manifests(server, manifests)
        if follow:
            sync = ManifestSync(server, manifests)
            sync.adopt(documents)
    controller = EndpointSliceController(server.store).start()
    server.start()
    if sync is not None:
        sync.start()
    log.info("apiserver.serving", url=server.url, kubeconfig=str(ServerFiles(directory).kubeconfig))
    stop.wait()
    if sync is not None:
        sync.stop()
    controller.stop()
    server.stop()
    log.info("apiserver.stopped")
