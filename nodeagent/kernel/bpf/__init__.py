"""eBPF: the only package that loads programs into the kernel (bcc, and raw bpf(2) for probes and pins)."""
