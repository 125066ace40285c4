"""The lab's Kubernetes API server: real clients (kubectl, the official Python client, the agent) work
against it unchanged.

- `resources`: the kinds served and their discovery documents (plain and aggregated);
- `store`: objects, the global resourceVersion, history, consistent list snapshots, watches with
  selector transitions, writes with the server's bookkeeping and errors;
- `selectors`, `patch`, `tables`: label/field selectors, PATCH bodies, server-side printing;
- `http`: routing, authentication, content negotiation, chunked watch streams;
- `server`: lifecycle, kubeconfig, fault injection; `tls`: its CA and serving certificate;
- `process`: `nodeagent lab apiserver`, the server as the lab runs it.
Not a goal: persistence, admission, RBAC beyond the bearer token.
"""

from nodeagent.lab.apiserver.resources import PLURAL_OF_KIND, RESOURCES, ApiResource
from nodeagent.lab.apiserver.server import LabApiServer
from nodeagent.lab.apiserver.store import ApiError

__all__ = ["PLURAL_OF_KIND", "RESOURCES", "ApiError", "ApiResource", "LabApiServer"]
