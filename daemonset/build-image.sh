#!/usr/bin/env bash
# Build nodeagent's image from this checkout: stages only what the image needs (no .git, no .venv) and
# runs podman (or $BUILDER, e.g. docker or buildah) on daemonset/Containerfile.
#   daemonset/build-image.sh [IMAGE]          default IMAGE: localhost/nodeagent:<version>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILDER="${BUILDER:-podman}"
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/nodeagent/__init__.py")"
image="${1:-localhost/nodeagent:$version}"

command -v "$BUILDER" >/dev/null || { echo "build-image: $BUILDER not found (set BUILDER=docker to use docker)" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/daemonset/Containerfile" "$ROOT/daemonset/healthcheck.py" "$stage/"
cp -r "$ROOT/nodeagent" "$ROOT/bpf-src" "$stage/"
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$stage"/nodeagent.egg-info

# docker format keeps the HEALTHCHECK (the OCI image format has no place for it)
format=()
if [ "$(basename "$BUILDER")" != docker ]; then format=(--format docker); fi
"$BUILDER" build "${format[@]}" -t "$image" -f "$stage/Containerfile" "$stage"
echo "built $image"
