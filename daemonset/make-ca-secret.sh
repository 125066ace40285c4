#!/usr/bin/env bash
# The mesh CA: Secret nodeagent/nodeagent-ca holding Istio's plug-in CA files (root-cert.pem,
# ca-cert.pem, ca-key.pem), mounted by the CA Deployment only (daemonset/base/ca.yaml), and ConfigMap
# nodeagent/nodeagent-ca-root-cert holding root-cert.pem alone, which the tunnels trust (as Istio
# publishes istio-ca-root-cert). No node ever receives the key.
#   daemonset/make-ca-secret.sh                # a new CA (made by nodeagent's own CA code), applied
#   daemonset/make-ca-secret.sh --from DIR     # your CA files (e.g. an intermediate of your own PKI)
#   daemonset/make-ca-secret.sh --print [...]  # print the Secret and the ConfigMap instead of applying them
# A new CA needs Python with nodeagent importable: $PYTHON (default: .venv/bin/python of this checkout,
# else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
from="" print=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    --print) print=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "make-ca-secret: unknown argument $1" >&2; exit 2 ;;
  esac
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$from" ]; then
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then python="$ROOT/.venv/bin/python"; else python=python3; fi
  fi
  from="$work/ca"
  "$python" -c 'import sys; from pathlib import Path
from nodeagent.ca.identity import CertificateAuthority
CertificateAuthority.load_or_create(Path(sys.argv[1]))' "$from"
fi
for f in root-cert.pem ca-cert.pem ca-key.pem; do
  [ -s "$from/$f" ] || { echo "make-ca-secret: $from/$f is missing or empty" >&2; exit 1; }
done

secret() {
  kubectl create secret generic nodeagent-ca --namespace nodeagent --dry-run=client -o yaml \
    --from-file=root-cert.pem="$from/root-cert.pem" --from-file=ca-cert.pem="$from/ca-cert.pem" \
    --from-file=ca-key.pem="$from/ca-key.pem"
}
root() {
  kubectl create configmap nodeagent-ca-root-cert --namespace nodeagent --dry-run=client -o yaml \
    --from-file=root-cert.pem="$from/root-cert.pem"
}
if [ "$print" = 1 ]; then secret; echo ---; root; exit 0; fi
kubectl create namespace nodeagent --dry-run=client -o yaml | kubectl apply -f -
secret | kubectl apply -f -
root | kubectl apply -f -
