"""Kubernetes objects as the API server serves them (raw JSON dicts), for tests and benchmarks."""

from __future__ import annotations

from typing import Any


def service(name: str, namespace: str = "shop", cluster_ip: str = "10.96.0.10", *,
            ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A Service; by default ClusterIP with one port `http` 80 -> 8080."""
    body: dict[str, Any] = {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                            "ports": ports if ports is not None else
                            [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                            "selector": {"app": name}}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": body}


def endpoint(ip: str, node: str = "node1", *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, pod: str | None = None) -> dict[str, Any]:
    """One EndpointSlice endpoint; conditions left out when None, as the API allows."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    body: dict[str, Any] = {"addresses": [ip], "conditions": conditions, "nodeName": node}
    if pod is not None:
        body["targetRef"] = {"kind": "Pod", "name": pod}
    return body


def endpoint_slice(name: str, service_name: str, endpoints: list[dict[str, Any]], namespace: str = "shop", *,
                   ports: list[dict[str, Any]] | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    """An EndpointSlice of `service_name`; by default one port `http` 8080."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type, "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def pod(name: str, ip: str, node: str = "node1", namespace: str = "shop", **labels: str) -> dict[str, Any]:
    """A running pod."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "ports": [{"name": "http",
                                                                                "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def node(name: str, ip: str, pod_cidr: str) -> dict[str, Any]:
    """A node with one InternalIP and one pod CIDR."""
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    """A namespace."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def scale_cluster(services: int, endpoints_per_service: int = 10) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`services` Services with one slice each of `endpoints_per_service` ready endpoints (the benchmark's shape).

    Addresses are unique up to 65,536 Services and 100 endpoints each.
    """
    svcs = [service(f"svc-{i}", "bench", f"10.96.{(i >> 8) & 255}.{i & 255}") for i in range(services)]
    return svcs, [scale_slice(i, endpoints_per_service) for i in range(services)]


def scale_slice(i: int, endpoints_per_service: int = 10) -> dict[str, Any]:
    """The EndpointSlice of Service `svc-{i}` of `scale_cluster`."""
    name = f"svc-{i}"
    eps = [endpoint(f"10.{100 + j}.{(i >> 8) & 255}.{i & 255}", f"node{j % 3}", pod=f"{name}-{j}")
           for j in range(endpoints_per_service)]
    return endpoint_slice(f"{name}-abcde", name, eps, "bench")
