"""What the node must do: the change tracker and its immutable snapshots, the translation of Services into ports
and endpoints, and the sync runner that paces datapath syncs.
"""
