#!/usr/bin/env bash
# arm64 on this amd64 machine, as root, idempotently (scripts/install.sh runs it):
# - qemu-user-static, and its aarch64 binfmt_misc handler registered with the F flag (the
#   interpreter is opened at registration, so arm64 programs run in chroots and containers);
# - Nix told that it may build aarch64-linux derivations here (extra-platforms);
# - the arm64 builds of the offline package set's Debian packages
#   (nix/testpkgs/debian-packages), unpacked without installing them into
#   $NIXIMAGE_DEBIAN_ROOTS/arm64 (default /var/lib/niximage/debian/arm64): root/ holds the
#   files, info/<package>.list what each package holds, as dpkg's own lists do.
# Where binfmt_misc cannot be had (a container without the privilege), it says so and stops
# with success: the arm64 tests skip, naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

roots=${NIXIMAGE_DEBIAN_ROOTS:-/var/lib/niximage/debian}
target=$roots/arm64
handler=/proc/sys/fs/binfmt_misc/qemu-aarch64

if ! dpkg-query -W -f='${Status}' qemu-user-static 2>/dev/null | grep -q "install ok installed"; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi

if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ ! -e "$handler" ] && [ -w /proc/sys/fs/binfmt_misc/register ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register || true
fi
if ! grep -q '^flags: .*F' "$handler" 2>/dev/null; then
  echo "install-arm64.sh: no aarch64 binfmt_misc handler with the F flag (binfmt_misc not" \
    "mountable here?); arm64 builds and images are left out" >&2
  exit 0
fi

if ! grep -q "^extra-platforms = .*aarch64-linux" /etc/nix/nix.conf 2>/dev/null; then
  echo "extra-platforms = aarch64-linux  # niximage: arm64 through qemu-user (install-arm64.sh)" \
    >> /etc/nix/nix.conf
fi

mapfile -t packages < <(grep -v '^#' nix/testpkgs/debian-packages | grep .)
wanted=$(printf '%s\n' "${packages[@]}")
if [ -f "$target/packages" ] && [ "$(cat "$target/packages")" = "$wanted" ]; then
  exit 0
fi
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
if ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
  apt-get update -qq
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Architecture-independent packages ("all") download as they are; the others as :arm64.
mapfile -t independent < <(apt-cache show --no-all-versions "${packages[@]}" \
  | awk '/^Package: /{name=$2} /^Architecture: all/{print name}' | sort -u)
names=()
for package in "${packages[@]}"; do
  if printf '%s\n' "${independent[@]}" | grep -qx -- "$package"; then
    names+=("$package")
  else
    names+=("$package:arm64")
  fi
done
(cd "$work" && apt-get download -qq "${names[@]}" 2>/dev/null)

# A merged /usr, as Debian 12 installs it: /bin, /sbin and /lib are symlinks into /usr.
rm -rf "$target.new"
mkdir -p "$target.new/root/usr/bin" "$target.new/root/usr/sbin" "$target.new/root/usr/lib" \
  "$target.new/info"
for dir in bin sbin lib; do ln -s "usr/$dir" "$target.new/root/$dir"; done
for package in "${packages[@]}"; do
  deb=$(ls "$work/${package}"_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$target.new/root"
  # dpkg's list format: absolute paths, "/." for the root.
  dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's|^\./|/|' -e 's|/$||' -e 's|^$|/.|' \
    > "$target.new/info/$package.list"
done
printf '%s\n' "$wanted" > "$target.new/packages"
rm -rf "$target"
mv "$target.new" "$target"
echo "install-arm64.sh: arm64 packages unpacked in $target" >&2
