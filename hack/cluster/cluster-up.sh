#!/usr/bin/env bash
# Starts (or reuses) the kubetune test cluster: a real etcd, kube-apiserver, kube-controller-manager
# and kube-scheduler run as local processes by kwokctl's binary runtime, and then either
#   - kwok simulating 2 GPU nodes (8 nvidia.com/gpu each) and 1 CPU node, with Kueue (kueue-up.sh)
#     to queue jobs for them (KUBETUNE_CLUSTER_NODES=kwok, the default), or
#   - one real node, whose kubelet and containerd run the pods (KUBETUNE_CLUSTER_NODES=real,
#     hack/node/node-up.sh; needs root). No kwok and no Kueue there.
# Nothing is downloaded: every binary comes from hack/k8s/build.sh (or KUBETUNE_K8S_BIN).
#
#   bash hack/cluster/cluster-up.sh        prints the kubeconfig path as its last stdout line
#
# Environment:
#   KUBETUNE_CLUSTER_NAME  cluster name (default kubetune, or kubetune-real with real nodes)
#   KUBETUNE_CLUSTER_NODES kwok (default) or real
#   KUBETUNE_CACHE         cache root (default ~/.cache/kubetune); kwokctl's clusters live in
#                          $KUBETUNE_CACHE/kwok/clusters/<name>/, kubeconfig.yaml among them
#   KUBETUNE_K8S_BIN       an existing folder of binaries to use instead of building
#   KUBETUNE_CLUSTER_TIMEOUT  seconds to wait for the control plane and nodes (default 120)
# It never touches ~/.kube/config; use `export KUBECONFIG=<printed path>`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
source "$HERE/name.sh"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
TIMEOUT="${KUBETUNE_CLUSTER_TIMEOUT:-120}"
export KWOK_WORKDIR="$CACHE/kwok"
CLUSTER_DIR="$KWOK_WORKDIR/clusters/$NAME"
KUBECONFIG_PATH="$CLUSTER_DIR/kubeconfig.yaml"

log() { printf '[cluster-up] %s\n' "$*" >&2; }

BIN="$(bash "$REPO/hack/k8s/build.sh")"
kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }
kwokctl() { "$BIN/kwokctl" --name "$NAME" "$@"; }

healthy() { [[ -f "$KUBECONFIG_PATH" ]] && kubectl get --raw /readyz >/dev/null 2>&1; }

# A cluster made from other stages, settings or binaries is recreated rather than reused.
if [[ "$NODES" == kwok ]]; then
  CONFIGS=(--config "$HERE/kwokctl.yaml" --config "$HERE/stages.yaml" --kwok-controller-binary "$BIN/kwok")
  CONFIG_FILES=("$HERE/kwokctl.yaml" "$HERE/stages.yaml")
else
  # The API server calls the kubelet (logs, exec) as the cluster's admin, by its InternalIP.
  CONFIGS=(--config "$HERE/kwokctl-real.yaml"
    --extra-args "kube-apiserver=kubelet-client-certificate=$CLUSTER_DIR/pki/admin.crt"
    --extra-args "kube-apiserver=kubelet-client-key=$CLUSTER_DIR/pki/admin.key")
  CONFIG_FILES=("$HERE/kwokctl-real.yaml")
fi
STAMP="$(cat "${CONFIG_FILES[@]}" "$BIN/../VERSIONS" 2>/dev/null; echo "$BIN")"
STAMP="$(sha256sum <<<"$STAMP" | cut -c1-16)"
STAMP_FILE="$CLUSTER_DIR/kubetune.stamp"
if [[ -d "$CLUSTER_DIR" && "$(cat "$STAMP_FILE" 2>/dev/null)" != "$STAMP" ]]; then
  log "cluster $NAME was made from other settings; recreating it"
  kwokctl delete cluster --kubeconfig "$KUBECONFIG_PATH" >&2 || true
  rm -rf "$CLUSTER_DIR"
fi

start=$SECONDS
if healthy; then
  log "reusing running cluster $NAME"
elif [[ -d "$CLUSTER_DIR" ]] && kwokctl start cluster --wait "${TIMEOUT}s" >&2 && healthy; then
  # Its processes were gone (a reboot, a killed session) but its state was intact.
  log "restarted cluster $NAME"
else
  if [[ -d "$CLUSTER_DIR" ]]; then
    log "cluster $NAME is broken; recreating it"
    kwokctl delete cluster --kubeconfig "$KUBECONFIG_PATH" >&2 || true
    rm -rf "$CLUSTER_DIR"
  fi
  # kwokctl reads the versions from these binaries; the env vars only keep its defaults (used to
  # build download URLs that are never fetched) consistent with them.
  KWOK_KUBE_VERSION="$("$BIN/kube-apiserver" --version | awk '{print $2}')"
  KWOK_ETCD_VERSION="$("$BIN/etcd" --version | awk '/^etcd Version:/ {print $3}')"
  export KWOK_KUBE_VERSION KWOK_ETCD_VERSION KWOK_KUBECTL_BINARY="$BIN/kubectl"
  log "creating cluster $NAME (kubernetes $KWOK_KUBE_VERSION, etcd $KWOK_ETCD_VERSION)"
  kwokctl create cluster \
    "${CONFIGS[@]}" \
    --kubeconfig "" \
    --kube-apiserver-binary "$BIN/kube-apiserver" \
    --kube-controller-manager-binary "$BIN/kube-controller-manager" \
    --kube-scheduler-binary "$BIN/kube-scheduler" \
    --etcd-binary "$BIN/etcd" \
    --timeout "${TIMEOUT}s" \
    --wait "${TIMEOUT}s" >&2
  echo "$STAMP" >"$STAMP_FILE"
fi

if [[ "$NODES" == kwok ]]; then
  # Idempotent: a reused cluster gets any node a test deleted back.
  kubectl apply -f "$HERE/nodes.yaml" >&2
  kubectl wait --for=condition=Ready node --all --timeout="${TIMEOUT}s" >&2
else
  bash "$REPO/hack/node/node-up.sh" "$CLUSTER_DIR"
fi
# Pods are rejected until the ServiceAccount admission plugin finds the namespace's default
# ServiceAccount, which the controller-manager creates shortly after start.
deadline=$((SECONDS + TIMEOUT))
until kubectl get serviceaccount default --namespace default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || { log "no default ServiceAccount after ${TIMEOUT}s"; exit 1; }
  sleep 0.5
done
# Kueue is part of the kwok cluster: its Job webhook must be served whenever the cluster runs.
if [[ "$NODES" == kwok ]]; then bash "$HERE/kueue-up.sh" >/dev/null; fi
log "cluster $NAME ready in $((SECONDS - start))s; export KUBECONFIG=$KUBECONFIG_PATH"
echo "$KUBECONFIG_PATH"
