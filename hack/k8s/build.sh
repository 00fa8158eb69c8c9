#!/usr/bin/env bash
# Builds the Kubernetes test binaries from Go modules into a cache folder outside the clone.
#
#   bash hack/k8s/build.sh            build what is missing, print the bin folder on stdout
#
# Binaries: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy
# (k8s.io/kubernetes),
# etcd (go.etcd.io/etcd/server/v3), kwok + kwokctl (sigs.k8s.io/kwok), helm (helm.sh/helm/v3),
# kueue (sigs.k8s.io/kueue), registry (github.com/distribution/distribution/v3), coredns
# (github.com/coredns/coredns, with the plugins named in hack/k8s/coredns/main.go).
# Each tool group is its own Go module under hack/k8s/<group>/ so that every tool builds with the
# dependency set its upstream release was tested with (kwok and helm pin newer k8s.io libraries
# than kubernetes 1.34, and etcd 3.6 needs newer grpc/otel than kube-apiserver 1.34 ships with).
#
# Environment:
#   KUBETUNE_K8S_BIN  use this existing folder of binaries instead of building (like envtest's
#                     KUBEBUILDER_ASSETS); it is checked, not modified.
#   KUBETUNE_CACHE    cache root (default ~/.cache/kubetune); binaries go to
#                     $KUBETUNE_CACHE/k8s/<kube version>/bin, stamps beside them.
# Go's own caches stay where Go keeps them (GOMODCACHE, GOCACHE) so a warm machine relinks nothing.
#
# Idempotent: a group is rebuilt only when its stamp (versions, go.sum, Go version, ldflags) changed
# or one of its binaries is missing. Progress goes to stderr; stdout carries only the bin folder.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd kwok kwokctl helm kueue registry coredns)

log() { printf '[k8s-bin] %s\n' "$*" >&2; }

check_bin_dir() {
  local dir="$1" missing=()
  for b in "${BINARIES[@]}"; do
    [[ -x "$dir/$b" ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    log "missing in $dir: ${missing[*]}"
    return 1
  fi
}

if [[ -n "${KUBETUNE_K8S_BIN:-}" ]]; then
  check_bin_dir "$KUBETUNE_K8S_BIN" || { log "KUBETUNE_K8S_BIN is set but incomplete"; exit 1; }
  cd "$KUBETUNE_K8S_BIN" && pwd
  exit 0
fi

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; exit 1; }

# module_version <group> <module path>: the version that <group>/go.mod requires.
module_version() {
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$HERE/$1/go.mod"
}

KUBE_VERSION="$(module_version kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(module_version etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(module_version kwok sigs.k8s.io/kwok)"
HELM_VERSION="$(module_version helm helm.sh/helm/v3)"
KUEUE_VERSION="$(module_version kueue sigs.k8s.io/kueue)"
REGISTRY_VERSION="$(module_version registry github.com/distribution/distribution/v3)"
COREDNS_VERSION="$(module_version coredns github.com/coredns/coredns)"
for v in KUBE_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION KUEUE_VERSION REGISTRY_VERSION COREDNS_VERSION; do
  [[ -n "${!v}" ]] || { log "cannot read $v from hack/k8s/*/go.mod"; exit 1; }
done
KUBE_MINOR="$(cut -d. -f2 <<<"$KUBE_VERSION")"
# kubernetes stamps its release time as the build date; the module's commit time is the honest
# equivalent and keeps the binaries reproducible.
KUBE_DATE="$(cd "$HERE/kubernetes" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' \
  k8s.io/kubernetes 2>/dev/null || echo 1970-01-01T00:00:00Z)"

CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
ROOT="$CACHE/k8s/$KUBE_VERSION"
BIN="$ROOT/bin"
mkdir -p "$BIN" "$ROOT/stamps"

kube_ldflags() {
  local f="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$KUBE_MINOR"
    f+=" -X $p.gitTreeState=clean -X $p.buildDate=$KUBE_DATE -X $p.gitCommit="
  done
  echo "$f"
}

# group: <name> <ldflags> <binaries...> are built from the tool packages of hack/k8s/<name>.
declare -A LDFLAGS=(
  [kubernetes]="$(kube_ldflags)"
  [etcd]="-s -w"
  [kwok]="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBE_VERSION#v}"
  [helm]="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$KUBE_MINOR -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$KUBE_MINOR"
  [kueue]="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  [registry]="-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION"
  [coredns]="-s -w"
)
declare -A OUTPUTS=(
  [kubernetes]="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
  [etcd]="etcd"
  [kwok]="kwok kwokctl"
  [helm]="helm"
  [kueue]="kueue"
  [registry]="registry"
  [coredns]="coredns"
)
GROUPS_ORDER=(kubernetes etcd kwok helm kueue registry coredns)

GO_VERSION="$(go env GOVERSION)"
stamp_of() {
  local g="$1" sources=("$HERE/$1"/*.go) # a group's own main package (coredns), if any
  [[ -e "${sources[0]}" ]] || sources=()
  { echo "$GO_VERSION"; echo "${LDFLAGS[$g]}"; cat "$HERE/$g/go.mod" "$HERE/$g/go.sum" "${sources[@]}"; } |
    sha256sum | cut -c1-16
}

# Two builds at once (a test session and `make k8s-bin`) would race on the same files.
exec 9>"$ROOT/.lock"
flock 9

export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
total_start=$SECONDS
built=()
tmp=""
trap 'if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi' EXIT
for g in "${GROUPS_ORDER[@]}"; do
  want="$(stamp_of "$g")"
  have="$(cat "$ROOT/stamps/$g" 2>/dev/null || true)"
  complete=1
  for b in ${OUTPUTS[$g]}; do [[ -x "$BIN/$b" ]] || complete=0; done
  if [[ "$want" == "$have" && $complete == 1 ]]; then
    continue
  fi
  log "building $g (${OUTPUTS[$g]}) ..."
  start=$SECONDS
  tmp="$(mktemp -d "$ROOT/build.XXXXXX")"
  # The tool packages are declared with `tool` directives in each go.mod.
  mapfile -t pkgs < <(awk '/^tool \(/{t=1;next} t&&/^\)/{t=0} t{print $1} /^tool [^(]/{print $2}' "$HERE/$g/go.mod")
  out="$tmp/"
  # A lone package is named explicitly: etcd's main package path ends in .../server/v3.
  if ((${#pkgs[@]} == 1)); then out="$tmp/${OUTPUTS[$g]}"; fi
  (cd "$HERE/$g" && go build -ldflags "${LDFLAGS[$g]}" -o "$out" "${pkgs[@]}")
  for b in ${OUTPUTS[$g]}; do mv -f "$tmp/$b" "$BIN/$b"; done
  rm -rf "$tmp"
  echo "$want" >"$ROOT/stamps/$g"
  log "built $g in $((SECONDS - start))s"
  built+=("$g")
done

if ((${#built[@]})); then
  log "build time: $((SECONDS - total_start))s for ${built[*]} on $(nproc) cores (cold Go caches cost most)"
fi
{
  echo "kubernetes $KUBE_VERSION"
  echo "etcd $ETCD_VERSION"
  echo "kwok $KWOK_VERSION"
  echo "helm $HELM_VERSION"
  echo "kueue $KUEUE_VERSION"
  echo "registry $REGISTRY_VERSION"
  echo "coredns $COREDNS_VERSION"
  echo "go $GO_VERSION"
} >"$ROOT/VERSIONS"
check_bin_dir "$BIN"
echo "$BIN"
