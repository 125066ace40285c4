"""The eBPF service datapath: cgroup socket-LB for ClusterIP and tc for NodePort, fed from the same translation as
iptables.
"""
