#!/usr/bin/env bash
# Regenerate nodeagent/control/api/*_pb2*.py from the .proto files (grpcio-tools, from the dev dependencies).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../nodeagent/control/api"
for proto in *.proto; do
  ../../../.venv/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. "$proto"
  module="${proto%.proto}"
  sed -i "s/^import ${module}_pb2 as/from nodeagent.control.api import ${module}_pb2 as/" "${module}_pb2_grpc.py"
  # protoc 7 leaves the well-known types' imports out; the descriptor pool needs them loaded first
  if grep -q 'google/protobuf/struct.proto' "${module}_pb2.py" && ! grep -q '^from google.protobuf import struct_pb2' "${module}_pb2.py"; then
    sed -i 's/^_sym_db = _symbol_database.Default()/from google.protobuf import struct_pb2  # noqa: F401\n\n&/' "${module}_pb2.py"
  fi
done
