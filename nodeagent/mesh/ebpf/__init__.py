"""Mesh capture in eBPF mode: cgroup socket hooks and tc on the pod's interface, pinned programs and per-pod
configuration.
"""
