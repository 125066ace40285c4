"""The DNS proxy's counters, in the tunnel's registry (named as the tunnel's other metrics:
`nodeagent_tunnel_*`, counters exposed with `_total`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# How a question ended (the `outcome` label)
LOCAL = "local"            # answered from the tunnel's tables (including NXDOMAIN and NODATA)
FORWARDED = "forwarded"    # the pod's resolver answered, passed back
FAILED = "failed"          # no resolver answered in time: SERVFAIL
REFUSED = "refused"        # over the proxy's limit of forwards in flight: REFUSED
MALFORMED = "malformed"    # FORMERR or NOTIMP
OUTCOMES = (LOCAL, FORWARDED, FAILED, REFUSED, MALFORMED)


class DnsMetrics:
    """The collectors of one tunnel's DNS proxy."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("nodeagent_tunnel_dns_requests", "DNS questions from served pods, by how they "
                                "ended (local: from the tunnel's tables, including NXDOMAIN/NODATA; forwarded; "
                                "failed: SERVFAIL; refused: over the forward limit; malformed: FORMERR/NOTIMP), "
                                "question type and transport", ["outcome", "type", "protocol"], registry=registry)
        self.dropped = Counter("nodeagent_tunnel_dns_dropped", "DNS packets dropped without an answer (short, "
                               "oversize, a response, too many TCP connections)", ["reason"], registry=registry)
        self.in_flight = Gauge("nodeagent_tunnel_dns_forwards_in_flight", "DNS questions being forwarded now",
                               registry=registry)
        self.upstream_seconds = Counter("nodeagent_tunnel_dns_upstream_seconds", "Seconds spent waiting for "
                                        "upstream resolvers (with forwarded_total: their mean latency)",
                                        registry=registry)

    def count(self, outcome: str, rdtype: str, protocol: str) -> None:
        """One question ended so."""
        self.requests.labels(outcome=outcome, type=rdtype, protocol=protocol).inc()
