"""What the control plane fills in, for objects written through the lab API server.

- `ServiceDefaults`: a Service created without a cluster IP gets one from the lab's service range, one per
  IP family as kube-apiserver gives them (ipFamilyPolicy, ipFamilies, clusterIPs: `nodeagent.lab.families`;
  a family the lab has no range for, or RequireDualStack in an IPv4-only lab, is refused with 422 as
  kube-apiserver refuses it), node ports for NodePort/LoadBalancer, and the defaults kube-apiserver applies
  (type, protocol, targetPort), so `kubectl create service` or `kubectl apply` of a bare Service gives the agent a
  routable Service, as on a cluster.
- `EndpointSliceController`: the endpoint-slice controller for changes made through the API: when a
  Pod or Service is written, the namespace's EndpointSlices are derived again from Services and Pods
  (`nodeagent.lab.endpoints.derive_endpoint_slices`, the same derivation `lab up` uses) and the
  controller's slices are created, updated or deleted through the store, so `kubectl delete pod`
  withdraws an endpoint and a labelled pod joins a Service. Changes applied from the lab's manifests
  file are left alone: that file carries its own slices (tests edit them directly).
"""

from __future__ import annotations

import json
import queue
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any

import structlog

from nodeagent.lab.apiserver.resources import RESOURCES
from nodeagent.lab.apiserver.store import Change, Store, invalid
from nodeagent.lab.endpoints import MANAGED_BY, MANAGED_BY_LABEL, derive_endpoint_slices
from nodeagent.lab.families import ServiceCIDRs, allocate_cluster_ips, init_ip_families, used_cluster_ips
from nodeagent.lab.topology import NODE_PORT_RANGE, Container, ContainerPort, LabPod

log = structlog.get_logger("nodeagent.lab.apiserver")
CONTROLLER = "controller"
_IGNORED_ORIGINS = frozenset({"manifests", CONTROLLER})


class ServiceDefaults:
    """Cluster IPs, node ports and defaults for new Services (call `apply` with the store's lock held)."""

    def __init__(self, store: Store, service_cidr: IPv4Network | ServiceCIDRs) -> None:
        self._store = store
        self._cidrs = service_cidr if isinstance(service_cidr, ServiceCIDRs) else ServiceCIDRs((service_cidr,))

    def apply(self, obj: dict[str, Any]) -> None:
        """Fill in `obj` (a Service about to be created) in place."""
        spec = obj.setdefault("spec", {})
        kind = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        services = list(self._store.objects["services"].values())
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        if kind == "ExternalName":
            return
        name = str((obj.get("metadata") or {}).get("name", ""))
        problems = init_ip_families(spec, self._cidrs) or allocate_cluster_ips(
            spec, self._cidrs, used_cluster_ips(services))
        if problems:
            # kube-apiserver's 422 names the field, the value and why (field.Invalid)
            field = problems[0].field
            value = spec.get(field.removeprefix("spec.").split("[")[0])
            raise invalid(RESOURCES["services"], name, field, "FieldValueInvalid",
                          f"Invalid value: {json.dumps(value)}: {problems[0].message}")
        if kind in ("NodePort", "LoadBalancer"):
            taken = {p.get("nodePort") for s in services for p in s.get("spec", {}).get("ports") or []}
            for port in spec.get("ports") or []:
                if isinstance(port, dict) and not port.get("nodePort"):
                    port["nodePort"] = next(n for n in NODE_PORT_RANGE if n not in taken)
                    taken.add(port["nodePort"])


def _pod_view(pod: dict[str, Any]) -> LabPod | None:
    """A stored Pod as the derivation reads pods (None without an IP: not an endpoint yet)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    try:
        ip = ip_address(status.get("podIP") or "")
    except ValueError:
        return None
    if not isinstance(ip, IPv4Address) or meta.get("deletionTimestamp"):
        return None
    ip6 = None
    for entry in status.get("podIPs") or []:  # a dual-stack pod's second address
        try:
            other = ip_address(entry.get("ip") or "") if isinstance(entry, dict) else None
        except ValueError:
            continue
        if isinstance(other, IPv6Address):
            ip6 = other
    containers = tuple(Container(name=str(c.get("name", "")), argv=(), ports=tuple(
        ContainerPort(int(p["containerPort"]), str(p.get("protocol", "TCP")), p.get("name"))
        for p in c.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("containerPort"), int)))
        for c in spec.get("containers") or [] if isinstance(c, dict))
    return LabPod(namespace=str(meta.get("namespace", "default")), name=str(meta.get("name", "")),
                  node=str(spec.get("nodeName") or ""), ip=ip, labels=dict(meta.get("labels") or {}),
                  containers=containers, ip6=ip6)


def _service_view(service: dict[str, Any]) -> dict[str, Any]:
    """A stored Service with the defaults the derivation relies on (protocol and targetPort per port)."""
    spec = dict(service.get("spec") or {})
    spec["ports"] = [{**p, "protocol": p.get("protocol", "TCP"), "targetPort": p.get("targetPort", p.get("port"))}
                     for p in spec.get("ports") or [] if isinstance(p, dict)]
    return {**service, "spec": spec}


def _content(endpoint_slice: dict[str, Any]) -> tuple[Any, ...]:
    return (endpoint_slice.get("addressType"), endpoint_slice.get("endpoints"), endpoint_slice.get("ports"),
            (endpoint_slice.get("metadata") or {}).get("labels"))


class EndpointSliceController:
    """See the module doc; runs on its own thread from `start()` to `stop()`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._namespaces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="endpointslice-controller", daemon=True)
        store.observers.append(self._observe)

    def _observe(self, change: Change) -> None:
        if change.plural in ("pods", "services") and change.origin not in _IGNORED_ORIGINS:
            self._namespaces.put((change.obj.get("metadata") or {}).get("namespace", "default"))

    def start(self) -> EndpointSliceController:
        """Start reconciling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current reconciliation."""
        self._namespaces.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            namespace = self._namespaces.get()
            pending = {namespace}
            while not self._namespaces.empty():  # a burst of writes: one reconciliation per namespace
                pending.add(self._namespaces.get())
            for name in sorted(n for n in pending if n is not None):
                try:
                    self.reconcile(name)
                except Exception:  # a bug here must not stop the controller; the next change retries
                    log.exception("endpointslices.reconcile.failed", namespace=name)
            if None in pending:
                return

    def reconcile(self, namespace: str) -> int:
        """Make the controller's EndpointSlices of `namespace` what its Services and Pods imply; how many
        slices it wrote or deleted."""
        slices_resource = RESOURCES["endpointslices"]
        with self._store.lock:
            services = [_service_view(s) for (ns, _), s in self._store.objects["services"].items() if ns == namespace]
            pods = [v for (ns, _), p in self._store.objects["pods"].items() if ns == namespace
                    if (v := _pod_view(p)) is not None]
            current = [s for (ns, _), s in self._store.objects["endpointslices"].items() if ns == namespace]
            managed = {s["metadata"]["name"]: s for s in current
                       if (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY}
            foreign = [s for s in current if s["metadata"]["name"] not in managed]
            writes = 0
            for wanted in derive_endpoint_slices(services, pods, foreign):
                existing = managed.pop(wanted["metadata"]["name"], None)
                if existing is None:
                    self._store.upsert(slices_resource, wanted, origin=CONTROLLER)
                elif _content(existing) != _content(wanted):
                    self._store.upsert(slices_resource, {**wanted, "metadata": {
                        **existing["metadata"], "labels": wanted["metadata"]["labels"]}}, origin=CONTROLLER)
                else:
                    continue
                writes += 1
            for name in managed:  # slices of Services that are gone or select nothing now
                self._store.delete(slices_resource, namespace, name, origin=CONTROLLER)
                writes += 1
        if writes:
            log.info("endpointslices.reconciled", namespace=namespace, writes=writes)
        return writes
