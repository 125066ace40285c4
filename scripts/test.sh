#!/usr/bin/env bash
# README command 2: set up what is missing, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" --check 2>/dev/null || "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Two workers, whole modules each (a module's lab fixture lives on one worker); NODEAGENT_TEST_WORKERS=0 runs
# everything in this process.
workers="${NODEAGENT_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then exec "$ROOT/.venv/bin/python" -m pytest "$@"; fi
exec "$ROOT/.venv/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
