"""Tunnel throughput benchmark (first cut): single-stream bytes/s on loopback, same run:
(a) bare TCP, (b) two Envoys doing HBONE (tcp_proxy tunneling -> HCM CONNECT termination), (c) two
nodeagent HBONE peers (bench/hbone_peer.py), each tunnel side its own process, mutual TLS 1.3 with
SPIFFE certificates from one CA. Medians of --runs transfers of --mib MiB.

    .venv/bin/python bench/hbone_throughput.py            (root: the tunnel marks its sockets)

The full benchmark (lab topology, latency at 1,000 req/s, CPU and RSS) is bench/hbone_lab.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr, new_key  # noqa: E402

SERVER_ID = SpiffeId("cluster.local", "bench", "server")
CLIENT_ID = SpiffeId("cluster.local", "bench", "client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_pki(directory: Path) -> None:
    ca = CertificateAuthority.generate()
    (directory / "root.pem").write_text(ca.root_pem)
    for name, identity in (("server", SERVER_ID), ("client", CLIENT_ID)):
        key = new_key()
        chain = ca.issue(make_csr(identity, key))[1]
        (directory / f"{name}-chain.pem").write_text("\n".join(chain[:-1]))
        (directory / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def envoy_configs(pki: Path, entry: int, hbone: int, sink: int, *, listen: str = "127.0.0.1",
                  peer: str = "127.0.0.1", upstream: str = "127.0.0.1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(client, server) Envoy configs: TCP on `listen`:`entry` -> HBONE to `peer`:`hbone` -> `upstream`:`sink`."""
    def tls(name: str, san: str) -> dict[str, Any]:
        return {"tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                               "tls_maximum_protocol_version": "TLSv1_3"},
                "tls_certificates": [{"certificate_chain": {"filename": str(pki / f"{name}-chain.pem")},
                                      "private_key": {"filename": str(pki / f"{name}-key.pem")}}],
                "validation_context": {"trusted_ca": {"filename": str(pki / "root.pem")},
                                       "match_typed_subject_alt_names": [{"san_type": "URI",
                                                                          "matcher": {"exact": san}}]},
                "alpn_protocols": ["h2"]}

    def cluster(name: str, host: str, port: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "type": "STATIC", "connect_timeout": "2s", **extra,
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": host, "port_value": port}}}}]}]}}

    windows = {"initial_stream_window_size": 4 << 20, "initial_connection_window_size": 16 << 20}
    client = {"static_resources": {
        "listeners": [{"name": "in", "address": {"socket_address": {"address": listen, "port_value": entry}},
                       "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                           "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                           "stat_prefix": "t", "cluster": "hbone",
                           "tunneling_config": {"hostname": f"{upstream}:{sink}"}}}]}]}],
        "clusters": [cluster("hbone", peer, hbone, {
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls("client", str(SERVER_ID))}},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": windows}}}})]}}
    server = {"static_resources": {
        "listeners": [{"name": "hbone", "address": {"socket_address": {"address": listen, "port_value": hbone}},
                       "filter_chains": [{
                           "transport_socket": {"name": "tls", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                                        "DownstreamTlsContext",
                               "require_client_certificate": True,
                               "common_tls_context": tls("server", str(CLIENT_ID))}},
                           "filters": [{"name": "hcm", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                               "stat_prefix": "h", "codec_type": "HTTP2",
                               "http2_protocol_options": {"allow_connect": True, **windows},
                               "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                               "http_filters": [{"name": "router", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                               "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                                   "match": {"connect_matcher": {}},
                                   "route": {"cluster": "sink", "upgrade_configs": [
                                       {"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]}}}]}]}],
        "clusters": [cluster("sink", upstream, sink, {})]}}
    return client, server


async def sink_server(port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)


async def transfer(port: int, size: int) -> float:
    """Seconds to push `size` bytes through `port` and hear the sink confirm all of them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    block = b"\0" * (1 << 20)
    started = time.perf_counter()
    for _ in range(size >> 20):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    confirmed = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = time.perf_counter() - started
    writer.close()
    if confirmed != size:
        raise RuntimeError(f"sink confirmed {confirmed} of {size} bytes")
    return elapsed


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} did not listen on {port}") from None
            time.sleep(0.05)


async def run(mib: int, runs: int) -> dict[str, Any]:
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    size = mib << 20
    sink_port = free_port()
    sink = await sink_server(sink_port)
    children: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[float]] = {"bare": [], "envoy": [], "nodeagent": []}
    with tempfile.TemporaryDirectory() as scratch:
        pki = Path(scratch)
        write_pki(pki)
        try:
            e_entry, e_hbone, n_entry, n_hbone = free_port(), free_port(), free_port(), free_port()
            ports = {"bare": sink_port, "envoy": e_entry, "nodeagent": n_entry}
            if envoy is not None:
                client_cfg, server_cfg = envoy_configs(pki, e_entry, e_hbone, sink_port)
                for name, cfg, port in (("server", server_cfg, e_hbone), ("client", client_cfg, e_entry)):
                    (pki / f"envoy-{name}.yaml").write_text(yaml.safe_dump(cfg))
                    children.append(subprocess.Popen([envoy, "-c", str(pki / f"envoy-{name}.yaml"),
                                                      "--disable-hot-restart", "--concurrency", "1", "-l", "error"],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    wait_port(port, children[-1])
            peer = str(ROOT / "bench" / "hbone_peer.py")
            children.append(subprocess.Popen([sys.executable, peer, "server", "--listen", f"127.0.0.1:{n_hbone}",
                                              "--pki", scratch], stdout=subprocess.DEVNULL))
            wait_port(n_hbone, children[-1])
            children.append(subprocess.Popen([sys.executable, peer, "client", "--listen", f"127.0.0.1:{n_entry}",
                                              "--peer", f"127.0.0.1:{n_hbone}", "--authority",
                                              f"127.0.0.1:{sink_port}", "--pki", scratch],
                                             stdout=subprocess.DEVNULL))
            wait_port(n_entry, children[-1])
            for _ in range(runs):  # interleaved, so machine noise hits all three alike
                for name, port in ports.items():
                    if name == "envoy" and envoy is None:
                        continue
                    results[name].append(await transfer(port, size))
        finally:
            for child in children:
                child.kill()
                child.wait()
            sink.close()
    gbit = {name: round(size * 8 / statistics.median(times) / 1e9, 2) for name, times in results.items() if times}
    return {"mib": mib, "runs": runs, "gbit_per_s": gbit,
            "nodeagent_vs_envoy": round(gbit["nodeagent"] / gbit["envoy"], 2) if "envoy" in gbit else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args.mib, args.runs))
    if args.json:
        print(json.dumps(report))
        return
    g = report["gbit_per_s"]
    print(f"single stream, {args.mib} MiB x {args.runs} (medians), loopback, 2 tunnel processes per pair")
    print(f"  bare TCP         {g['bare']:6.2f} Gbit/s")
    if "envoy" in g:
        print(f"  two Envoys       {g['envoy']:6.2f} Gbit/s (HBONE, mTLS 1.3)")
    print(f"  two nodeagents   {g['nodeagent']:6.2f} Gbit/s (HBONE, mTLS 1.3); vs Envoy "
          f"{report['nodeagent_vs_envoy']}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
