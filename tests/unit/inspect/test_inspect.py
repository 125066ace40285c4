"""`nodeagent inspect`'s pure half: translation paths from the datapath's own render functions, drift, the tunnel's
part of the report, the renderers (JSON valid against the documented schema), and bad input on the CLI."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.inspect.build import compute_drift, policy_lines, tunnel_part
from nodeagent.inspect.model import Capture, Drift, PodReport, RuleLine, ServicePath, Tunnel, as_document
from nodeagent.inspect.output import MARK, render, to_human
from nodeagent.inspect.paths import captured_by_tunnel, ebpf_paths, iptables_paths, with_live
from nodeagent.service.config import ProxySettings, proxy_config
from nodeagent.state.tracker import Snapshot
from tests.support import objects as k8s
from tests.support.inspect_objects import OBJECTS, snapshot


def iptables(state: Snapshot) -> list[ServicePath]:
    config = proxy_config("node1", ProxySettings(), state, ())
    return iptables_paths(state.service_ports, state.endpoints, config, (ip_address("172.18.0.2"),))


def by_frontend(paths: list[ServicePath]) -> dict[str, ServicePath]:
    return {p.frontend: p for p in paths}


def test_iptables_paths_follow_the_rendered_chains_to_each_endpoint_with_its_probability() -> None:
    paths = by_frontend(iptables(snapshot()))
    cluster = paths["10.96.0.10:80/TCP"]
    assert cluster.kind == "ClusterIP" and cluster.verdict == "translated"
    assert cluster.via.startswith("KUBE-SERVICES -> KUBE-SVC-")
    assert sorted((e.address, e.probability) for e in cluster.endpoints) == [
        ("10.244.1.2:8080", 0.5), ("10.244.2.2:8080", 0.5)]
    assert all(e.via.startswith("KUBE-SEP-") for e in cluster.endpoints)
    nodeport = paths["<node>:30080/TCP"]
    assert nodeport.kind == "NodePort" and "KUBE-NODEPORTS -> KUBE-EXT-" in nodeport.via
    assert "-> KUBE-SVC-" in nodeport.via and len(nodeport.endpoints) == 2


def test_a_service_without_endpoints_is_rejected_by_the_filter_rule() -> None:
    empty = by_frontend(iptables(snapshot()))["10.96.0.20:80/TCP"]
    assert empty.verdict == "reject (no endpoints)" and empty.endpoints == ()
    assert empty.via == "filter REJECT"


def test_three_endpoints_get_a_third_each_through_the_statistic_chain() -> None:
    objects = [*OBJECTS[:-2], k8s.endpoint_slice("web-a", "web", [
        k8s.endpoint(f"10.244.1.{i}", "node1", pod=f"web-{i}") for i in (2, 3, 4)])]
    cluster = by_frontend(iptables(snapshot(objects)))["10.96.0.10:80/TCP"]
    assert [round(e.probability, 3) for e in cluster.endpoints] == [0.333, 0.333, 0.333]


def test_ebpf_paths_are_the_map_entries_with_weights() -> None:
    objects = [*OBJECTS]
    objects[6] = json.loads(json.dumps(objects[6]))
    objects[6]["metadata"]["annotations"] = {"nodeagent.io/endpoint-weights": '{"web-2": 3}'}
    state = snapshot(objects)
    paths = by_frontend(ebpf_paths(state.service_ports, state.endpoints, (ip_address("172.18.0.2"),)))
    cluster = paths["10.96.0.10:80/TCP"]
    assert {e.address: (e.weight, e.probability) for e in cluster.endpoints} == {
        "10.244.1.2:8080": (1, 0.25), "10.244.2.2:8080": (3, 0.75)}
    assert paths["172.18.0.2:30080/TCP"].kind == "NodePort"
    assert paths["10.96.0.20:80/TCP"].verdict.startswith("reject")


def test_an_enrolled_pods_tcp_is_captured_and_live_chains_are_checked() -> None:
    paths = iptables(snapshot())
    captured = by_frontend(captured_by_tunnel(paths))
    assert captured["10.96.0.10:80/TCP"].verdict == "captured (the node tunnel balances)"
    assert captured["10.96.0.20:80/TCP"].verdict == "reject (no endpoints)"  # nothing to balance over
    cluster = by_frontend(paths)["10.96.0.10:80/TCP"]
    present = {c for c in cluster.via.split(" -> ")} | {e.via for e in cluster.endpoints}
    assert with_live([cluster], present)[0].live == "present"
    assert with_live([cluster], present - {cluster.endpoints[0].via})[0].live == "missing"
    assert with_live([cluster], None)[0].live == "unknown"



def test_an_enrolled_pods_port_53_goes_to_the_tunnels_dns_proxy_under_the_iptables_capture() -> None:
    paths = [ServicePath("shop/dns:dns", "10.96.0.53:53/UDP", "ClusterIP", "KUBE-SVC-X", (), "translated"),
             ServicePath("shop/dns:dns-tcp", "10.96.0.53:53/TCP", "ClusterIP", "KUBE-SVC-Y", (), "translated")]
    captured = by_frontend(captured_by_tunnel(paths, dns_port=15053))
    assert all(p.verdict.startswith("captured (the tunnel's DNS proxy") for p in captured.values())
    assert all("DNS proxy 15053" in p.via for p in captured.values())
    plain = by_frontend(captured_by_tunnel(paths))  # the eBPF capture, or a pod that opted out
    assert plain["10.96.0.53:53/UDP"].verdict == "translated"


CAPTURE = Capture("iptables", "nft", "drifted", "/run/netns/p",
                  rules=(RuleLine("nat", "-A NODEAGENT_OUTPUT -p tcp -j NODEAGENT_REDIRECT", 7),))
SERVED = Tunnel(True, served=True, state="served", listeners=(15001, 15006, 15008),
                certificate_subject="spiffe://cluster.local/ns/shop/sa/default")


@pytest.mark.parametrize(("enrolled", "status", "agent", "tunnel", "expected"), [
    (True, "installed", "captured", SERVED, []),
    (True, "absent", None, SERVED, [("capture", "state")]),
    (False, "installed", None, Tunnel(True, state="not served"), [("capture", "state")]),
    (False, "absent", None, Tunnel(True, state="not served"), []),
    (True, "drifted", "captured", SERVED, [("agent", "state")]),
    (True, "installed", "captured", Tunnel(True, state="error: no certificate"), [("tunnel", "missing")]),
    (False, "absent", None, SERVED, [("tunnel", "unexpected")]),
    (True, "netns-missing", None, Tunnel(False, "down"), []),
])
def test_drift_names_every_difference(enrolled: bool, status: str, agent: str | None, tunnel: Tunnel,
                                      expected: list[tuple[str, str]]) -> None:
    capture = Capture("iptables", "nft", status, "/run/netns/p")
    drift = compute_drift(enrolled=enrolled, capture=capture, missing=(), unexpected=(), agent_state=agent,
                          tunnel=tunnel, services=())
    assert [(d.where, d.change) for d in drift] == expected


def test_drift_lists_missing_and_unexpected_lines_and_missing_service_chains() -> None:
    path = ServicePath("shop/web:http", "10.96.0.10:80/TCP", "ClusterIP", "KUBE-SERVICES -> KUBE-SVC-X", (),
                       "translated", "missing")
    drift = compute_drift(enrolled=True, capture=CAPTURE, missing=("nat: -A NODEAGENT_OUTPUT -j X",),
                          unexpected=("nat: -A NODEAGENT_OUTPUT -j Y",), agent_state="captured", tunnel=SERVED,
                          services=(path,))
    assert Drift("capture", "missing", "nat: -A NODEAGENT_OUTPUT -j X") in drift
    assert Drift("capture", "unexpected", "nat: -A NODEAGENT_OUTPUT -j Y") in drift
    assert any(d.where == "service" and "10.96.0.10:80/TCP" in d.detail for d in drift)


DUMP = {"node": "node1", "states": {"10.244.1.5": "served", "10.244.1.9": "netns-missing: gone"},
        "pods": [{"ip": "10.244.1.5", "identity": "spiffe://cluster.local/ns/shop/sa/default", "node": "node1",
                  "listeners": [15001, 15006, 15008],
                  "certificate": {"serial": "ab12", "not_after": "2026-12-02T00:00:00+00:00", "renewals": 0},
                  "pools": [{"peer": "10.244.2.2:15008", "identity": "spiffe://x", "connections": 1, "streams": 0}]}]}


def test_the_tunnels_part_comes_from_its_config_dump() -> None:
    served = tunnel_part(DUMP, "10.244.1.5")
    assert served.served and served.listeners == (15001, 15006, 15008)
    assert served.certificate_serial == "ab12" and served.certificate_expiry.startswith("2026-12-02")
    assert served.certificate_subject == "spiffe://cluster.local/ns/shop/sa/default" and len(served.pools) == 1
    missing = tunnel_part(DUMP, "10.244.1.9")
    assert missing.reachable and not missing.served and missing.state == "netns-missing: gone"
    assert tunnel_part(DUMP, "10.244.1.77").state == "not served"
    down = tunnel_part(None, "10.244.1.5", "connection refused")
    assert not down.reachable and down.error == "connection refused"


def report(drift: tuple[Drift, ...] = ()) -> PodReport:
    paths = tuple(iptables(snapshot()))
    return PodReport("shop/client", "node1", ("10.244.1.5",), "spiffe://cluster.local/ns/shop/sa/default", True,
                     "namespace shop label nodeagent.io/mesh=enabled", "agent", "the agent on /run/x.sock",
                     "iptables", "asked for", "captured", CAPTURE, tunnel_part(DUMP, "10.244.1.5"), paths, drift)


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(resources.files("nodeagent.inspect").joinpath("schema.json").read_text())
    return loaded


def test_json_and_yaml_validate_against_the_documented_schema() -> None:
    drifted = report((Drift("capture", "unexpected", "nat: -A NODEAGENT_OUTPUT -p tcp -j NODEAGENT_REDIRECT"),))
    for document in (json.loads(render(drifted, "json")), yaml.safe_load(render(drifted, "yaml"))):
        jsonschema.validate(document, schema())
        assert document["drifted"] is True and document["capture"]["rules"][0]["packets"] == 7


def test_the_schema_rejects_what_is_not_a_report() -> None:
    document = as_document(report())
    document["capture"]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema())


def test_human_output_marks_differences() -> None:
    clean = to_human(report())
    assert "Drift: none" in clean and MARK not in clean
    assert "spiffe://cluster.local/ns/shop/sa/default" in clean and "15001, 15006, 15008" in clean
    drifted = to_human(report((Drift("capture", "unexpected", "nat: -A NODEAGENT_OUTPUT -p tcp -j NODEAGENT_REDIRECT"),
                               Drift("capture", "missing", "nat: -A NODEAGENT_OUTPUT -j GONE"))))
    rule_line = next(line for line in drifted.splitlines() if "NODEAGENT_REDIRECT" in line and "pkts" not in line)
    assert rule_line.lstrip().startswith(MARK)
    assert f"{MARK} missing: nat: -A NODEAGENT_OUTPUT -j GONE" in drifted
    assert "Drift (2):" in drifted


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(OBJECTS))
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [
    (["--pod", "nobody", "-n", "shop"], "no pod shop/nobody in the cluster"),
    (["--pod", "shop/web-2"], "pod shop/web-2 runs on node node2, not node1"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(manifests: Path, tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    result = CliRunner().invoke(main, ["inspect", *args, "--manifests", str(manifests), "--node", "node1",
                                       "--control-socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_vanished_pod_namespace_is_one_line(manifests: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", "--pod", "shop/client", "--manifests", str(manifests),
                                       "--node", "node1", "--control-socket", str(tmp_path / "none.sock"),
                                       "--netns-dir", str(tmp_path / "netns")])
    assert result.exit_code == 1, result.output
    assert "pod shop/client: no network namespace under" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_node_and_service_views_render_in_every_format() -> None:
    from nodeagent.inspect.output import node_text, service_text

    drifted = report((Drift("capture", "missing", "nat: -A NODEAGENT_OUTPUT -j GONE"),))
    text = node_text("node1", [report(), drifted], "human")
    assert "Node node1: datapath iptables" in text and text.count("shop/client") == 2
    assert sum(line.lstrip().startswith(MARK) for line in text.splitlines()) == 1
    document = json.loads(node_text("node1", [drifted], "json"))
    jsonschema.validate(document["pods"][0], schema())
    assert yaml.safe_load(node_text("node1", [drifted], "yaml"))["node"] == "node1"
    paths = [p for p in iptables(snapshot()) if p.service == "shop/web:http"]
    assert "KUBE-SVC-" in service_text(paths, "human")
    assert {p["frontend"] for p in json.loads(service_text(paths, "json"))} == {"10.96.0.10:80/TCP",
                                                                                  "<node>:30080/TCP"}


def test_policies_that_apply_are_shown_with_the_parts_the_tunnel_cannot_enforce() -> None:
    l7 = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
          "metadata": {"name": "web-get", "namespace": "shop"},
          "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                   "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}]}}
    other = {**l7, "metadata": {"name": "db-only", "namespace": "shop"},
             "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": [{}]}}
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "all", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}
    lines = policy_lines(snapshot([*OBJECTS, l7, other, strict]), "shop", {"app": "web"})
    assert [(line.kind, line.policy, line.effect) for line in lines] == [
        ("PeerAuthentication", "shop/all", "STRICT"), ("AuthorizationPolicy", "shop/web-get", "ALLOW")]
    assert lines[1].unenforceable and "spec.rules[0].to[0].operation.methods" in lines[1].unenforceable[0]
    assert "matches nothing" in lines[1].unenforceable[0]
    human = to_human(dataclasses.replace(report(), policies=lines))
    assert f"{MARK} not enforceable as written: spec.rules[0].to[0].operation.methods" in human
    jsonschema.validate(json.loads(render(dataclasses.replace(report(), policies=lines), "json")), schema())
    default = policy_lines(snapshot(), "shop", {"app": "web"})
    assert [(line.policy, line.effect) for line in default] == [("", "PERMISSIVE")]
