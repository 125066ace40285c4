#!/usr/bin/env bash
# README command 1: set up what is missing, then run the lab demo on the built-in default cluster.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" --check 2>/dev/null || "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/nodeagent" lab demo "$@"
