#!/usr/bin/env bash
# The base image without a registry: make-base.sh ENGINE TAG CACHE_DIR (run by `make image`).
# Debian bookworm (minbase, Python 3.11) from debootstrap, imported into the engine. The root tarball is cached
# in CACHE_DIR and reused; delete it to take the newest Debian packages.
set -euo pipefail
engine=$1
tag=$2
cache=$3
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball="$cache/bookworm-minbase.tar"

if "$engine" image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag: present"
  exit 0
fi
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { echo "make-base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
  mkdir -p "$cache"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
    bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
"$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$tag"
echo "base image $tag: imported from $tarball"
