"""The mesh's node side: which pods are enrolled, what capture each needs, and the reconciler that installs it,
with `iptables` and `ebpf` as the two capture mechanisms.
"""
