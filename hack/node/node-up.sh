#!/usr/bin/env bash
# Joins a real node to a test cluster: containerd (CRI) runs the pods with runc, the kubelet built
# from k8s.io/kubernetes registers the node, kube-proxy routes Services with iptables, Debian's
# CNI plugins give each pod an address on a bridge, and CoreDNS (hack/node/dns.yaml) answers for
# cluster.local. Pods scheduled here really run.
#
#   bash hack/node/node-up.sh <cluster dir>      the kwokctl cluster folder (pki/, kubeconfig.yaml)
#
# Needs root (containerd, kubelet and iptables do). On a Debian machine without them it installs
# containerd, runc, containernetworking-plugins, conntrack and curl from apt.
# One real node per machine: it owns the bridge, the iptables rules and ports 5000 (its image
# registry, on the loopback), 10248 and 10250.
#
# Layout: the node's working files are in <cluster dir>/node/ (configs, logs, pids, the kubelet's
# root); containerd's and the registry's stores are shared by clusters in $KUBETUNE_CACHE/node/ so
# that a warm machine keeps its images (hack/node/push-images.sh).
#
# Environment:
#   KUBETUNE_NODE_NAME     node name (default kubetune-node)
#   KUBETUNE_CACHE         cache root (default ~/.cache/kubetune)
#   KUBETUNE_NODE_TIMEOUT  seconds to wait for the node to be Ready (default 120)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
source "$HERE/lib.sh" "${1:-}"
TIMEOUT="${KUBETUNE_NODE_TIMEOUT:-120}"
# The pod network (the Service range is in hack/cluster/kwokctl-real.yaml).
POD_SUBNET=10.244.0.0/24

[[ $EUID -eq 0 ]] || die "a real node needs root: containerd, the kubelet and kube-proxy manage cgroups, mounts and iptables"
[[ -f "$CLUSTER_DIR/pki/ca.key" ]] || die "$CLUSTER_DIR has no pki/ca.key: not a kwokctl cluster folder"

install_missing_packages
BIN="$(bash "$REPO/hack/k8s/build.sh")"
kwokctl() { KWOK_WORKDIR="$(dirname "$(dirname "$CLUSTER_DIR")")" "$BIN/kwokctl" --name "$(basename "$CLUSTER_DIR")" "$@"; }
kubectl() { "$BIN/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig.yaml" "$@"; }

other="$(running_node_cluster)"
if [[ -n "$other" && "$other" != "$CLUSTER_DIR" ]]; then
  die "a real node already runs for $other; stop it first (bash hack/node/node-down.sh $other)"
fi
mkdir -p "$RUN/logs" "$RUN/cni" "$STORE"
echo "$CLUSTER_DIR" >"$STORE/cluster"

# The address the API server reaches the kubelet on, and pods reach the API server on.
NODE_IP="$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}')"
NODE_IP="${NODE_IP:-$(ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}')}"
[[ -n "$NODE_IP" ]] || die "no IPv4 address on this machine"

# Pods reach each other and the API server through the bridge; kube-proxy's rules see bridged
# traffic only with br_netfilter.
modprobe br_netfilter 2>/dev/null || true
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 2>/dev/null ||
  log "could not set net.ipv4.ip_forward / bridge-nf-call-iptables; Services may not route"

# Credentials, each signed by the cluster's CA: the kubelet as system:node:<name> (the Node
# authorizer limits it to its own pods), kube-proxy as system:kube-proxy (system:node-proxier).
[[ -f "$RUN/kubelet.kubeconfig" ]] ||
  kwokctl get kubeconfig --user "system:node:$NODE" --group system:nodes --host "$NODE_IP" >"$RUN/kubelet.kubeconfig"
[[ -f "$RUN/kube-proxy.kubeconfig" ]] ||
  kwokctl get kubeconfig --user system:kube-proxy --group "" --host "$NODE_IP" >"$RUN/kube-proxy.kubeconfig"

# --- containerd ---------------------------------------------------------------------------------
PAUSE_IMAGE="$(pause_image)"
DNS_IMAGE="$(binary_image coredns "$BIN/coredns" "$STORE/coredns-image.tar")"
cat >"$RUN/containerd.toml" <<EOF
version = 2
root = "$STORE/containerd"
state = "$RUN/containerd-state"
[grpc]
  address = "$RUN/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The kubelet asks for oom_score_adj -998 (sandboxes) and -997 (Guaranteed pods); lowering it
  # needs CAP_SYS_RESOURCE, which root lacks on some VMs (Firecracker here). Keep it at least ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$RUN/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  # The node's registry (hack/node/push-images.sh), over plain HTTP on the loopback.
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."$REGISTRY"]
    endpoint = ["http://$REGISTRY"]
EOF
# The firewall plugin accepts the pods' traffic in FORWARD, whose policy dockerd sets to DROP.
cat >"$RUN/cni/10-kubetune.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kubetune",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_SUBNET"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$RUN/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall"}
  ]
}
EOF
start_daemon containerd containerd --config "$RUN/containerd.toml"
wait_for "containerd" 30 ctr_ version
for archive in pause-image.tar coredns-image.tar; do ctr_ images import "$STORE/$archive" >/dev/null; done

# --- the image registry -------------------------------------------------------------------------
# Its storage is shared by clusters, like containerd's, so a warm machine pushes only new layers.
cat >"$RUN/registry.yaml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $STORE/registry}
  delete: {enabled: true} # push-images.sh deletes older tags, then collects their layers
http:
  addr: $REGISTRY
EOF
start_daemon registry "$BIN/registry" serve "$RUN/registry.yaml"
wait_for "the registry" 30 curl -sf "http://$REGISTRY/v2/"

# --- kubelet ------------------------------------------------------------------------------------
cat >"$RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$RUN/containerd.sock
# The API server calls the kubelet (logs, exec) with its client certificate; nobody else may.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $CLUSTER_DIR/pki/ca.crt}
authorization: {mode: Webhook}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# This machine: cgroup v1 without systemd as PID 1, swap allowed.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: /etc/resolv.conf
# Evict only when the disk is really full: the defaults (10% and 15% free) trip on a big disk
# that docker's copies of the images share.
evictionHard: {memory.available: 256Mi, nodefs.available: 1Gi, imagefs.available: 1Gi}
# No image garbage collection before the disk is full: with the default (85% used) a machine
# holding docker's copies of the images deleted the imported pause image, which no registry can
# give back, and every pod sandbox failed after it ("failed to get sandbox image").
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
start_daemon kubelet "$BIN/kubelet" --config "$RUN/kubelet.yaml" --kubeconfig "$RUN/kubelet.kubeconfig" \
  --root-dir "$RUN/kubelet" --cert-dir "$RUN/kubelet-pki" --hostname-override "$NODE" \
  --node-ip "$NODE_IP" --node-labels kubetune.io/node=real

# --- kube-proxy ---------------------------------------------------------------------------------
cat >"$RUN/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $RUN/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_SUBNET
hostnameOverride: $NODE
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the machine's conntrack table size alone (a VM may not allow setting it).
conntrack: {maxPerCore: 0, min: 0}
EOF
start_daemon kube-proxy "$BIN/kube-proxy" --config "$RUN/kube-proxy.yaml"

start=$SECONDS
until kubectl wait --for=condition=Ready "node/$NODE" --timeout=5s >/dev/null 2>&1; do
  for d in containerd registry kubelet kube-proxy; do
    daemon_alive "$d" || { tail -30 "$RUN/logs/$d.log" >&2; die "$d exited (log: $RUN/logs/$d.log)"; }
  done
  ((SECONDS - start < TIMEOUT)) || { tail -30 "$RUN/logs/kubelet.log" >&2; die "node $NODE not Ready after ${TIMEOUT}s"; }
done
log "node $NODE ($NODE_IP) Ready in $((SECONDS - start))s"

# --- cluster DNS --------------------------------------------------------------------------------
sed -e "s|@IMAGE@|$DNS_IMAGE|" -e "s|@DNS_IP@|$DNS_IP|" "$HERE/dns.yaml" | kubectl apply -f - >/dev/null
kubectl -n kube-system rollout status deployment/coredns --timeout "${TIMEOUT}s" >/dev/null ||
  die "CoreDNS not ready after ${TIMEOUT}s: $(kubectl -n kube-system logs deployment/coredns --tail 20 2>&1)"
log "cluster DNS ready on $DNS_IP (CoreDNS, image $DNS_IMAGE)"
