"""kube-apiserver's IP family defaulting and cluster IP allocation (nodeagent.lab.families), and the lab API
server's Service defaults built on it."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest

from nodeagent.lab.apiserver.controllers import ServiceDefaults
from nodeagent.lab.apiserver.resources import RESOURCES
from nodeagent.lab.apiserver.store import ApiError, Store
from nodeagent.lab.families import ServiceCIDRs, allocate_cluster_ips, init_ip_families

DUAL = ServiceCIDRs.parse("10.96.0.0/12,fd00:10:96::/112")
SINGLE = ServiceCIDRs.parse("10.96.0.0/12")
SIX_FIRST = ServiceCIDRs.parse("fd00:10:96::/112,10.96.0.0/12")


def filled(spec: dict[str, Any], cidrs: ServiceCIDRs) -> dict[str, Any]:
    assert init_ip_families(spec, cidrs) == []
    assert allocate_cluster_ips(spec, cidrs, set()) == []
    return spec


def test_parse_refuses_two_of_a_family() -> None:
    with pytest.raises(ValueError):
        ServiceCIDRs.parse("10.96.0.0/12,10.97.0.0/16")
    assert str(DUAL) == "10.96.0.0/12,fd00:10:96::/112" and DUAL.primary == 4 and SIX_FIRST.primary == 6


def test_headless_without_selector_defaults_to_require_dual_stack() -> None:
    spec = filled({"clusterIP": "None"}, DUAL)
    assert (spec["ipFamilyPolicy"], spec["ipFamilies"], spec["clusterIPs"]) == (
        "RequireDualStack", ["IPv4", "IPv6"], ["None"])
    # upstream lets it carry both families even where the cluster has one
    assert filled({"clusterIP": "None"}, SINGLE)["ipFamilies"] == ["IPv4", "IPv6"]
    # with a selector it is single-stack
    spec = filled({"clusterIP": "None", "selector": {"a": "b"}}, DUAL)
    assert (spec["ipFamilyPolicy"], spec["ipFamilies"]) == ("SingleStack", ["IPv4"])


def test_the_primary_family_is_the_first_service_cidr() -> None:
    spec = filled({"ipFamilyPolicy": "PreferDualStack"}, SIX_FIRST)
    assert spec["ipFamilies"] == ["IPv6", "IPv4"] and spec["clusterIP"] == "fd00:10:96::a"


def test_allocation_skips_used_addresses_and_external_names_get_nothing() -> None:
    used = {"10.96.0.10", "fd00:10:96::a"}
    spec: dict[str, Any] = {"ipFamilyPolicy": "RequireDualStack"}
    assert init_ip_families(spec, DUAL) == [] and allocate_cluster_ips(spec, DUAL, used) == []
    assert spec["clusterIPs"] == ["10.96.0.11", "fd00:10:96::b"]
    assert {"10.96.0.11", "fd00:10:96::b"} <= used
    external: dict[str, Any] = {"type": "ExternalName", "externalName": "x.example"}
    assert filled(external, DUAL) == {"type": "ExternalName", "externalName": "x.example"}


def test_a_cluster_ip_outside_its_range_is_refused() -> None:
    spec: dict[str, Any] = {"clusterIP": "10.200.0.1"}
    assert init_ip_families(spec, DUAL) == []
    (problem,) = allocate_cluster_ips(spec, DUAL, set())
    assert problem.field == "spec.clusterIPs[0]" and "not in the IPv4 service CIDR" in problem.message


def test_a_mismatched_family_is_refused() -> None:
    (problem,) = init_ip_families({"clusterIP": "10.96.0.20", "ipFamilies": ["IPv6"]}, DUAL)
    assert problem.field == "spec.clusterIPs[0]"


def api_create(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    return store.create(RESOURCES["services"], "default", body)


@pytest.mark.parametrize(("cidr", "policy", "families", "ips"), [
    (IPv4Network("10.96.0.0/12"), None, ["IPv4"], ["10.96.0.10"]),
    (DUAL, "PreferDualStack", ["IPv4", "IPv6"], ["10.96.0.10", "fd00:10:96::a"]),
    (IPv4Network("10.96.0.0/12"), "PreferDualStack", ["IPv4"], ["10.96.0.10"]),
])
def test_the_api_servers_service_defaults(cidr: Any, policy: str | None, families: list[str], ips: list[str]) -> None:
    store = Store()
    defaults = ServiceDefaults(store, cidr)
    store.on_create.append(lambda resource, obj: defaults.apply(obj) if resource.kind == "Service" else None)
    spec: dict[str, Any] = {"ports": [{"port": 80}], "selector": {"app": "web"}}
    if policy:
        spec["ipFamilyPolicy"] = policy
    created = api_create(store, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec})
    assert (created["spec"]["ipFamilies"], created["spec"]["clusterIPs"]) == (families, ips)
    again = api_create(store, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web2"},
                               "spec": dict(spec, ports=[{"port": 80}])})
    assert again["spec"]["clusterIPs"][0] != ips[0]


def test_the_api_server_refuses_require_dual_stack_on_an_ipv4_cluster() -> None:
    store = Store()
    defaults = ServiceDefaults(store, IPv4Network("10.96.0.0/12"))
    store.on_create.append(lambda resource, obj: defaults.apply(obj) if resource.kind == "Service" else None)
    with pytest.raises(ApiError) as caught:
        api_create(store, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                           "spec": {"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}})
    assert caught.value.code == 422
    assert 'Service "web" is invalid: spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is ' \
           "not configured for dual-stack services" in str(caught.value)


def test_the_node_table_shows_the_first_internal_ip() -> None:
    """kubectl's Node printer (getNodeInternalIP) takes the first InternalIP: a dual-stack node shows IPv4."""
    from nodeagent.lab.apiserver.tables import PRINTERS

    _, row = PRINTERS["Node"]
    node = {"metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "172.18.0.2"}, {"type": "InternalIP", "address": "fd00:18::2"}]}}
    assert "172.18.0.2" in row(node) and "fd00:18::2" not in row(node)
