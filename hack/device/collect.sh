#!/usr/bin/env bash
# Takes a device run's results (the folder `files_at` of hack/device/check.sh's call) into the
# repo: the merged throughput JSON into bench/results/, then the README's tables. The logs and
# the JUnit report stay where they are; quote them in the issue note.
#
#   hack/device/collect.sh FILES_AT
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FROM="${1:?usage: hack/device/collect.sh FILES_AT}"
json="$(find "$FROM" -name trainer_throughput.json | head -1)"
[[ -n "$json" ]] || { echo "no trainer_throughput.json under $FROM" >&2; exit 1; }
cp "$json" "$ROOT/bench/results/trainer_throughput.json"
(cd "$ROOT" && "$(bash hack/venv.sh)/bin/python" bench/report.py)
for f in env.txt trainer-e2e.log bench.log; do
  path="$(find "$FROM" -name "$f" | head -1)"
  [[ -n "$path" ]] && { echo "== $f"; tail -n 25 "$path"; }
done
