"""The image's health check: ask the running command's own health endpoint (the agent's, the tunnel's or the CA's).

Without arguments (the image's HEALTHCHECK, for `podman run` and `docker run`; Kubernetes ignores it) it
asks the endpoint of the command PID 1 runs. With `--unix-socket PATH [URL-PATH]` it asks a unix socket
instead: the tunnel DaemonSet's readiness probe, because during a rollout two tunnels share the node's
readiness port and only a socket in the container's own filesystem reaches this container's tunnel.
Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import http.client
import socket
import sys
import urllib.request
from pathlib import Path

ENDPOINTS = {"run": "http://127.0.0.1:10256/livez", "ztunnel": "http://127.0.0.1:15021/healthz/ready",
             "ca": "http://127.0.0.1:15014/ready"}


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the stdlib speaks HTTP over TCP only)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def unix_ready(path: str, url_path: str = "/healthz/ready") -> int:
    """0 when GET `url_path` on the unix socket `path` answers 200, else 1 (the reason on stderr)."""
    connection = UnixConnection(path, timeout=4)
    try:
        connection.request("GET", url_path)
        response = connection.getresponse()
        if response.status != 200:
            print(f"{path}{url_path}: {response.status} {response.read().decode(errors='replace')}", file=sys.stderr)
        return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{path}{url_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()


def main(argv: list[str]) -> int:
    """Check the endpoint named by `argv`, or that of the command PID 1 runs (healthy when it has none)."""
    if argv[:1] == ["--unix-socket"] and len(argv) in (2, 3):
        return unix_ready(*argv[1:])
    if argv:
        print("usage: nodeagent-healthcheck [--unix-socket PATH [URL-PATH]]", file=sys.stderr)
        return 2
    cmdline = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    command = next((arg for arg in cmdline[1:] if arg in ENDPOINTS), None)
    if command is None:
        return 0
    try:
        with urllib.request.urlopen(ENDPOINTS[command], timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"nodeagent {command}: {ENDPOINTS[command]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
