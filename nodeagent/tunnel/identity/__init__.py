"""The tunnel's side of workload identity: certificates per identity over time and the TLS contexts they make."""
