"""The image's HEALTHCHECK: ask the running command's own health endpoint (the agent's, the tunnel's or the CA's).

Kubernetes ignores image health checks and uses the DaemonSets' probes; this serves `podman run` and
`docker run` of the same image. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

ENDPOINTS = {"run": "http://127.0.0.1:10256/livez", "ztunnel": "http://127.0.0.1:15021/healthz/ready",
             "ca": "http://127.0.0.1:15014/ready"}


def main() -> int:
    """Check the endpoint of the command PID 1 runs; healthy when that command has none."""
    argv = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    command = next((arg for arg in argv[1:] if arg in ENDPOINTS), None)
    if command is None:
        return 0
    try:
        with urllib.request.urlopen(ENDPOINTS[command], timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"nodeagent {command}: {ENDPOINTS[command]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
