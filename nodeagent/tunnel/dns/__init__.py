"""The tunnel's DNS proxy for enrolled pods: names the tunnel's tables hold answered locally (`records`, pure),
the wire format (`wire`, pure), the per-pod server and forwarder (`server`), the pod opt-out (`annotations`)."""

from nodeagent.tunnel.dns.annotations import DNS_CAPTURE, dns_capture_enabled

__all__ = ["DNS_CAPTURE", "dns_capture_enabled"]
