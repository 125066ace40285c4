"""The kinds the lab API server serves, and the discovery documents that tell clients about them.

Discovery is what `kubectl` reads before anything else (`/api`, `/apis`, `/api/v1`, `/apis/<g>/<v>`):
without a kind in an APIResourceList, `kubectl get <kind>` says "the server doesn't have a resource
type". The aggregated form (apidiscovery.k8s.io/v2) is served too, because kubectl 1.32 asks for it
first and a server that has it saves the per-group round trips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nodeagent.cluster.model import MESH_GROUP

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-nodeagent-lab", "gitCommit": "",
                  "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "go1.23",
                  "compiler": "gc", "platform": "linux/amd64"}
READ_VERBS = ("get", "list", "watch")
WRITE_VERBS = ("create", "update", "patch", "delete")


@dataclass(frozen=True)
class ApiResource:
    """One kind: where it lives (group/version), its plural and whether it is namespaced."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = READ_VERBS + WRITE_VERBS

    @property
    def api_version(self) -> str:
        """`v1` for the core group, `<group>/<version>` otherwise."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        """The group/version path prefix: /api/v1 or /apis/<group>/<version>."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def singular(self) -> str:
        """The singular name (lower-case kind), as discovery reports it."""
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """How the real server names the resource in messages: `pods`, `endpointslices.discovery.k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery_entry(self) -> dict[str, Any]:
        """The resource's entry in an APIResourceList."""
        entry: dict[str, Any] = {"name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
                                 "kind": self.kind, "verbs": list(self.verbs)}
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.group in ("", "discovery.k8s.io"):
            entry["categories"] = ["all"] if self.kind in ("Pod", "Service") else []
        return entry


RESOURCES: dict[str, ApiResource] = {r.plural: r for r in (
    ApiResource("", "v1", "services", "Service", True, ("svc",)),
    ApiResource("", "v1", "pods", "Pod", True, ("po",)),
    ApiResource("", "v1", "nodes", "Node", False, ("no",)),
    ApiResource("", "v1", "namespaces", "Namespace", False, ("ns",)),
    ApiResource("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    ApiResource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    # The agent reads its policies from its own group (nodeagent.cluster.discovery.wire.RESOURCES); it decodes
    # objects written for security.istio.io too, so the lab stores those under the agent's group.
    ApiResource(MESH_GROUP, "v1", "authorizationpolicies", "AuthorizationPolicy", True, ("ap",)),
    ApiResource(MESH_GROUP, "v1", "peerauthentications", "PeerAuthentication", True, ("pa",)),
)}
PLURAL_OF_KIND = {r.kind: r.plural for r in RESOURCES.values()}
# TokenReview is create-only and stores nothing: it is answered, not kept (see http.py).
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
TOKEN_REVIEW = ApiResource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, (), ("create",))
# `kubectl auth can-i`: the token is the lab's admin (no RBAC beyond it), so every review is allowed.
ACCESS_REVIEW_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
ACCESS_REVIEW = ApiResource("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                            False, (), ("create",))


def _groups(resources: Iterable[ApiResource]) -> dict[str, list[ApiResource]]:
    groups: dict[str, list[ApiResource]] = {}
    for resource in resources:
        groups.setdefault(resource.group, []).append(resource)
    return groups


def served(mesh: bool) -> list[ApiResource]:
    """The resources served (the mesh CRDs only when `mesh`: a cluster may not have them installed)."""
    kinds = [r for r in RESOURCES.values() if mesh or r.group != MESH_GROUP]
    return [*kinds, TOKEN_REVIEW, ACCESS_REVIEW]


def api_versions(address: str) -> dict[str, Any]:
    """`/api`: the core group's versions."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]}


def resource_list(group_version: str, resources: Iterable[ApiResource]) -> dict[str, Any] | None:
    """`/api/v1` or `/apis/<group>/<version>`: an APIResourceList (None if nothing is served there)."""
    entries = [r.discovery_entry() for r in resources if r.api_version == group_version]
    if not entries:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries}


def _group(name: str, version: str) -> dict[str, Any]:
    gv = {"groupVersion": f"{name}/{version}", "version": version}
    return {"name": name, "versions": [gv], "preferredVersion": gv}


def group_list(resources: Iterable[ApiResource]) -> dict[str, Any]:
    """`/apis`: every named group."""
    groups = [_group(name, members[0].version) for name, members in _groups(resources).items() if name]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def group(name: str, resources: Iterable[ApiResource]) -> dict[str, Any] | None:
    """`/apis/<group>`: one group (None if not served)."""
    members = _groups(resources).get(name)
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, members[0].version)} if members and name else None


def aggregated(resources: Iterable[ApiResource], core: bool) -> dict[str, Any]:
    """apidiscovery.k8s.io/v2 APIGroupDiscoveryList of the core group (`core`, for /api) or the named groups."""
    items = []
    for name, members in _groups(resources).items():
        if bool(name) == core:
            continue
        items.append({
            "metadata": {"name": name, "creationTimestamp": None},
            "versions": [{
                "version": members[0].version,
                "freshness": "Current",
                "resources": [{
                    "resource": r.plural, "singularResource": r.singular,
                    "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                    "scope": "Namespaced" if r.namespaced else "Cluster", "verbs": list(r.verbs),
                    **({"shortNames": list(r.short_names)} if r.short_names else {}),
                    **({"categories": ["all"]} if r.kind in ("Pod", "Service") else {}),
                } for r in members],
            }],
        })
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}


def openapi_root(resources: Iterable[ApiResource]) -> dict[str, Any]:
    """`/openapi/v3`: where each group/version's document is. kubectl reads it before `create`/`replace`/
    `patch` to learn whether the server validates fields itself (the `fieldValidation` parameter)."""
    versions = sorted({r.prefix.lstrip("/") for r in resources})
    return {"paths": {v: {"serverRelativeURL": f"/openapi/v3/{v}?hash=lab"} for v in versions}}


def _operation(resource: ApiResource, action: str) -> dict[str, Any]:
    parameters = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
                  {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]
    return {"x-kubernetes-action": action, "parameters": parameters, "responses": {},
            "x-kubernetes-group-version-kind": {"group": resource.group, "version": resource.version,
                                                "kind": resource.kind}}


def openapi_document(group_version_path: str, resources: Iterable[ApiResource]) -> dict[str, Any] | None:
    """`/openapi/v3/<api/v1 | apis/g/v>`: the paths of the group/version's kinds with the operations and
    parameters clients look for (no schemas: the lab validates nothing beyond names)."""
    members = [r for r in resources if r.prefix.lstrip("/") == group_version_path and "create" in r.verbs]
    if not members:
        return None
    paths: dict[str, Any] = {}
    for r in members:
        scope = f"{r.prefix}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else f"{r.prefix}/{r.plural}"
        paths[scope] = {"post": _operation(r, "post"), "get": _operation(r, "list")}
        paths[scope + "/{name}"] = {action: _operation(r, action) for action in ("get", "put", "patch", "delete")}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (nodeagent lab)", "version": "v1.32.0"},
            "paths": paths, "components": {"schemas": {}}}
