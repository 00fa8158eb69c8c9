#!/usr/bin/env bash
# Rehearses hack/device/check.sh on this machine's CPU, before device time is spent on it: a venv
# with the device image's Python and the versions it holds (torch 2.11, huggingface_hub 1.33, ...:
# hack/device/rehearse-requirements.txt, from the library's KINDS.md), .device/wheels installed
# the way check.sh installs them, then check.sh itself. The GPU-only tests skip and the bench
# runs the demo shape, so what it shows is that the call imports, collects and runs its steps
# with the device's versions. hack/device/cpu_paths.py then runs the GPU code paths (bf16, QLoRA
# through bitsandbytes' CPU kernels) in the same venv.
#
#   bash hack/device/bundle.sh && bash hack/device/rehearse.sh
#
# The venv (about 5 GB, torch's CUDA build) is cached outside the clone, keyed by its requirements.
set -euo pipefail
export PYTHONSAFEPATH=1  # the repo root holds `operator/` (hack/venv.sh)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REQS="$ROOT/hack/device/rehearse-requirements.txt"
PY312="${PY312:-$(find /root/.pyenv/versions /usr/bin /usr/local/bin -maxdepth 3 -name python3.12 -type f -perm -u+x 2>/dev/null | head -1)}"
[[ -x "$PY312" ]] || { echo "rehearse.sh: no python3.12 found; set PY312" >&2; exit 1; }
[[ -d "$ROOT/.device/wheels" ]] || { echo "rehearse.sh: run hack/device/bundle.sh first" >&2; exit 1; }
key="$( (cat "$REQS"; "$PY312" --version) | sha256sum | cut -c1-16)"
VENV="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/device-rehearsal/$key"
if [[ ! -f "$VENV/.complete" ]]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r <(grep -vE '^\s*(#|$)' "$REQS")
  touch "$VENV/.complete"
fi
export PYTHON="$VENV/bin/python" OUT="${OUT:-$ROOT/build/device-rehearsal}"
export TEST_TIMEOUT="${TEST_TIMEOUT:-1500}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
export BENCH_ARGS="${BENCH_ARGS:---shapes demo --data mixed --batch-size 4 --steps 4 --warmup 1 --rounds 1 --engines hf-padded,kubetune,kubetune-per-segment}"
rm -rf /tmp/kubetune-site
cd "$ROOT" && bash hack/device/check.sh
