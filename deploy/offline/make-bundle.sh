#!/usr/bin/env bash
# Lay out the offline install folder and archive it (run by `make offline-bundle`):
#   make-bundle.sh WHEEL_DIR STAGE_DIR ARCHIVE VERSION
# WHEEL_DIR holds every wheel xraybatch needs (torch and its CUDA libraries included; the model bundles ship
# inside the xraybatch wheel). STAGE_DIR gets hard links to them (no second copy on disk): the container image
# is built from that same folder. The archive is a plain tar: wheels are compressed already.
set -euo pipefail
wheels=$(cd "$1" && pwd)
stage=$2
archive=$3
version=$4
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
name="xraybatch-$version-offline"

rm -rf "$stage"
mkdir -p "$stage/$name/systemd"
cp -al "$wheels" "$stage/$name/wheels" 2>/dev/null || cp -a "$wheels" "$stage/$name/wheels"
install -m 0755 "$here/install.sh" "$stage/$name/install.sh"
install -m 0644 "$here/README.txt" "$stage/$name/README.txt"
install -m 0644 "$repo/deploy/xraybatch.example.toml" "$stage/$name/xraybatch.example.toml"
install -m 0644 "$repo"/deploy/systemd/*.service "$stage/$name/systemd/"
echo "xraybatch==$version" > "$stage/$name/requirements.txt"
# The exact torch builds are whatever lies in wheels/.
ls "$wheels" | sed -n 's/^\(torch\|torchvision\)-\([^-]*\)-.*\.whl$/\1==\2/p' >> "$stage/$name/requirements.txt"
if [ -n "$archive" ]; then
  mkdir -p "$(dirname "$archive")"
  tar --create --owner=0 --group=0 --file "$archive.tmp" -C "$stage" "$name"
  mv "$archive.tmp" "$archive"
  echo "offline bundle: $archive ($(du -h "$archive" | cut -f1))"
fi
