"""The mesh CA as its own process (`nodeagent ca`): the only holder of the signing key, off the nodes."""
