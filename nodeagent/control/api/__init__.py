"""gRPC APIs of the agent: .proto sources and their generated modules (regenerate with scripts/protoc.sh)."""
