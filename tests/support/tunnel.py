"""The tunnel as tests read it: its config dump, its metrics, and frames on the lab's fabric."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeagent.kernel.netns import in_netns
from nodeagent.lab import lab as labs
from tests.support.netns import netns_run


def admin_dump(lab: labs.Lab, node: str) -> dict[str, Any]:
    """The tunnel's /config_dump, read from inside its node (the admin port is localhost only)."""
    out = netns_run(lab.plan.node(node).netns, "python3", "-c",
                    "import urllib.request;print(urllib.request.urlopen("
                    "'http://127.0.0.1:15000/config_dump',timeout=5).read().decode())")
    result: dict[str, Any] = json.loads(out)
    return result


def metrics(lab: labs.Lab, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The tunnel's /metrics on `node`, parsed by the Prometheus text parser: (sample, labels) -> value."""
    address = lab.plan.node(node).node.address
    text = netns_run(lab.plan.node(node).netns, "python3", "-c", "import sys,urllib.request;sys.stdout.write("
                     f"urllib.request.urlopen('http://{address}:15020/metrics',timeout=5).read().decode())")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in values.items() if n == name and labels.items() <= dict(ls).items())


class Capture:
    """Every frame on the fabric bridge while it runs (AF_PACKET socket made inside the fabric namespace)."""

    def __init__(self, lab: labs.Lab) -> None:
        self.sock = in_netns(f"/run/netns/{lab.plan.fabric_netns}",
                             lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def finish(self) -> bytes:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return b"".join(self.frames)
