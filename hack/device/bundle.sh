#!/usr/bin/env bash
# Prepares what a GPU device machine needs for hack/device/check.sh, in .device/ (git-ignored):
# wheels of the packages in hack/device/requirements.txt for the device's Python, and a wheel of
# kubetune built from this checkout. The device machine reaches no registry, so everything it
# installs travels with the call (`carry: [".device"]`, 64 MiB at most).
#
#   hack/device/bundle.sh        # then, on the device: bash hack/device/check.sh
#
# Downloads are cached outside the clone, keyed by the requirements and the Python version.
set -euo pipefail
export PYTHONSAFEPATH=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEVICE_PYTHON="${DEVICE_PYTHON:-3.12}"  # the device image's python3 (KINDS.md: 3.12.3)
REQS="$ROOT/hack/device/requirements.txt"
PY="$(bash "$ROOT/hack/venv.sh")/bin/python"
key="$( (cat "$REQS"; echo "$DEVICE_PYTHON") | sha256sum | cut -c1-16)"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/device-wheels/$key"
OUT="$ROOT/.device"

if [[ ! -f "$CACHE/.complete" ]]; then
  rm -rf "$CACHE" && mkdir -p "$CACHE"
  platforms=()
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  "$PY" -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: \
    --python-version "$DEVICE_PYTHON" --implementation cp "${platforms[@]}" \
    -d "$CACHE" -r <(grep -vE '^\s*(#|$)' "$REQS")
  # bitsandbytes ships one CUDA library per toolkit (43 MB in all); keep the CPU one and CUDA 13's.
  bnb="$(ls "$CACHE"/bitsandbytes-*.whl)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && unzip -q "$bnb" \
    && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete \
    && rm "$bnb" && zip -q -r "$bnb" .)
  rm -rf "$tmp"
  touch "$CACHE/.complete"
fi

rm -rf "$OUT" && mkdir -p "$OUT/wheels"
cp "$CACHE"/*.whl "$OUT/wheels/"
"$PY" -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation \
  -w "$OUT/wheels" "$ROOT" >/dev/null
du -sh "$OUT" | awk '{print "hack/device/bundle.sh: " $1 " in .device/ (carry limit 64 MiB)"}'
