"""`nodeagent trace`'s prediction (pure): capture or not, the tunnel's or the node's candidates with their
chances, transport and policy verdict per candidate, and the outcome."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from nodeagent.inspect.paths import ebpf_paths, iptables_paths
from nodeagent.inspect.trace import CONNECTED, DENIED, REFUSED, TraceError, TraceInput, predict, to_text
from nodeagent.mesh.iptables.render import CaptureOptions
from nodeagent.service.config import ProxySettings, proxy_config
from nodeagent.state.tracker import Snapshot
from tests.support import objects as k8s
from tests.support.inspect_objects import OBJECTS, snapshot

DENY_SHOP = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "deny-shop", "namespace": "shop"},
             "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                      "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}}


def given(state: Snapshot, ip: str, port: int, proto: str = "tcp", mode: str = "iptables",
          **options: Any) -> TraceInput:
    if mode == "iptables":
        paths = iptables_paths(state.service_ports, state.endpoints, proxy_config("node1", ProxySettings(), state, ()),
                               (ip_address("172.18.0.2"),))
    else:
        paths = ebpf_paths(state.service_ports, state.endpoints, (ip_address("172.18.0.2"),))
    return TraceInput("shop/client", ip, port, proto, mode, paths, ("172.18.0.2",), CaptureOptions(**options))


def test_an_enrolled_pods_tcp_to_a_cluster_ip_goes_through_the_tunnel_over_hbone() -> None:
    state = snapshot()
    trace = predict(state, "node1", given(state, "10.96.0.10", 80))
    assert trace.captured and trace.outcome == CONNECTED
    assert trace.pods() == {"shop/web-1", "shop/web-2"}
    assert sorted((h.address, h.probability) for h in trace.hops) == [("10.244.1.2:8080", 0.5),
                                                                      ("10.244.2.2:8080", 0.5)]
    assert all(h.transport.startswith("HBONE to ") and h.allowed for h in trace.hops)
    assert "captured: to the node tunnel at 127.0.0.1:15001" in to_text(trace)


@pytest.mark.parametrize("mode", ["iptables", "ebpf"])
def test_outside_the_mesh_the_nodes_translation_decides(mode: str) -> None:
    objects = [k8s.namespace("shop"), *(o for o in OBJECTS if o["kind"] != "Namespace")]
    state = snapshot(objects)
    trace = predict(state, "node1", given(state, "10.96.0.10", 80, mode=mode))
    assert not trace.captured and trace.outcome == CONNECTED
    assert trace.pods() == {"shop/web-1", "shop/web-2"}
    assert any(("KUBE-SVC-" if mode == "iptables" else "service map") in step for step in trace.steps)
    nodeport = predict(state, "node1", given(state, "172.18.0.2", 30080, mode=mode))
    assert nodeport.pods() == {"shop/web-1", "shop/web-2"}


def test_no_endpoints_is_refused_either_way() -> None:
    state = snapshot()
    assert predict(state, "node1", given(state, "10.96.0.20", 80)).outcome == REFUSED
    outside = snapshot([k8s.namespace("shop"), *(o for o in OBJECTS if o["kind"] != "Namespace")])
    assert predict(outside, "node1", given(outside, "10.96.0.20", 80)).outcome == REFUSED


def test_a_deny_policy_is_the_verdict_of_every_candidate() -> None:
    state = snapshot([*OBJECTS, DENY_SHOP])
    trace = predict(state, "node1", given(state, "10.96.0.10", 80))
    assert trace.outcome == DENIED and trace.pods() == set()
    assert all("denied by DENY policy shop/deny-shop" in h.verdict for h in trace.hops)


def test_excluded_ports_and_udp_are_not_captured() -> None:
    state = snapshot()
    excluded = predict(state, "node1", given(state, "10.96.0.10", 80, exclude_outbound_ports=(80,)))
    assert not excluded.captured and "excluded" in excluded.steps[1]
    udp = predict(state, "node1", given(state, "10.244.2.2", 8081, proto="udp"))
    assert not udp.captured and udp.outcome == CONNECTED and udp.pods() == {"shop/web-2"}


def test_an_unknown_source_is_an_error() -> None:
    state = snapshot()
    with pytest.raises(TraceError, match="pod shop/ghost"):
        predict(state, "node1", TraceInput("shop/ghost", "10.96.0.10", 80, "tcp", "iptables", ()))


def _outside_trace(ip: str) -> Any:
    state = snapshot([k8s.namespace("shop"), *(o for o in OBJECTS if o["kind"] != "Namespace")])
    return predict(state, "node1", given(state, ip, 80, mode="ebpf"))


def test_a_probe_confirms_only_what_was_predicted() -> None:
    from nodeagent.inspect.probe import probe

    def refused() -> dict[str, str]:
        raise OSError("[Errno 111] Connection refused")

    connected = _outside_trace("10.96.0.10")
    assert probe(connected, lambda: {"pod": "shop/web-2"}, "unused", "", "ebpf").confirmed
    wrong = probe(connected, lambda: {"pod": "shop/other"}, "unused", "", "ebpf")
    assert not wrong.confirmed and "not one of the predicted" in wrong.reasons[0]
    failed = probe(connected, refused, "unused", "", "ebpf")
    assert not failed.confirmed and "Connection refused" in failed.reasons[0]
    empty = _outside_trace("10.96.0.20")
    assert probe(empty, refused, "unused", "", "ebpf").confirmed
    assert not probe(empty, lambda: {"pod": "shop/web-1"}, "unused", "", "ebpf").confirmed


def test_the_verdict_sees_the_source_address_and_the_destination_address() -> None:
    """The prediction asks the tunnel's authorizer with the source pod's address and the candidate's, so
    ipBlocks and destination.ip policies decide as they will in the tunnel."""
    deny = {**DENY_SHOP, "spec": {"action": "DENY", "rules": [{
        "from": [{"source": {"ipBlocks": ["10.244.1.5/32"]}}],
        "when": [{"key": "destination.ip", "values": ["10.244.2.0/24"]}]}]}}
    state = snapshot([*OBJECTS, deny])
    trace = predict(state, "node1", given(state, "10.96.0.10", 80))
    verdicts = {h.address: (h.allowed, h.verdict) for h in trace.hops}
    assert verdicts["10.244.2.2:8080"] == (False, "denied by DENY policy shop/deny-shop rule 0")
    assert verdicts["10.244.1.2:8080"][0]


def test_a_probe_without_a_tunnel_says_so_instead_of_failing() -> None:
    """A captured prediction probed where no tunnel answers (the mesh off): not confirmed, with the reason."""
    from nodeagent.inspect.probe import probe

    state = snapshot()
    captured = predict(state, "node1", given(state, "10.96.0.10", 80))
    assert captured.captured
    result = probe(captured, lambda: {"pod": "shop/web-1"}, "/nonexistent/netns", "127.0.0.1", "iptables")
    assert not result.confirmed and any("did not answer: is the mesh on?" in r for r in result.reasons)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_an_enrolled_pods_dns_goes_to_its_tunnels_dns_proxy_unless_it_opts_out(proto: str) -> None:
    """The in-pod rules capture port 53 (UDP and TCP) into the tunnel's DNS proxy, which answers it itself."""
    state = snapshot()
    trace = predict(state, "node1", given(state, "10.96.0.10", 53, proto=proto))
    assert trace.captured and trace.outcome == CONNECTED
    assert [h.address for h in trace.hops] == ["127.0.0.1:15053"] and trace.pods() == set()
    assert f"captured: DNS ({proto.upper()} 53)" in to_text(trace)
    opted_out = predict(state, "node1", given(state, "10.96.0.10", 53, proto=proto, dns_port=None))
    assert all(h.address != "127.0.0.1:15053" for h in opted_out.hops)
    # the eBPF capture takes it too (connect4/6, sendmsg4/6)
    ebpf = predict(state, "node1", given(state, "10.96.0.10", 53, proto=proto, mode="ebpf"))
    assert [h.address for h in ebpf.hops] == ["127.0.0.1:15053"]
