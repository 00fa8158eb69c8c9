# Shared by node-up.sh, node-down.sh and push-images.sh, which source it with the cluster folder
# as their first argument: `source "$HERE/lib.sh" "$1"`.

CLUSTER_DIR="$(cd "${1:?usage: $(basename "$0") <cluster dir> ...}" && pwd)"
NODE="${KUBETUNE_NODE_NAME:-kubetune-node}"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
STORE="$CACHE/node"   # containerd's and the registry's stores, shared by clusters
RUN="$CLUSTER_DIR/node" # this node's configs, logs, pids and kubelet root

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { log "$*"; exit 1; }

# Where the CNI plugins are: Debian's package puts them in /usr/lib/cni, upstream in /opt/cni/bin.
find_cni_bin() { for d in /usr/lib/cni /opt/cni/bin; do [[ -x "$d/bridge" ]] && echo "$d" && return; done; }
CNI_BIN="$(find_cni_bin || true)"
BRIDGE=kubetune0
# The cluster DNS Service (hack/node/dns.yaml), in the Service range of hack/cluster/kwokctl-real.yaml.
DNS_IP=10.0.0.10
# The node's image registry: docker pushes there, containerd pulls from there (plain HTTP).
REGISTRY=localhost:5000

# Debian's packages for the container runtime and the pod network, installed when missing.
install_missing_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [[ -n "$CNI_BIN" ]] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v curl >/dev/null || missing+=(curl)
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "install ${missing[*]} (no apt-get here)"
  log "apt-get install ${missing[*]}"
  apt() { DEBIAN_FRONTEND=noninteractive apt-get "$@" -y -q >/dev/null; }
  apt install "${missing[@]}" || { apt update && apt install "${missing[@]}"; }
  CNI_BIN="$(find_cni_bin)"
}

ctr_() { ctr --address "$RUN/containerd.sock" --namespace k8s.io "$@"; }

# The cluster folder whose node runs on this machine now, if any.
running_node_cluster() {
  local dir
  dir="$(cat "$STORE/cluster" 2>/dev/null || true)"
  [[ -n "$dir" && -f "$dir/node/containerd.pid" ]] && kill -0 "$(cat "$dir/node/containerd.pid")" 2>/dev/null &&
    echo "$dir"
  return 0
}

daemon_alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start_daemon <name> <command...>: runs it in its own session, logging to $RUN/logs/<name>.log;
# a daemon already running from an earlier node-up is kept.
start_daemon() {
  local name="$1"
  shift
  if daemon_alive "$name"; then
    log "$name already runs"
    return 0
  fi
  setsid "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

# stop_daemon <name> [seconds]: SIGTERM, then SIGKILL after the grace period.
stop_daemon() {
  local name="$1" grace="${2:-10}" pid
  daemon_alive "$name" || { rm -f "$RUN/$name.pid"; return 0; }
  pid="$(cat "$RUN/$name.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
}

# wait_for <what> <seconds> <command...>: until the command succeeds.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not answer in ${seconds}s"
}

# binary_image <name> <binary> <archive>: a one-binary OCI archive (binary_image.py), remade
# when the binary or the script changes; prints the image's name, tagged by that content.
binary_image() {
  local name="$1" binary="$2" archive="$3" key
  key="$({ sha256sum <"$binary"; cat "$HERE/binary_image.py"; } | sha256sum | cut -c1-12)"
  if [[ ! -f "$archive" || "$(cat "$archive.key" 2>/dev/null)" != "$key" ]]; then
    python3 "$HERE/binary_image.py" "$binary" "kubetune.local/$name:$key" "$archive"
    echo "$key" >"$archive.key"
  fi
  echo "kubetune.local/$name:$key"
}

# The pod sandbox image, built from hack/node/pause.go (rebuilt when the source or Go changes).
pause_image() {
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o pause "$HERE/pause.go")
  binary_image pause "$tmp/pause" "$STORE/pause-image.tar"
  rm -rf "$tmp"
}
