# Shell helpers sourced by every builder of the test package set (lib.nix).
# The builder is Debian's static busybox `sh`, PATH holds only busybox applets.
set -eu
umask 022

# copy_tree SRC DST: copy an imported host tree (read-only store files) into DST, writable.
copy_tree() {
  mkdir -p "$2"
  cp -a "$1"/. "$2"/
  chmod -R u+w "$2"
}

# drop_host_links DIR: remove symlinks that point at absolute host paths (Debian's
# sitecustomize.py -> /etc/python3.11/..., zoneinfo/localtime -> /etc/localtime): they
# dangle in the store and in images.
drop_host_links() {
  find "$1" -type l | while read -r link; do
    target=$(readlink "$link")
    case "$target" in
      /nix/store/*) ;;
      /*) echo "dropping host symlink ${link#"$out"/} -> $target"; rm "$link" ;;
    esac
  done
}

# check_links DIR: fail on dangling symlinks (e.g. a library symlink imported without the
# file it points at).
check_links() {
  bad=$(find "$1" -type l | while read -r link; do [ -e "$link" ] || echo "$link"; done)
  if [ -n "$bad" ]; then
    echo "dangling symlinks:" "$bad" >&2
    exit 1
  fi
}

is_elf() {
  [ "$(od -An -tx1 -N4 "$1" | tr -d ' \n')" = 7f454c46 ]
}

# relink_elf FILE RPATH: point FILE's ELF interpreter (if any) at the store glibc loader and
# its RUNPATH at the store library directories in RPATH, shrunk to those that hold one of its
# DT_NEEDED libraries. Every DT_NEEDED must be found there: the host's /lib is never used.
relink_elf() {
  if $PATCHELF --print-interpreter "$1" >/dev/null 2>&1; then
    $PATCHELF --set-interpreter "$glibc/lib/$ldso" "$1"
  fi
  needed=$($PATCHELF --print-needed "$1")
  [ -n "$needed" ] || return 0
  $PATCHELF --set-rpath "$2" "$1"
  $PATCHELF --shrink-rpath "$1"
  for lib in $needed; do
    found=
    for dir in $(echo "$2" | tr : ' '); do
      if [ -e "$dir/$lib" ]; then found=1; break; fi
    done
    if [ -z "$found" ]; then
      echo "${1#"$out"/}: needs $lib, which is in none of $2" >&2
      return 1
    fi
  done
}

# relink_tree DIR RPATH: relink_elf every regular ELF file below DIR.
relink_tree() {
  find "$1" -type f | sort > "$TMPDIR/files"
  while read -r file; do
    if is_elf "$file"; then relink_elf "$file" "$2"; fi
  done < "$TMPDIR/files"
}

# lib_path DIR...: colon-separated list of the existing DIR/lib directories.
lib_path() {
  path=
  for dir in "$@"; do
    if [ -d "$dir/lib" ]; then path="$path${path:+:}$dir/lib"; fi
  done
  echo "$path"
}

# write_script FILE TEXT: an executable busybox-sh script; its shebang is a store reference.
write_script() {
  mkdir -p "$(dirname "$1")"
  printf '#!%s/bin/sh\n%s\n' "$busybox" "$2" > "$1"
  chmod 555 "$1"
}
