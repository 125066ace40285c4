"""The nftables datapath: kube-proxy's nftables proxier (pkg/proxy/nftables) rule for rule."""
