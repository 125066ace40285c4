"""kube-proxy's job: Services and their endpoints turned into the node's datapath. The shared half (proxy
configuration, topology and endpoint choice, the datapath protocol) lives here; `iptables` and `ebpf` are the
two mechanisms.
"""
