#!/usr/bin/env bash
# Puts docker images where the real node's kubelet finds them: pushed to the node's registry
# (localhost:5000, hack/node/node-up.sh) under a tag made of the docker image ID, and pulled into
# containerd ahead of the pods. Prints one reference per image, in order, for pod specs.
#
#   bash hack/node/push-images.sh <cluster dir> <image>...
#
# A new tag per build keeps IfNotPresent pull policies honest. Layers the registry and containerd
# already hold are neither pushed nor pulled again, so after a code change only the top layer of
# each image moves (seconds); the first push of the trainer and server-cpu images moves ~8 GB.
# containerd keeps one tag per image; the registry keeps every tag pushed (small: a code change
# makes new top layers only).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh" "${1:-}"
shift
daemon_alive containerd && daemon_alive registry || die "no real node runs for $CLUSTER_DIR (hack/node/node-up.sh)"

refs=()
for image in "$@"; do
  id="$(docker image inspect --format '{{.Id}}' "$image")" || die "docker has no image $image"
  id="${id#sha256:}"
  ref="$REGISTRY/${image%:*}:${id:0:12}"
  refs+=("$ref")
  if ! ctr_ images check "name==$ref" 2>/dev/null | grep -q complete; then
    start=$SECONDS
    docker tag "$image" "$ref"
    docker push --quiet "$ref" >/dev/null || die "docker push $ref failed"
    docker rmi "$ref" >/dev/null  # the tag only; the image stays under its own name
    ctr_ images pull --plain-http "$ref" >/dev/null || die "containerd could not pull $ref"
    log "$image -> $ref in $((SECONDS - start))s"
  fi
  # Earlier builds' tags go, and the names the CRI plugin gave them (sha256:<image ID>, whose
  # start the tag is); containerd's garbage collector then drops the layers nothing else uses.
  have="$(ctr_ images list -q)"
  for old in $(grep -F "$REGISTRY/${image%:*}:" <<<"$have" | grep -vxF "$ref" || true); do
    ctr_ images remove "$old" $(grep "^sha256:${old##*:}" <<<"$have" || true) >/dev/null
  done
done
printf '%s\n' "${refs[@]}"
