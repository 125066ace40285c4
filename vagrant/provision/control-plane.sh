#!/usr/bin/env bash
# The control plane: kubeadm init WITHOUT kube-proxy, the CNI (flannel, told the API server's real
# address because the `kubernetes` Service needs a proxy to work), the mesh CA and nodeagent.
# Environment (from the Vagrantfile): NODE_IP, CONTROL_PLANE_IP, POD_CIDR, SERVICE_CIDR. Safe to run again.
set -euo pipefail

: "${NODE_IP:?}" "${CONTROL_PLANE_IP:?}" "${POD_CIDR:?}" "${SERVICE_CIDR:?}"
FLANNEL_VERSION="${FLANNEL_VERSION:-v0.26.1}"
STATE=/nodeagent/vagrant/.state
export KUBECONFIG=/etc/kubernetes/admin.conf
say() { printf 'provision(control-plane): %s\n' "$*"; }

# Poll `$@` until it succeeds or `$1` seconds pass.
until_ok() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then say "timed out waiting for: $*" >&2; return 1; fi
    sleep 2
  done
}

if [ ! -s /etc/kubernetes/admin.conf ]; then
  install -d -m 0755 /etc/kubernetes/pki
  install -m 0644 "$STATE/ca.crt" /etc/kubernetes/pki/ca.crt
  install -m 0600 "$STATE/ca.key" /etc/kubernetes/pki/ca.key
  say "kubeadm init (no kube-proxy)"
  kubeadm init --skip-phases=addon/kube-proxy --node-name "$(hostname)" \
    --apiserver-advertise-address "$NODE_IP" --pod-network-cidr "$POD_CIDR" --service-cidr "$SERVICE_CIDR" \
    --token "$(cat "$STATE/token")" --token-ttl 0
fi
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
until_ok 300 kubectl get --raw /readyz

say "flannel $FLANNEL_VERSION, talking to the API server at $CONTROL_PLANE_IP:6443 directly"
kubectl apply -f "https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml"
if ! kubectl -n kube-flannel get daemonset kube-flannel-ds -o jsonpath='{.spec.template.spec.containers[0].args}' \
    | grep -q iface-regex; then
  # the node network is the host-only one, not the provider's NAT (the default route's interface)
  kubectl -n kube-flannel patch daemonset kube-flannel-ds --type json -p \
    "[{\"op\":\"add\",\"path\":\"/spec/template/spec/containers/0/args/-\",\"value\":\"--iface-regex=^${CONTROL_PLANE_IP%.*}\\\\.\"}]"
fi
kubectl -n kube-flannel set env daemonset/kube-flannel-ds \
  KUBERNETES_SERVICE_HOST="$CONTROL_PLANE_IP" KUBERNETES_SERVICE_PORT=6443

say "nodeagent: the mesh CA, then daemonset/overlays/replace-kube-proxy (vagrant/manifests)"
if ! kubectl -n nodeagent get secret nodeagent-ca >/dev/null 2>&1; then
  ca="$(mktemp -d)"
  podman run --rm --user 0 --entrypoint python3 -v "$ca:/out" localhost/nodeagent:dev -c \
    'from pathlib import Path; from nodeagent.ca.identity import CertificateAuthority as CA; CA.load_or_create(Path("/out"))'
  /nodeagent/daemonset/make-ca-secret.sh --from "$ca"
  rm -rf "$ca"
fi
printf 'KUBERNETES_SERVICE_HOST=%s\nKUBERNETES_SERVICE_PORT=6443\n' "$CONTROL_PLANE_IP" \
  > /nodeagent/vagrant/manifests/apiserver.env
kubectl apply -k /nodeagent/vagrant/manifests
kubectl -n nodeagent rollout status daemonset/nodeagent --timeout=10m
say "ready; workers join next. Then: sudo /nodeagent/vagrant/smoke-test.sh"
