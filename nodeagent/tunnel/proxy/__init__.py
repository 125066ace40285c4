"""The tunnel's proxies: one node tunnel serving each pod's inbound and outbound listeners, the outbound path and
inbound admission.
"""
