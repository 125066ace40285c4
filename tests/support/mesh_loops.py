"""Traffic from inside lab pods for mesh tests: a connection loop and a held connection, run in the pod's
namespace and cgroup (the eBPF capture is per cgroup)."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs

# Connections from inside a pod, one every `gap` seconds for `seconds`: (started, ok, peer or error).
LOOP = r"""
import json, socket, sys, time
target, seconds, gap = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
host, port = target.rsplit(":", 1)
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    started = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            s.sendall(b"loop\n")
            answer = json.loads(s.makefile("rb").readline())
        out.append([started, True, answer["peer"]])
    except (OSError, ValueError) as exc:
        out.append([started, False, type(exc).__name__])
    time.sleep(gap)
print(json.dumps(out))
"""

# Holds one connection: sends a line for every line on stdin and prints the answer ("" once the connection
# is gone), so a test decides when each exchange happens.
HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
reader = s.makefile("rb")
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        answer = reader.readline().decode()
    except OSError as exc:
        answer = ""
    sys.stdout.write(answer if answer.endswith("\n") else answer + "\n")
    sys.stdout.flush()
"""


def in_pod(lab: labs.Lab, pod: str, *command: str) -> list[str]:
    """The argv running `command` in the pod's namespace and cgroup."""
    plan = lab.plan.pod(pod)
    return processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), list(command))


def connection_loop(lab: labs.Lab, pod: str, target: str, seconds: float, gap: float = 0.05
                    ) -> tuple[threading.Thread, list[list[Any]]]:
    """Start LOOP in `pod` against `target` ("ip:port") on a thread; its results land in the list when the
    thread ends."""
    out: list[list[Any]] = []

    def run() -> None:
        result = subprocess.run(in_pod(lab, pod, "python3", "-c", LOOP, target, str(seconds), str(gap)),
                                env=processes.child_env({}), capture_output=True, text=True, timeout=seconds + 60)
        out.extend(json.loads(result.stdout))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


class Held:
    """One connection held open from a pod (HOLD): `exchange()` sends a line and returns the answer ("" when
    the connection is gone)."""

    def __init__(self, lab: labs.Lab, pod: str, host: str, port: int) -> None:
        self.process = subprocess.Popen(in_pod(lab, pod, "python3", "-c", HOLD, host, str(port)),
                                        env=processes.child_env({}), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def exchange(self, word: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
