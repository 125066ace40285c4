#!/usr/bin/env bash
# Install everything nodeagent needs on a fresh Debian/Ubuntu machine; safe to run again (idempotent).
#   scripts/setup.sh          install what is missing
#   scripts/setup.sh --check  exit 0 if nothing is missing, 1 otherwise (what the README commands run first)
#
# What and why:
#  - Debian packages: iproute2 (ip, tc), iptables (legacy and nft), conntrack, nftables, bpftool, procps
#    (sysctl), python3-bpfcc (bcc's Python binding and libbcc) and kernel headers for bcc; for the deployment
#    tests, shellcheck (daemonset/ and vagrant/ scripts) and ruby (parses and runs the Vagrantfile).
#  - kubectl (its built-in kustomize renders daemonset/): Debian's kubernetes-client is 1.20, too old for
#    kustomize v5 manifests, so it comes from the machine image or a configured Kubernetes apt repository
#    (package kubectl); when neither has it, setup says so and the deployment tests name it (CI fails them).
#  - bcc compiles C at load time against kernel headers. Kernels without their own headers package (this
#    VM's kernel has none) get Debian's cloud headers, linked as /lib/modules/$(uname -r)/build AND .../source:
#    measured here, bcc compiles only with both links; BCC_KERNEL_SOURCE alone, or either link alone, fails.
#  - .venv: the project and its test tools (the dev extra, py-spy included: the benchmarks' --profile samples
#    the tunnel with it). bcc is not on PyPI in a usable form, so Debian's binding (pure Python over libbcc)
#    is linked into the venv as the single package `bcc`, instead of opening the venv to all of the
#    system's site-packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.nodeagent-setup"
KREL="$(uname -r)"
APT_PACKAGES=(iproute2 iptables conntrack nftables bpftool procps util-linux python3-bpfcc shellcheck ruby)
COMMANDS=(ip tc iptables-legacy iptables-nft iptables-restore conntrack bpftool sysctl unshare shellcheck ruby)
SYSTEM_BCC=/usr/lib/python3/dist-packages/bcc

say() { printf 'setup: %s\n' "$*" >&2; }

want_stamp() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1; }

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

# bcc needs the configured build tree (build) and the common sources (source) of a headers package.
kustomize_ok() { command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; }

headers_ok() { [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ] && [ -e "/lib/modules/$KREL/source/include/linux/kconfig.h" ]; }

missing() {
  local m=()
  for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null 2>&1 || m+=("command:$c"); done
  [ -d "$SYSTEM_BCC" ] || m+=("python3-bpfcc")
  headers_ok || m+=("kernel-headers")
  kustomize_ok || m+=("kubectl(kustomize)")
  pick_python >/dev/null || m+=("python>=3.11")
  awk '$2=="/sys/fs/bpf" && $3=="bpf"{f=1} END{exit !f}' /proc/mounts || m+=("bpffs")
  { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] && [ -x "$VENV/bin/nodeagent" ]; } || m+=("venv")
  printf '%s\n' "${m[@]}"
}

if [ "${1:-}" = "--check" ]; then
  left="$(missing)"
  if [ -n "$left" ]; then say "missing: $(echo $left)"; exit 1; fi
  exit 0
fi

if [ "$(id -u)" != 0 ]; then say "must run as root (installs packages, links kernel headers)"; exit 1; fi

apt_updated=0
apt_install() {
  local need=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p"); done
  [ ${#need[@]} = 0 ] && return 0
  if [ $apt_updated = 0 ]; then say "apt-get update"; apt-get update -qq; apt_updated=1; fi
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# 1. Debian packages.
apt_install "${APT_PACKAGES[@]}"
pick_python >/dev/null || apt_install python3 python3-venv

# 2. Kernel headers for bcc: the kernel's own package if Debian has one, else the cloud flavour + links.
if ! headers_ok; then
  arch="$(dpkg --print-architecture)"
  if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    apt_install "linux-headers-$KREL"
    build="/usr/src/linux-headers-$KREL"
  else
    apt_install "linux-headers-cloud-$arch"
    build="$(ls -d /usr/src/linux-headers-*-cloud-"$arch" | sort -V | tail -n1)"
  fi
  common="$(dirname "$build")/$(basename "$build" | sed -E 's/^(linux-headers-[0-9.]+-[0-9]+)-.*/\1-common/')"
  [ -d "$build" ] && [ -d "$common" ] || { say "no kernel headers found under /usr/src ($build, $common)"; exit 1; }
  say "linking $build (build) and $common (source) for kernel $KREL: bcc needs both"
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$build" "/lib/modules/$KREL/build"
  ln -sfn "$common" "/lib/modules/$KREL/source"
  headers_ok || { say "kernel headers still incomplete under /lib/modules/$KREL"; exit 1; }
fi

# 2b. kubectl for `kubectl kustomize` (the deployment tests), where an apt repository offers it.
if ! kustomize_ok; then
  if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi
  if apt-cache show kubectl >/dev/null 2>&1; then apt_install kubectl; fi
  kustomize_ok || say "WARNING: no kubectl with kustomize (no apt repository offers package kubectl): install kubectl >= 1.27 by hand; the deployment tests need it"
fi

# 3. bpffs, where the eBPF datapath pins programs and maps so they outlive an agent restart.
if ! awk '$2=="/sys/fs/bpf" && $3=="bpf"{f=1} END{exit !f}' /proc/mounts; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

# 4. The Python environment.
PY="$(pick_python)"
if [ ! -x "$VENV/bin/python" ]; then say "creating $VENV with $PY"; "$PY" -m venv "$VENV"; fi
if ! { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] && [ -x "$VENV/bin/nodeagent" ]; }; then
  say "installing nodeagent and its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  ln -sfn "$SYSTEM_BCC" "$site/bcc"
  want_stamp > "$STAMP"
fi
"$VENV/bin/python" -c 'import bcc' || { say "bcc does not import in $VENV"; exit 1; }
say "ready: $VENV/bin/nodeagent ($("$VENV/bin/nodeagent" version))"
