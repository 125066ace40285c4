"""Composition roots: each long-running command (`run`, `ztunnel`) is assembled here from the job packages, so
those packages never import each other's wiring.
"""
