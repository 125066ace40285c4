#!/usr/bin/env bash
# A worker: join the cluster, pinning the cluster CA that the Vagrantfile made (no trust on first use).
# Environment (from the Vagrantfile): CONTROL_PLANE_IP. Safe to run again.
set -euo pipefail

: "${CONTROL_PLANE_IP:?}"
STATE=/nodeagent/vagrant/.state
say() { printf 'provision(worker): %s\n' "$*"; }

if [ -s /etc/kubernetes/kubelet.conf ]; then say "already joined"; exit 0; fi

# The control plane may still be starting (providers that bring machines up in parallel).
deadline=$(( $(date +%s) + 900 ))
until curl -fsk --max-time 5 "https://$CONTROL_PLANE_IP:6443/readyz" >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then say "the API server at $CONTROL_PLANE_IP:6443 never became ready" >&2; exit 1; fi
  sleep 5
done

hash="$(openssl x509 -pubkey -noout -in "$STATE/ca.crt" | openssl pkey -pubin -outform der | sha256sum | cut -d' ' -f1)"
kubeadm join "$CONTROL_PLANE_IP:6443" --node-name "$(hostname)" \
  --token "$(cat "$STATE/token")" --discovery-token-ca-cert-hash "sha256:$hash"
say "joined as $(hostname)"
