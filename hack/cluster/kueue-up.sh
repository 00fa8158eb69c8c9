#!/usr/bin/env bash
# Runs the real Kueue controller against a kubetune test cluster (started by cluster-up.sh), as a
# local process beside the control plane, the way kwokctl runs kube-apiserver.
#
#   bash hack/cluster/kueue-up.sh          prints the Kueue state folder as its last stdout line
#
# What it sets up (idempotent: a healthy Kueue started by this same script is reused):
# - Kueue's own CRDs, from the pinned module (hack/k8s/kueue/go.mod), with their v1beta1<->v1beta2
#   conversion webhook;
# - its admission webhooks for Jobs, Pods, Deployments and Kueue's own kinds (the other
#   integrations are off), with the namespace selectors of Kueue's kustomization;
# - a serving certificate for 127.0.0.1 made here with openssl, so the API server calls the
#   webhooks by URL instead of through a Service (the test cluster runs no kube-proxy);
# - Kueue itself with `integrations: [batch/job, pod, deployment]` (queued trainer Jobs, queued
#   vLLM servers), no leader election, no metrics listener.
# State (config, certificates, kueue.log, kueue.pid) lives in the cluster's folder, so
# cluster-down.sh stops Kueue with the cluster.
#
# Environment: KUBETUNE_CLUSTER_NAME, KUBETUNE_CACHE, KUBETUNE_K8S_BIN as for cluster-up.sh;
# KUBETUNE_KUEUE_TIMEOUT seconds to wait for Kueue to be ready (default 120).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NAME="${KUBETUNE_CLUSTER_NAME:-kubetune}"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
TIMEOUT="${KUBETUNE_KUEUE_TIMEOUT:-120}"
CLUSTER_DIR="$CACHE/kwok/clusters/$NAME"
KUBECONFIG_PATH="$CLUSTER_DIR/kubeconfig.yaml"
STATE="$CLUSTER_DIR/kueue"

log() { printf '[kueue-up] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[[ -f "$KUBECONFIG_PATH" ]] || die "no cluster $NAME (run hack/cluster/cluster-up.sh first)"
command -v openssl >/dev/null || die "openssl is needed for Kueue's webhook certificate (apt-get install openssl)"
BIN="$(bash "$REPO/hack/k8s/build.sh")"
kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

pid_alive() { [[ -f "$STATE/kueue.pid" ]] && kill -0 "$(cat "$STATE/kueue.pid")" 2>/dev/null; }
ready() {
  [[ -f "$STATE/health-port" ]] &&
    python3 - "$(cat "$STATE/health-port")" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2).read()
EOF
}

STAMP="$( (cat "$HERE/kueue-up.sh" "$HERE/kueue_manifests.py"; echo "$BIN") | sha256sum | cut -c1-16)"
if pid_alive && ready && [[ "$(cat "$STATE/stamp" 2>/dev/null)" == "$STAMP" ]]; then
  log "reusing Kueue of cluster $NAME (pid $(cat "$STATE/kueue.pid"))"
  echo "$STATE"
  exit 0
fi
if pid_alive; then
  kill "$(cat "$STATE/kueue.pid")" 2>/dev/null || true
fi
rm -rf "$STATE"
mkdir -p "$STATE/certs"
start=$SECONDS

# The CRDs and webhook manifests of the pinned release, from the Go module cache.
SRC="$(cd "$REPO/hack/k8s/kueue" && go mod download -json sigs.k8s.io/kueue |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
[[ -d "$SRC/config/components/crd/bases" ]] || die "no CRDs in $SRC"

read -r WEBHOOK_PORT HEALTH_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
echo "$HEALTH_PORT" >"$STATE/health-port"
echo "$STAMP" >"$STATE/stamp"

# A throwaway CA and a serving certificate for 127.0.0.1, valid for the cluster's life.
(
  cd "$STATE/certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=kubetune-test-kueue-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout tls.key -out tls.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >ext.cnf
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile ext.cnf -out tls.crt 2>/dev/null
  rm -f tls.csr ext.cnf ca.srl
)
CA_BUNDLE="$(base64 -w0 <"$STATE/certs/ca.crt")"

# With internalCertManagement off, Kueue 0.17 loads a metrics certificate from this fixed path
# even when its metrics listener is off; an existing one is left as it is.
METRICS_CERTS=/etc/kueue/metrics/certs
if [[ ! -f "$METRICS_CERTS/tls.crt" ]]; then
  mkdir -p "$METRICS_CERTS" 2>/dev/null && cp "$STATE/certs/tls.crt" "$STATE/certs/tls.key" "$METRICS_CERTS/" ||
    die "Kueue needs $METRICS_CERTS/tls.{crt,key} (any certificate; its metrics are off): create it as root"
fi

cat >"$STATE/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$HEALTH_PORT
metrics:
  bindAddress: "0"
webhook:
  host: 127.0.0.1
  port: $WEBHOOK_PORT
  certDir: $STATE/certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
integrations:
  frameworks:
  - batch/job
  - pod
  - deployment
EOF

# Service references become URLs on 127.0.0.1; only the webhooks of the integrations above and
# of Kueue's own kinds are registered (a webhook for an integration that is off would refuse).
rewrite() { python3 "$HERE/kueue_manifests.py" "$1" "https://127.0.0.1:$WEBHOOK_PORT" "$CA_BUNDLE"; }

kubectl create namespace kueue-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create --dry-run=client -o json -f "$SRC/config/components/crd/bases" | rewrite crds |
  kubectl apply --server-side --force-conflicts -f - >/dev/null
mapfile -t crds < <(kubectl get crd -o name | grep 'kueue.x-k8s.io')
kubectl wait --for condition=Established --timeout 60s "${crds[@]}" >/dev/null

KUBECONFIG="$KUBECONFIG_PATH" setsid "$BIN/kueue" --config "$STATE/config.yaml" \
  --feature-gates VisibilityOnDemand=false >"$STATE/kueue.log" 2>&1 </dev/null &
echo $! >"$STATE/kueue.pid"

deadline=$((SECONDS + TIMEOUT))
until ready; do
  pid_alive || die "Kueue exited; the end of $STATE/kueue.log: $(tail -n 20 "$STATE/kueue.log")"
  ((SECONDS < deadline)) || die "Kueue not ready after ${TIMEOUT}s; see $STATE/kueue.log"
  sleep 0.5
done
# Registered once Kueue serves them: with failurePolicy Fail, a webhook nobody answers would
# refuse every Job.
# The kustomization adds the namespace selectors that keep the Pod and Deployment webhooks off
# kube-system and kueue-system.
kubectl kustomize "$SRC/config/components/webhook" | kubectl create --dry-run=client -o json -f - |
  rewrite webhooks | kubectl apply --server-side --force-conflicts -f - >/dev/null

log "Kueue ready for cluster $NAME in $((SECONDS - start))s (log: $STATE/kueue.log)"
echo "$STATE"
