#!/usr/bin/env bash
# `make image-test`: the image as a hospital runs it, with no network at all (--network none, read-only root).
#   image-test.sh ENGINE IMAGE HOST_PYTHON
# 1. run-folder on sample radiographs mounted read-only: states in the DB, SR and SC outputs, file modes.
# 2. watch: a file dropped in is processed and archived, the health check turns healthy, and SIGTERM ends the
#    container with exit code 0.
set -euo pipefail
engine=$1
image=$2
host_python=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/xraybatch-image-test.XXXXXX")
cid=""
cleanup() {
  [ -n "$cid" ] && "$engine" rm -f "$cid" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "image-test: FAILED: $*" >&2; [ -n "$cid" ] && "$engine" logs --tail 40 "$cid" >&2; exit 1; }
run=("$engine" run --network none --read-only --tmpfs /tmp:rw,size=512m --security-opt no-new-privileges --cap-drop ALL)

user=$("$engine" image inspect --format '{{.Config.User}}' "$image")
revision=$("$engine" image inspect --format '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$image")
version=$("$engine" image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
[ "$user" = "10001:10001" ] || fail "image runs as '$user', not the unprivileged 10001"
[ -n "$revision" ] && [ "$revision" != "unknown" ] || fail "no git revision label"
echo "image-test: $image version $version revision $revision user $user"

# 1. run-folder, inputs read-only
# The image keeps the drop folder and the work folder in one volume at /data (rename() needs one mount).
"$host_python" "$repo/scripts/demo_data.py" "$tmp/in" >/dev/null
install -d -o 10001 -g 10001 -m 0750 "$tmp/data" "$tmp/data/work"
work=$tmp/data/work
start=$(date +%s)
"${run[@]}" --rm -v "$tmp/in:/input:ro" -v "$tmp/data:/data" "$image" \
  run-folder /input --no-progress || fail "run-folder exited $?"
echo "image-test: run-folder in $(( $(date +%s) - start )) s"
"$host_python" "$repo/deploy/check_results.py" --db "sqlite:///$work/xraybatch.sqlite" --outbox "$work/outbox" \
  --expect done=2 --expect not_applicable=1 --expect rejected=1 --expect duplicate=1 || fail "results differ"
loose=$(find "$work" -mindepth 1 -perm /o=rwx -printf '%m %P\n')
[ -z "$loose" ] || fail "world-accessible files in the work folder: $loose"
"${run[@]}" --rm "$image" models list --verify >/dev/null || fail "models list --verify"

# 2. watch: a drop, the health check, SIGTERM
install -d -o 10001 -g 10001 -m 0750 "$tmp/data2" "$tmp/data2/incoming" "$tmp/data2/work"
drop=$tmp/data2/incoming
work2=$tmp/data2/work
cid=$("${run[@]}" -d -v "$tmp/data2:/data" -e XRAYBATCH_WATCH_SETTLE_SECONDS=1 "$image" -v watch /data/incoming)
install -o 10001 -g 10001 -m 0640 "$tmp/in/chest-uncompressed" "$drop/.incoming.part"
mv "$drop/.incoming.part" "$drop/chest.dcm"
start=$(date +%s)
for _ in $(seq 240); do
  if [ -z "$(ls -A "$drop")" ] && [ -s "$work2/xraybatch.sqlite" ] && "$host_python" "$repo/deploy/check_results.py" \
       --db "sqlite:///$work2/xraybatch.sqlite" --expect done=1 >/dev/null 2>&1; then
    break
  fi
  [ "$("$engine" inspect --format '{{.State.Running}}' "$cid")" = true ] || fail "watch exited"
  sleep 1
done
"$host_python" "$repo/deploy/check_results.py" --db "sqlite:///$work2/xraybatch.sqlite" --outbox "$work2/outbox" \
  --expect done=1 || fail "the dropped file was not processed"
[ -n "$(ls -A "$work2/archive")" ] || fail "the processed input is not in archive/"
echo "image-test: watch processed a drop in $(( $(date +%s) - start )) s"
for _ in $(seq 90); do
  health=$("$engine" inspect --format '{{.State.Health.Status}}' "$cid")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || fail "health check: $health"
"$engine" stop --time 60 "$cid" >/dev/null
code=$("$engine" inspect --format '{{.State.ExitCode}}' "$cid")
[ "$code" = 0 ] || fail "watch exited $code after SIGTERM"
"$engine" logs "$cid" 2>&1 | tail -n 3 | "$host_python" -c 'import json, sys; [json.loads(line) for line in sys.stdin]' \
  || fail "the log is not JSON lines"
echo "image-test: passed (healthy, SIGTERM -> exit 0)"
