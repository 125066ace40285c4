"""Adversarial tests: hostile peers and objects against the tunnel and the agent."""
