"""kube-proxy's nftables names, built as `pkg/proxy/nftables/proxier.go` builds them.

Everything lives in one table, `kube-proxy`, of family `ip` or `ip6`. A Service port's chains are
`service-`, `local-`, `external-` and `firewall-` + `HASH-namespace/name/protocol/port`; an endpoint's chain
and affinity set are `endpoint-` / `affinity-` + `HASH-namespace/name/protocol/port__ip/port` (IPv6 colons
become dots). HASH is the first 8 characters of base32(sha256(the rest)) (`hashAndTruncate`).
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"

# base chains (proxier.go nftablesBaseChains)
FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_FORWARD = "filter-forward"
FILTER_INPUT = "filter-input"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_IPS = "cluster-ips"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

CLUSTER_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"
FIREWALL_PREFIX = "firewall-"

# knftables.NameLengthMax (256) less the longest prefix with its hyphen (chainNamePrefixLengthMax, 16)
NAME_LENGTH_MAX = 256
BASE_LENGTH_MAX = NAME_LENGTH_MAX - 16


def hash_and_truncate(name: str) -> str:
    """kube-proxy's `hashAndTruncate`: `HASH-name`, cut to 240 characters ending in `...` when longer."""
    encoded = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()
    name = encoded[:8] + "-" + name
    if len(name) > BASE_LENGTH_MAX:
        name = name[:BASE_LENGTH_MAX - 3] + "..."
    return name


@lru_cache(maxsize=65536)
def port_base(namespace: str, service: str, protocol: str, port: str) -> str:
    """`servicePortChainNameBase`: e.g. `ULMVA6XW-ns1/svc1/tcp/p80`."""
    return hash_and_truncate(f"{namespace}/{service}/{protocol}/{port}")


def endpoint_base(namespace: str, service: str, protocol: str, port: str, endpoint: str) -> str:
    """`servicePortEndpointChainNameBase` of an endpoint written `ip:port` or `[ip6]:port`."""
    host, _, endpoint_port = endpoint.rpartition(":")
    host = host.strip("[]").replace(":", ".")
    return hash_and_truncate(f"{namespace}/{service}/{protocol}/{port}__{host}/{endpoint_port}")


def is_service_chain(chain: str) -> bool:
    """`isServiceChainName`: per-service and per-endpoint chains hold a "/", the fixed chains none."""
    return "/" in chain


def is_affinity_set(name: str) -> bool:
    """`isAffinitySetName`."""
    return name.startswith(AFFINITY_PREFIX)
