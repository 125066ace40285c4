"""HBONE: HTTP/2 CONNECT over mutual TLS between node tunnels."""
