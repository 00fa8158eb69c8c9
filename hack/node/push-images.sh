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
# containerd and the registry keep one tag per image: older tags go, and with them the layers that
# only they used (the registry's garbage collector runs while the registry is stopped).
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
# The registry: older tags' manifests are deleted through its API, then its garbage collector
# frees the layers no tag uses any more. It runs with the registry stopped, as it must not race a
# push; this script is the only one that pushes.
accept="application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json"
deleted=0
for ref in "${refs[@]}"; do
  repo="${ref#"$REGISTRY"/}"
  tag="${repo##*:}"
  repo="${repo%:*}"
  # (None listed when the registry lost the repository that containerd still had: nothing to drop.)
  tags="$({ curl -sf "http://$REGISTRY/v2/$repo/tags/list" || echo '{}'; } |
    python3 -c 'import json, sys; print(*(json.load(sys.stdin).get("tags") or []))')"
  for old in $tags; do
    [[ "$old" != "$tag" ]] || continue
    digest="$(curl -sfI -H "Accept: $accept" "http://$REGISTRY/v2/$repo/manifests/$old" |
      tr -d '\r' | awk -F': ' 'tolower($1) == "docker-content-digest" { print $2 }' || true)"
    [[ -n "$digest" ]] || continue
    curl -sf -X DELETE "http://$REGISTRY/v2/$repo/manifests/$digest" >/dev/null ||
      die "the registry refused to delete $repo:$old ($digest)"
    deleted=$((deleted + 1))
  done
done
if ((deleted)); then
  start=$SECONDS
  before="$(du -sm "$STORE/registry" | cut -f1)"
  BIN="$(bash "$HERE/../k8s/build.sh")"
  stop_daemon registry
  "$BIN/registry" garbage-collect --delete-untagged "$RUN/registry.yaml" >>"$RUN/logs/registry-gc.log" 2>&1 ||
    die "registry garbage-collect failed (log: $RUN/logs/registry-gc.log)"
  start_daemon registry "$BIN/registry" serve "$RUN/registry.yaml"
  wait_for "the registry" 30 curl -sf "http://$REGISTRY/v2/"
  log "registry: $deleted older tags removed, $((before - $(du -sm "$STORE/registry" | cut -f1))) MB freed in $((SECONDS - start))s"
fi
printf '%s\n' "${refs[@]}"
