"""`nodeagent inspect`: one pod's identity, enrollment, datapath, capture as installed, tunnel and the Services
it reaches, with every difference between desired and live state marked.

`model`, `build`, `paths` and `output` are pure (report dataclasses, drift and translation paths computed from
the same render functions the datapath uses, the human/JSON/YAML renderers); `gather` reads the agent (over the
control socket), the tunnel (its config dump, inside the node's network namespace) and the kernel.
"""
