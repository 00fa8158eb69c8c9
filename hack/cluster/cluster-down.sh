#!/usr/bin/env bash
# Stops the kubetune test cluster (and its Kueue) and deletes its state (etcd data, certificates,
# logs).
#
#   bash hack/cluster/cluster-down.sh
#
# Environment: KUBETUNE_CLUSTER_NAME, KUBETUNE_CLUSTER_NODES, KUBETUNE_CACHE, KUBETUNE_K8S_BIN, as
# for cluster-up.sh. Deleting a cluster that does not exist is not an error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
source "$HERE/name.sh"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
export KWOK_WORKDIR="$CACHE/kwok"
CLUSTER_DIR="$KWOK_WORKDIR/clusters/$NAME"

if [[ ! -d "$CLUSTER_DIR" ]]; then
  echo "[cluster-down] no cluster $NAME" >&2
  exit 0
fi
# Kueue runs beside the control plane (kueue-up.sh), not under kwokctl.
if [[ -f "$CLUSTER_DIR/kueue/kueue.pid" ]]; then
  kill "$(cat "$CLUSTER_DIR/kueue/kueue.pid")" 2>/dev/null || true
fi
# A real node (hack/node/node-up.sh) goes first, while the API server can still evict its pods.
if [[ -d "$CLUSTER_DIR/node" ]]; then
  bash "$REPO/hack/node/node-down.sh" "$CLUSTER_DIR"
fi
BIN="$(bash "$REPO/hack/k8s/build.sh")"
# kwokctl wants a kubeconfig to remove the context from; the cluster's own is about to go.
"$BIN/kwokctl" --name "$NAME" delete cluster --kubeconfig "$CLUSTER_DIR/kubeconfig.yaml" >&2
rm -rf "$CLUSTER_DIR"
echo "[cluster-down] deleted cluster $NAME" >&2
