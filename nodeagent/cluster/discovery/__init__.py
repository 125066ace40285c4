"""Sources of cluster state: the Kubernetes API (`kubernetes`) and a manifests directory (`manifests`).

Both decode what they read and emit `nodeagent.cluster.events` to one sink, the change tracker.
"""
