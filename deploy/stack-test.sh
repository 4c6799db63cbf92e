#!/usr/bin/env bash
# `make stack-test`: deploy/compose.yaml up, one radiograph C-STOREd into the receiver, its SR awaited in
# Orthanc, the workers stopped with SIGTERM (exit 0), everything down with its volumes.
#   stack-test.sh "COMPOSE COMMAND" HOST_PYTHON        (needs DCMTK's storescu and curl on this host)
# Host ports are free ones on 127.0.0.1 only.
set -euo pipefail
read -r -a compose <<<"$1"
host_python=$2
engine=${ENGINE:-docker}
repo=$(cd "$(dirname "$0")/.." && pwd)
project="xraybatch-stack-test-$$"
free_port() { "$host_python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export XRAYBATCH_RECEIVE_PORT=$(free_port) XRAYBATCH_PACS_HTTP_PORT=$(free_port)
export XRAYBATCH_DB_PASSWORD="stack-test-$RANDOM$RANDOM"
c() { "${compose[@]}" --project-name "$project" --file "$repo/deploy/compose.yaml" "$@"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/xraybatch-stack-test.XXXXXX")
ok=0
cleanup() {
  if [ "$ok" != 1 ]; then c ps >&2 || true; c logs --tail 25 >&2 || true; fi
  c down --volumes --timeout 60 >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "stack-test: FAILED: $*" >&2; exit 1; }
pacs="http://127.0.0.1:$XRAYBATCH_PACS_HTTP_PORT"
find_sr() {
  curl -fsS -X POST "$pacs/tools/find" -d '{"Level": "Series", "Query": {"Modality": "SR"}}' 2>/dev/null \
    | "$host_python" -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}
healthy() { [ "$("$engine" inspect --format '{{.State.Health.Status}}' "$(c ps -q "$1")" 2>/dev/null)" = healthy ]; }

start=$(date +%s)
c up -d >"$tmp/up.log" 2>&1 || { cat "$tmp/up.log" >&2; fail "compose up"; }
for _ in $(seq 180); do
  healthy pacs && healthy receive && healthy worker-1 && healthy worker-2 && break
  sleep 1
done
for service in db pacs receive worker-1 worker-2; do healthy "$service" || fail "$service is not healthy"; done
[ "$("$engine" inspect --format "{{.State.ExitCode}}" "$(c ps -q migrate)")" = 0 ] || fail "migration failed"
echo "stack-test: stack up and healthy in $(( $(date +%s) - start )) s"

"$host_python" "$repo/scripts/demo_data.py" "$tmp/in" >/dev/null
[ "$(find_sr)" = 0 ] || fail "Orthanc holds an SR before anything was sent"
t0=$("$host_python" -c 'import time; print(time.time())')
storescu --required -aec XRAYBATCH -aet STACKTEST 127.0.0.1 "$XRAYBATCH_RECEIVE_PORT" "$tmp/in/chest-uncompressed" \
  || fail "C-STORE into the receiver"
for _ in $(seq 600); do
  [ "$(find_sr)" -ge 1 ] && break
  sleep 0.5
done
[ "$(find_sr)" -ge 1 ] || fail "no SR in Orthanc 300 s after the C-STORE"
seconds=$("$host_python" -c "import time; print(f'{time.time() - $t0:.1f}')")
echo "stack-test: C-STORE to SR in the PACS: $seconds s"

states=$(c exec -T db psql -U postgres -d xraybatch -tAc "SELECT state || '=' || count(*) FROM instances GROUP BY state")
[ "$states" = "done=1" ] || fail "results DB states: $states"
series=$(curl -fsS "$pacs/series?expand" | "$host_python" -c \
  'import json, sys; print(" ".join(sorted(s["MainDicomTags"].get("Modality", "?") for s in json.load(sys.stdin))))')
echo "stack-test: series in the PACS: $series"
case " $series " in *" SR "*) ;; *) fail "no SR series in the PACS";; esac
case " $series " in *" OT "*) ;; *) fail "no Secondary Capture series in the PACS";; esac

c stop --timeout 60 worker-1 worker-2 >/dev/null 2>&1
for service in worker-1 worker-2; do
  code=$("$engine" inspect --format '{{.State.ExitCode}}' "$(c ps -q "$service")")
  [ "$code" = 0 ] || fail "$service exited $code after SIGTERM"
done
ok=1
echo "stack-test: passed (C-STORE to SR in Orthanc $seconds s; workers stopped with exit 0)"
