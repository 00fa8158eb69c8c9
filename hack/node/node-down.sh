#!/usr/bin/env bash
# Stops the real node of a test cluster (hack/node/node-up.sh) and leaves the machine as it was:
# the node's pods are evicted first while the API server is up, so the kubelet tears their network
# and volumes down itself; then kube-proxy removes its iptables rules, and what is left of
# containers, mounts and the bridge is removed. containerd's image store stays for the next node.
#
#   bash hack/node/node-down.sh <cluster dir>
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
source "$HERE/lib.sh" "${1:-}"
[[ -d "$RUN" ]] || exit 0
BIN="$(bash "$REPO/hack/k8s/build.sh")"
kubectl() { "$BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig.yaml" --request-timeout 10s "$@"; }

if daemon_alive kubelet && kubectl get node "$NODE" >/dev/null 2>&1; then
  kubectl taint node "$NODE" kubetune.io/node-down=:NoExecute --overwrite >/dev/null 2>&1 || true
  for _ in $(seq 60); do
    [[ -z "$(kubectl get pods -A --field-selector "spec.nodeName=$NODE" -o name 2>/dev/null)" ]] && break
    sleep 1
  done
  kubectl delete node "$NODE" --wait=false >/dev/null 2>&1 || true
fi
stop_daemon kubelet 10
if daemon_alive kube-proxy; then
  stop_daemon kube-proxy 5
  "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
fi
# Pods the kubelet did not get to: stop their containers directly.
if daemon_alive containerd; then
  for task in $(ctr_ tasks list -q 2>/dev/null); do
    ctr_ tasks kill --signal SIGKILL "$task" >/dev/null 2>&1 || true
    ctr_ tasks delete --force "$task" >/dev/null 2>&1 || true
  done
  for c in $(ctr_ containers list -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
fi
stop_daemon containerd 10
stop_daemon registry 5
# Volumes the kubelet mounted (tokens, emptyDirs) and sandboxes' network namespaces.
mounts="$(findmnt -rn -o TARGET | grep -F "$RUN/" | sort -r || true)"
for target in $mounts; do umount -l "$target" || true; done
ip link delete "$BRIDGE" 2>/dev/null || true
# The chains the kubelet and the CNI firewall plugin made (kube-proxy --cleanup removed its own):
# first every jump to them, then the chains.
CHAINS=(KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT CNI-FORWARD CNI-ADMIN)
for cmd in iptables ip6tables; do
  for table in filter nat mangle; do
    rules="$("$cmd" -t "$table" -S 2>/dev/null || true)"
    for chain in "${CHAINS[@]}"; do
      jumps="$(grep -E -- "^-A [A-Z-]+ .*-j $chain\$" <<<"$rules" || true)"
      while read -r rule; do
        [[ -n "$rule" ]] && eval "$cmd -t $table ${rule/#-A/-D}" 2>/dev/null || true
      done <<<"$jumps"
    done
    for chain in "${CHAINS[@]}"; do
      "$cmd" -t "$table" -F "$chain" 2>/dev/null && "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
done
if [[ "$(cat "$STORE/cluster" 2>/dev/null)" == "$CLUSTER_DIR" ]]; then rm -f "$STORE/cluster"; fi
rm -rf "$RUN"
log "node $NODE stopped"
