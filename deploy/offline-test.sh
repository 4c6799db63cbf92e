#!/usr/bin/env bash
# `make offline-test`: install the offline archive as an air-gapped hospital would, then process radiographs.
#   offline-test.sh ARCHIVE HOST_PYTHON
# Install and run-folder run in a network namespace with no interface but loopback (unshare --net) where this
# machine allows it, and always with pip --no-index and no pip configuration. HOST_PYTHON (with pydicom-data)
# makes the sample input and checks the results DB afterwards.
set -euo pipefail
archive=$(realpath "$1")
host_python=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/xraybatch-offline-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

offline=()
if unshare --net true 2>/dev/null; then
  offline=(unshare --net)
  echo "offline-test: install and run with no network (unshare --net)"
else
  echo "offline-test: unshare --net is not permitted here; relying on pip --no-index alone"
fi
start=$(date +%s)
tar -xf "$archive" -C "$tmp"
bundle=$(echo "$tmp"/xraybatch-*-offline)
PYTHON=${OFFLINE_PYTHON:-python3.11} "${offline[@]}" "$bundle/install.sh" "$tmp/opt"
echo "offline-test: installed in $(( $(date +%s) - start )) s"
rm -rf "$bundle"  # nothing of the archive is needed after the install

"$host_python" "$repo/scripts/demo_data.py" "$tmp/in" >/dev/null
"${offline[@]}" "$tmp/opt/venv/bin/xraybatch" run-folder "$tmp/in" --workdir "$tmp/work" --no-progress
"$host_python" "$repo/deploy/check_results.py" --db "sqlite:///$tmp/work/xraybatch.sqlite" --outbox "$tmp/work/outbox" \
  --expect done=2 --expect not_applicable=1 --expect rejected=1 --expect duplicate=1
echo "offline-test: passed"
