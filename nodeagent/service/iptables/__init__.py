"""The iptables service datapath: kube-proxy's iptables mode, rule for rule."""
