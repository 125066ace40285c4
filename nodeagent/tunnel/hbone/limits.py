"""HBONE's numbers: windows and frame sizes, the bounds on what a peer may make the server do, the timeouts,
the tunnel's socket mark, and the reasons a refusal is counted under (`VIOLATIONS`).

Windows are ztunnel's: 4 MiB per stream, 16 MiB per connection. What each bound guards against is told
in `server`'s module doc (the server side applies them; `framing` screens frames with those that a frame
header alone decides).
"""

from __future__ import annotations

STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = (1 << 24) - 1  # the largest frame we accept (RFC 9113's maximum): peers may send whole reads
SEND_FRAME = 256 << 10  # the largest frame we send: a TCP read (uvloop and asyncio read up to 256 KiB)
MAX_HEADER_LIST = 16 << 10
MAX_STREAMS = 100
SOCKET_MARK = 0x539  # every socket the tunnel opens toward the network (excluded from capture)
READ_CHUNK = 256 << 10
TLS_READ_BUFFER = 256 << 10
TLS_WRITE_HIGH = 1 << 20  # above this much unsent TLS data, local transports stop being read
ACK_BATCH = 64 << 10  # received bytes acknowledged together (at most this much per stream held back)

# Bounds on what a peer may make the server do (see server's module doc; the reasons are VIOLATIONS).
MAX_HEADER_BLOCK = MAX_HEADER_LIST + 256  # encoded bytes of one header block, padding included
MAX_CONTINUATIONS = 16  # CONTINUATION frames per header block (h2 allows 64, each up to MAX_FRAME)
MAX_CONTROL_FRAME = 16 << 10  # payload of any frame but DATA and header blocks (a GOAWAY's debug data)
FLOOD_WINDOW = 10.0  # seconds over which the budgets below are counted
PING_BUDGET = 100  # PINGs per window (a keepalive is one per 30 s; each is answered at once)
SETTINGS_BUDGET = 100  # SETTINGS frames per window (a peer sends one, plus its ACKs)
CONTROL_BUDGET = 1000  # other non-DATA frames but RST_STREAM / WINDOW_UPDATE, and empty DATA frames
RESET_BUDGET = 2 * MAX_STREAMS  # streams the peer resets prematurely, per window
PREMATURE_RESET = 1.0  # a stream reset by the peer within this many seconds of its HEADERS is premature (Envoy's
                       # overload.premature_reset_min_stream_lifetime_seconds default)
REFUSED_BUDGET = 2 * MAX_STREAMS  # streams refused (over the stream limits), per window
MAX_PENDING_OPENS = MAX_STREAMS  # upstream connects in flight per connection
HANDSHAKE_TIMEOUT = 10.0  # a TLS handshake not done by then is aborted
REQUEST_TIMEOUT = 10.0  # the first CONNECT after the handshake, and any header block, complete by then
IDLE_TIMEOUT = 3600.0  # a connection without streams this long is closed (GOAWAY NO_ERROR)

# Every `reason` the server reports, for the metric's documentation and the tests.
VIOLATIONS = (
    # TLS and identity (tls.handshake_failure, tls.PeerRefused)
    "tls_version", "no_client_certificate", "certificate_untrusted", "certificate_expired",
    "certificate_not_yet_valid", "handshake_timeout", "handshake_aborted", "tls_handshake", "alpn", "identity",
    "trust_domain",
    # HTTP/2
    "preface", "preface_timeout", "request_timeout", "header_timeout", "header_list_too_large",
    "continuation_flood", "frame_too_large", "settings_flood", "ping_flood", "control_frame_flood",
    "empty_frame_flood", "window_update_flood", "rapid_reset", "max_streams", "refused_stream_flood",
    "stream_id", "flow_control", "protocol_error",
)
