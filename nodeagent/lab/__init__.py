"""The local lab: a small cluster of network namespaces and cgroups on one machine, built from manifests.

Pure modules (manifests, topology, endpoints, plan) decide what a lab is; thin modules (netns, cgroups,
processes, state) touch the kernel and the disk; `lab` orchestrates them.
"""
