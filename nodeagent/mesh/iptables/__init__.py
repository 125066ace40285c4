"""Mesh capture in iptables mode: the rules inside each enrolled pod's network namespace that send its TCP
to the node tunnel (15001 out, 15006 plaintext in, 15008 HBONE untouched), and the node's probe SNAT.

`render` and `rules` are pure (so are `nodeagent.mesh.capture` and `nodeagent.mesh.annotations`, shared with the
eBPF capture); `apply` reads and writes the namespaces; `capture` is the adapter the mesh reconciler drives.
"""
