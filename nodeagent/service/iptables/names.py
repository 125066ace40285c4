"""kube-proxy's chain names, built exactly as `pkg/proxy/iptables/proxier.go` builds them.

A Service port's chains share one hash: the first 16 characters of base32(sha256(port name +
lower-case protocol)), e.g. `ns1/svc1:p80` + `tcp` -> `XPGD46QRK7WJZT7O`. An endpoint chain hashes
the endpoint (`ip:port`) in as well. Same input, same names as on a kube-proxy node.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
KUBELET_FIREWALL = "KUBE-FIREWALL"

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)


def _hash16(text: str) -> str:
    # 16 base32 characters are exactly the first 80 bits (10 bytes): encoding only those gives the same
    # prefix at a third of the cost, which matters at 100,000 endpoint chains per full render.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


@lru_cache(maxsize=65536)
def port_proto_hash(service_port: str, protocol: str) -> str:
    """The hash shared by a Service port's SVC/SVL/EXT/FW chains."""
    return _hash16(service_port + protocol)


def cluster_chain(service_port: str, protocol: str) -> str:
    """KUBE-SVC-…: dispatch to the endpoints used with Cluster traffic policy."""
    return SVC_PREFIX + port_proto_hash(service_port, protocol)


def local_chain(service_port: str, protocol: str) -> str:
    """KUBE-SVL-…: dispatch to this node's endpoints, for Local traffic policy."""
    return SVL_PREFIX + port_proto_hash(service_port, protocol)


def firewall_chain(service_port: str, protocol: str) -> str:
    """KUBE-FW-…: loadBalancerSourceRanges filtering."""
    return FW_PREFIX + port_proto_hash(service_port, protocol)


def external_chain(service_port: str, protocol: str) -> str:
    """KUBE-EXT-…: NodePort, externalIP and load-balancer traffic."""
    return EXT_PREFIX + port_proto_hash(service_port, protocol)


def endpoint_chain(service_port: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-…: masquerade hairpin traffic and DNAT to one endpoint (`ip:port`)."""
    return SEP_PREFIX + _hash16(service_port + protocol + endpoint)


def is_service_chain(chain: str) -> bool:
    """Whether `chain` is a per-service chain the proxy owns (and may delete when stale)."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)
