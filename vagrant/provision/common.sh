#!/usr/bin/env bash
# Every node: containerd, kubeadm/kubelet/kubectl, kernel headers for bcc, and nodeagent's image built
# from the synced checkout (/nodeagent) and imported into containerd's k8s.io namespace.
# Environment (from the Vagrantfile): NODE_IP, K8S_MINOR. Safe to run again.
set -euo pipefail

: "${NODE_IP:?}" "${K8S_MINOR:?}"
IMAGE=localhost/nodeagent:dev
export DEBIAN_FRONTEND=noninteractive
say() { printf 'provision(common): %s\n' "$*"; }

# Kernel prerequisites of kubeadm: no swap, bridged traffic visible to iptables, forwarding.
swapoff -a
sed -i '/\sswap\s/ s/^[^#]/#&/' /etc/fstab
printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/kubernetes.conf
modprobe overlay
modprobe br_netfilter
printf 'net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\n' > /etc/sysctl.d/90-kubernetes.conf
sysctl --quiet --system

say "packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  apt-transport-https ca-certificates curl gpg containerd podman rsync openssl >/dev/null

# Kubernetes' own package repository, one minor version.
keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
if [ ! -s "$keyring" ]; then
  mkdir -p /etc/apt/keyrings
  curl -fsSL "https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/Release.key" | gpg --dearmor -o "$keyring"
fi
echo "deb [signed-by=$keyring] https://pkgs.k8s.io/core:/stable:/v${K8S_MINOR}/deb/ /" \
  > /etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq --no-install-recommends kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# containerd with the systemd cgroup driver (kubeadm's default for kubelet) and kubeadm's pause image.
if [ ! -s /etc/containerd/config.toml ] || ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml; then
  mkdir -p /etc/containerd
  containerd config default > /etc/containerd/config.toml
  sed -i -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
         -e 's#sandbox_image = ".*"#sandbox_image = "registry.k8s.io/pause:3.10"#' /etc/containerd/config.toml
  systemctl restart containerd
fi

# kubelet on the host-only network (the first interface is the provider's NAT).
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" > /etc/default/kubelet
systemctl enable kubelet >/dev/null 2>&1

# Kernel headers for bcc: the running kernel's own, or (a box older than the archive) Debian's current
# ones linked where bcc looks, as scripts/setup.sh does. The DaemonSet mounts /lib/modules and /usr/src.
krel="$(uname -r)"
if [ ! -e "/lib/modules/$krel/build/include/generated/autoconf.h" ]; then
  if apt-get install -y -qq --no-install-recommends "linux-headers-$krel" >/dev/null 2>&1; then
    say "installed linux-headers-$krel"
  else
    arch="$(dpkg --print-architecture)"
    apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null
    build="$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n1)"
    common="${build%-"$arch"}-common"
    ln -sfn "$build" "/lib/modules/$krel/build"
    ln -sfn "$common" "/lib/modules/$krel/source"
    say "no headers for $krel in the archive: linked $build and $common"
  fi
fi

say "building $IMAGE from /nodeagent"
/nodeagent/daemonset/build-image.sh "$IMAGE"
podman save "$IMAGE" | ctr --namespace k8s.io images import - >/dev/null
ctr --namespace k8s.io images ls -q | grep -qx "$IMAGE" || { say "$IMAGE is not in containerd" >&2; exit 1; }
say "ready: $IMAGE in containerd, kubelet configured for $NODE_IP"
