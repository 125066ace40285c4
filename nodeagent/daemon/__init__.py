"""Composition roots: each long-running command is assembled here from the job packages, so those packages
never import each other's wiring and the CLI only parses flags into options. `run` (the agent: the datapath
chosen, the mesh wired to the control stream), `tunnel` (`ztunnel`), `ca`; `agent` and `mesh` are the
agent's loops; `sources` picks where objects come from.
"""
