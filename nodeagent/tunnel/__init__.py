"""The node tunnel: HBONE over mutual TLS with SPIFFE identities (docs/security.md)."""
