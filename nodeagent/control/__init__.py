"""The node-local control stream from the agent to the tunnel (`nodeagent/control/api/control.proto`)."""
