"""nodeagent: a Kubernetes node agent that replaces kube-proxy and joins the node to an L4 mesh."""

__version__ = "0.1.0"
