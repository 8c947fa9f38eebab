#!/usr/bin/env bash
# Installs everything niximage needs on a fresh Debian 12 machine, as root, idempotently:
# Debian packages (Nix, the host programs the offline package set is made of, the registry
# clients used by the tests), a single-user Nix configuration, arm64 emulation with the
# package set's arm64 Debian files (install-arm64.sh), and the Python package.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(
  # Nix itself, and what the offline package set (nix/testpkgs) is made from
  nix-bin busybox-static patchelf bash jq openssl python3 nano moreutils coreutils
  tzdata ca-certificates netbase libsqlite3-0 libffi8 zlib1g libexpat1 libncursesw6 ncurses-base
  # registry clients and the reference registry for tests and benchmarks
  skopeo umoci podman runc containerd docker-registry wrk
  # tools the tests use
  procps git
  # the real-cluster tests: etcd beside the kube-apiserver of ../shared/kube
  etcd-server
  # the operator image build (python3 -m pytest -m image; scripts/build-image.sh)
  debootstrap
)

missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "install.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Single-user Nix as root without the build-users daemon set-up. No substituters: this
# machine has no route to a binary cache, and without this every build first waits on it.
mkdir -p /etc/nix
if ! grep -q "niximage: single-user" /etc/nix/nix.conf 2>/dev/null; then
  cat >> /etc/nix/nix.conf <<'CONF'
# niximage: single-user settings (scripts/install.sh)
sandbox = false
build-users-group =
experimental-features = nix-command
substituters =
max-jobs = 2
CONF
fi

# arm64 through qemu-user: builds and runs of the aarch64-linux package set (multi-arch).
scripts/install-arm64.sh

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
