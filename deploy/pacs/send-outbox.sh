#!/bin/sh
# INTERIM sender for the compose stack, until `xraybatch watch --send dicom://ORTHANC@pacs:4242` (branch
# `delivery`, issue 11) delivers results itself with verification and exactly-once bookkeeping in the results DB.
# Every few seconds: C-STORE (DCMTK storescu) each finished output in OUTBOX not sent before to the PACS, and
# remember it in STATE. Not exactly-once: a crash between the store and the note sends a file again (the PACS
# replaces the same SOP Instance UID). Usage: send-outbox OUTBOX STATE_FILE HOST PORT CALLED_AE
set -eu
outbox=$1 state=$2 host=$3 port=$4 called=$5
touch "$state"
echo "send-outbox: sending new files under $outbox to $called@$host:$port"
trap 'exit 0' TERM INT
while :; do
  find "$outbox" -type f -name '*.dcm' ! -name '.*' 2>/dev/null | sort | while read -r file; do
    grep -qxF "$file" "$state" && continue
    # -R: propose only the presentation context the file needs (DCMTK's default list lacks e.g. Comprehensive 3D SR)
    if storescu --required -aet XRAYBATCH -aec "$called" "$host" "$port" "$file" 2>/tmp/storescu.err; then
      echo "$file" >> "$state"
      echo "send-outbox: stored $(basename "$file")"
    else
      echo "send-outbox: will retry $(basename "$file"): $(tail -1 /tmp/storescu.err)"
    fi
  done
  sleep 2 & wait $!
done
