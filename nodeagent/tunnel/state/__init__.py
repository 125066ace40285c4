"""The tunnel's tables, built from snapshots: workloads, Services with their mesh configuration, authorization. Pure."""
