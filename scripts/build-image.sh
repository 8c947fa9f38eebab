#!/usr/bin/env bash
# Builds the niximage container image (Containerfile) from a Debian base made here with
# debootstrap, with podman, as root, without any registry but Debian's and PyPI:
#
#   scripts/build-image.sh [--tag IMAGE] [--fresh] [--check]
#
#   --tag IMAGE  name of the result (default localhost/niximage:<version>)
#   --fresh      rebuild the base and every layer (ignore the caches): now and then, to pick
#                up Debian's updates, which cached layers do not see
#   --check      afterwards, run `niximage --version` and a `niximage build` of the bundled
#                offline package set inside the image (tests/deploy/test_image.py does more)
#
# 1. debootstrap --variant=minbase bookworm from the apt mirror this machine uses, trimmed
#    (no docs, man pages, locales, apt lists) and kept as a tarball in the cache directory
#    ($NIXIMAGE_IMAGE_CACHE, default /var/cache/niximage-base): later runs skip it.
# 2. podman import of that tarball, once (a re-import would make a new image ID and throw
#    away podman's layer cache).
# 3. podman build of the Containerfile on top, with the layer cache in the same directory.
#
# podman runs with vfs storage, runc and lowered ulimits, as it must on these VMs (crun fails
# on hybrid cgroups; the default ulimits need CAP_SYS_RESOURCE): see the README's "Pulling
# with podman".
# Prints the image name on stdout, progress and the image size on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

image=""
fresh=0
check=0
while (($#)); do
  case "$1" in
    --tag) image="$2"; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --check) check=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "build-image.sh: $*" >&2; }

if ((EUID != 0)); then
  log "run as root (debootstrap and podman's vfs storage need it)"; exit 2
fi
for tool in debootstrap podman runc; do
  command -v "$tool" >/dev/null || { log "$tool is missing: apt-get install debootstrap podman runc"; exit 2; }
done

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' core/niximage_core/__init__.py)
image=${image:-localhost/niximage:$version}
suite=bookworm
arch=$(dpkg --print-architecture)
cache=${NIXIMAGE_IMAGE_CACHE:-/var/cache/niximage-base}
mkdir -p "$cache"

# The apt mirror this machine uses (its deb822 or one-line sources), so the image is made
# from the same Debian archive the host trusts; DEBIAN_MIRROR overrides it.
host_mirror() {
  local file uri
  for file in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [[ -f $file ]] || continue
    # The first stanza that serves the release itself (not -security, not -updates).
    uri=$(awk -v suite="$suite" '
      /^URIs:/ { uris = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = 1 }
      /^$/ { if (found && uris) exit; found = 0; uris = "" }
      END { if (found && uris) print uris }' "$file")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  if [[ -f /etc/apt/sources.list ]]; then
    awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list
  fi
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
if [[ -z $mirror ]]; then
  log "no Debian $suite mirror in /etc/apt: set DEBIAN_MIRROR"; exit 2
fi

# podman's configuration and storage of its own, kept with the cache: vfs (no overlay
# mounts needed), runc, ulimits it may set.
podman_dir=$cache/podman
mkdir -p "$podman_dir"
cat > "$podman_dir/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
cat > "$podman_dir/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$podman_dir/storage"
runroot = "/run/niximage-podman"
CONF
export CONTAINERS_CONF=$podman_dir/containers.conf
export CONTAINERS_STORAGE_CONF=$podman_dir/storage.conf

# ---- 1. the Debian base ---------------------------------------------------------------
# The base is named by what makes it: a change of suite, architecture, mirror or trimming
# recipe makes a new one. Bump base_recipe when the trimming below changes.
base_recipe=1
base_id=$(printf '%s\n' "$suite" "$arch" "$mirror" "$base_recipe" | sha256sum | cut -c1-12)
base_tar=$cache/base-$suite-$base_id.tar
base_image=localhost/niximage-base:$suite-$base_id

if ((fresh)); then
  rm -f "$base_tar"
  podman rmi -f "$base_image" >/dev/null 2>&1 || true
fi

if [[ ! -s $base_tar ]]; then
  log "debootstrap $suite ($arch) from $mirror"
  rootfs=$cache/rootfs.tmp
  rm -rf "$rootfs"
  started=$SECONDS
  # minbase: essential packages and apt only. The Containerfile installs the rest with apt.
  if ! debootstrap --variant=minbase --arch="$arch" "$suite" "$rootfs" "$mirror" \
    >"$cache/debootstrap.log" 2>&1; then
    tail -20 "$cache/debootstrap.log" >&2
    log "debootstrap failed (log: $cache/debootstrap.log)"
    exit 1
  fi
  # apt in the image uses the same archive, with the release's updates and security suites
  # when the host has them (same URIs as the host, so the same reachability).
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    rm -f "$rootfs/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/debian.sources"
  fi
  # Trim what no container reads: documentation (copyright files stay), manual pages,
  # translations, apt's lists and caches, logs. dpkg's database stays: the offline package
  # set reads the file lists of Debian packages from it.
  find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,lintian,bug}/* "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  # Numeric owners, sorted names: the tarball's bytes depend on the files, not the order
  # the file system lists them in.
  tar --numeric-owner --sort=name --xattrs -C "$rootfs" -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  rm -rf "$rootfs"
  log "base made in $((SECONDS - started)) s: $(du -h "$base_tar" | cut -f1)"
fi

if ! podman image exists "$base_image"; then
  log "podman import $base_image"
  podman import --quiet "$base_tar" "$base_image" >/dev/null
fi

# ---- 2. the image -----------------------------------------------------------------------
# Pin the Python dependencies to the versions installed here, when this checkout is
# installed (scripts/install.sh): the image then runs what the tests ran. Only the
# distributions niximage needs, directly or not, are pinned.
pins=$(python3 - <<'PY' 2>/dev/null || true
import re
from importlib import metadata

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

try:
    wanted = [metadata.distribution("niximage")]
except metadata.PackageNotFoundError:
    raise SystemExit(0)
seen, pins = set(), []
while wanted:
    dist = wanted.pop()
    for requirement in dist.requires or ():
        if "extra ==" in requirement:
            continue  # optional extras (dev tools) are not image dependencies
        name = norm(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
        if name in seen:
            continue
        seen.add(name)
        try:
            found = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={found.version}")
        wanted.append(found)
print(" ".join(sorted(pins)))
PY
)

build_args=(--build-arg "BASE=$base_image" --build-arg "PINS=$pins")
# The host's CA bundle, for pip inside the build (a proxy's CA must be trusted): a build
# secret, so it stays out of every layer.
for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  if [[ -f $bundle ]]; then build_args+=(--secret "id=cacert,src=$bundle"); break; fi
done

log "podman build $image"
started=$SECONDS
# The python stage is built and tagged first: a stage nothing descends from is a dangling
# image once the build ends, and the prune below would drop it with the cached venv. The
# second build finds every step of it in the cache.
: >"$cache/build.log"
for target in python final; do
  if [[ $target == python ]]; then
    # --fresh: the first build ignores the cache; the second then reuses what it made.
    tag=(--target python -t "localhost/niximage-stage:python")
    ((fresh)) && tag+=(--no-cache)
  else
    tag=(-t "$image")
  fi
  podman build --layers --network=host --pull=never -f Containerfile "${tag[@]}" \
    "${build_args[@]}" . >>"$cache/build.log" 2>&1 \
    || { tail -40 "$cache/build.log" >&2; log "podman build failed (log: $cache/build.log)"; exit 1; }
done
# vfs stores every layer as a full copy of the file system: drop what no tag needs any
# more (earlier builds' stages and images), or the cache grows by gigabytes per code change.
podman image prune --force >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$image")
log "built $image in $((SECONDS - started)) s: $((size / 1000000)) MB"

if ((check)); then
  run=(podman run --rm --network=none "$image")
  "${run[@]}" niximage --version >&2
  "${run[@]}" sh -c 'niximage build jq --storage /tmp/storage --tag check/jq:1' >/dev/null
  log "niximage build of the bundled package set ran inside the image"
fi
echo "$image"
