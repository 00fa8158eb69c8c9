#!/usr/bin/env bash
# Makes sure a docker daemon answers. On a fresh Debian machine (root, no docker) it installs
# Debian's docker.io (and debootstrap, for hack/images/base.sh) and starts dockerd in the
# background, logging to ~/.cache/kubetune/dockerd.log; anywhere else it says what is missing.
set -euo pipefail
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"

docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "hack/images/docker.sh: no docker daemon answers; install and start docker" >&2
    exit 1
  fi
  echo "hack/images/docker.sh: apt-get install docker.io debootstrap" >&2
  apt() { DEBIAN_FRONTEND=noninteractive apt-get "$@" -y -q >/dev/null; }
  apt install docker.io debootstrap || { apt update && apt install docker.io debootstrap; }
fi
if ! docker info >/dev/null 2>&1; then
  [[ $EUID -eq 0 ]] || { echo "hack/images/docker.sh: dockerd is not running" >&2; exit 1; }
  mkdir -p "$CACHE"
  echo "hack/images/docker.sh: starting dockerd (log: $CACHE/dockerd.log)" >&2
  setsid dockerd >>"$CACHE/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
  echo "hack/images/docker.sh: dockerd did not answer in 60 s; the end of its log:" >&2
  tail -20 "$CACHE/dockerd.log" >&2
  exit 1
fi
