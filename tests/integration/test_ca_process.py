"""`nodeagent ca` as a process against the fake API server (loopback), and the tunnel's `request_certificate`:
the TokenReview of a projected token, identities of the tunnel's own node only, the refusal logged and
counted, /ready and /metrics, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, new_key, spiffe_id_of
from nodeagent.ca.service import CertificateRequestError, request_certificate
from nodeagent.cli import main
from tests.support.fakeapi import FakeApiServer

CLIENT = SpiffeId("cluster.local", "demo", "client")


def pod(namespace: str, name: str, node: str, account: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}"},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}]}}


@dataclass
class CaProcess:
    process: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any]]
    address: str
    monitoring: str
    root_pem: str
    api: FakeApiServer

    def wait_log(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next log line with `event` (lines before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event!r} log line within {timeout} s") from None
            if line.get("event") == event:
                return line


def _read(stream: Any, lines: queue.Queue[dict[str, Any]]) -> None:
    for raw in stream:
        try:
            lines.put(json.loads(raw))
        except ValueError:
            lines.put({"event": "<not json>", "text": raw})


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaProcess]:
    directory = tmp_path_factory.mktemp("ca")
    authority = CertificateAuthority.load_or_create(directory / "ca")
    api = FakeApiServer()
    for obj in (pod("nodeagent", "ztunnel-1", "node1", "nodeagent-ztunnel"),
                pod("nodeagent", "ztunnel-2", "node2", "nodeagent-ztunnel"), pod("demo", "client", "node1", "client")):
        api.create(obj)
    api.start()
    kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
    argv = [str(Path(sys.executable).with_name("nodeagent")), "--log-json", "ca", "--ca-dir", str(directory / "ca"),
            "--address", "127.0.0.1:0", "--monitoring-address", "127.0.0.1:0", "--kubeconfig", str(kubeconfig)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_read, args=(process.stderr, lines), daemon=True).start()
    try:
        serving = CaProcess(process, lines, "", "", authority.root_pem, api).wait_log("CA serving", timeout=30)
        running = CaProcess(process, lines, f"127.0.0.1:{serving['port']}", f"http://127.0.0.1:{serving['monitoring']}",
                            authority.root_pem, api)
        deadline = time.monotonic() + 20
        while not _ready(running.monitoring):
            assert time.monotonic() < deadline, "the CA did not become ready (listed the pods)"
            time.sleep(0.05)  # polling a condition with a deadline
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        api.stop()


def _ready(monitoring: str) -> bool:
    try:
        return bool(json.loads(urllib.request.urlopen(f"{monitoring}/ready", timeout=2).read())["ready"])
    except OSError:
        return False


def token(ca: CaProcess, pod_name: str, node: str) -> str:
    return ca.api.issue_token("nodeagent", "nodeagent-ztunnel", pod_name, f"uid-{pod_name}", node)


def test_a_tunnel_gets_a_certificate_for_a_pod_on_its_node(ca: CaProcess) -> None:
    chain = request_certificate(ca.address, token(ca, "ztunnel-1", "node1"), CLIENT, new_key(), ca.root_pem)
    assert spiffe_id_of(x509.load_pem_x509_certificate(chain[0].encode())) == CLIENT
    issued = ca.wait_log("certificate issued")
    assert issued["node"] == "node1" and issued["identity"] == str(CLIENT)


def test_another_nodes_tunnel_is_refused_logged_and_counted(ca: CaProcess) -> None:
    with pytest.raises(CertificateRequestError) as refused:
        request_certificate(ca.address, token(ca, "ztunnel-2", "node2"), CLIENT, new_key(), ca.root_pem)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    line = ca.wait_log("certificate refused")
    assert (line["node"], line["identity"], line["reason"]) == ("node2", str(CLIENT), "identity_not_on_node")
    metrics = urllib.request.urlopen(f"{ca.monitoring}/metrics", timeout=5).read().decode()
    assert 'nodeagent_ca_refusals_total{reason="identity_not_on_node"} 1.0' in metrics


def test_sigterm_stops_the_ca(ca: CaProcess) -> None:
    ca.process.send_signal(signal.SIGTERM)
    assert ca.process.wait(timeout=15) == 0
    ca.wait_log("CA stopped")


def test_without_ca_files_it_says_where_they_come_from(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ca", "--ca-dir", str(tmp_path), "--token-file-dir", str(tmp_path),
                                       "--manifests", str(tmp_path)])
    assert result.exit_code == 1
    assert "ca-key.pem missing" in result.output and "make-ca-secret.sh" in result.output
