"""The one layer that touches the kernel: network namespaces, the netfilter binaries, conntrack, and eBPF
(syscalls, loading, pinning, tc and cgroup attachment).
"""
