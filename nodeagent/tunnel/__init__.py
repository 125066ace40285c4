"""The node tunnel: HBONE over mutual TLS with SPIFFE identities (DESIGN §4)."""
