"""The tests' Kubernetes API server: the lab's own (nodeagent.lab.apiserver), with the tests' defaults.

Everything lives in the product module: the real list/watch wire format over HTTPS, consistent paged
lists, watches with bookmarks, selectors and 410s, writes with the server's errors, TokenReview, and
the faults (`drop_connections()`, `inject()`, `expire_watches()`, `compact()`, `refuse()`, `delay()`,
`stop()`/`start()` with state kept). Only the fixed token and the standalone entry point are here.

Run standalone for benchmarks: `python -m tests.support.fakeapi --services 10000` prints its URL and token
(plain HTTP by default, as bench/ingest.py builds its kubeconfig from those two; `--tls` serves HTTPS
and prints the kubeconfig's path instead).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path

from nodeagent.lab.apiserver import PLURAL_OF_KIND, RESOURCES, LabApiServer

__all__ = ["PLURAL_OF_KIND", "RESOURCES", "FakeApiServer"]


class FakeApiServer(LabApiServer):
    """The lab API server on loopback with a fixed token (tests write it into kubeconfigs they break)."""

    def __init__(self, token: str = "fake-token", port: int = 0, **options: object) -> None:
        super().__init__(token, port, **options)  # type: ignore[arg-type]


def main() -> None:
    """Serve a cluster of the benchmark's shape until killed; print the URL and token on stdout."""
    from nodeagent.observability.logs import configure_logging
    from tests.support.objects import scale_cluster

    configure_logging(json=True, level="warning")  # stdout carries only the one JSON line the caller reads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=0)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS; print the kubeconfig's path too")
    args = parser.parse_args()
    server = FakeApiServer(port=args.port, tls=args.tls)
    services, slices = scale_cluster(args.services, args.endpoints)
    server.create_many([*services, *slices])
    server.start()
    printed = {"url": server.url, "token": server.token}
    if args.tls:
        printed["kubeconfig"] = str(server.write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig"))
    print(json.dumps(printed), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
