# Sourced by cluster-up.sh and cluster-down.sh: which nodes (KUBETUNE_CLUSTER_NODES) and which
# cluster (KUBETUNE_CLUSTER_NAME, defaulting by the nodes), refusing a mistyped kind of nodes
# rather than acting on the default cluster.
NODES="${KUBETUNE_CLUSTER_NODES:-kwok}"
case "$NODES" in
  kwok) NAME="${KUBETUNE_CLUSTER_NAME:-kubetune}" ;;
  real) NAME="${KUBETUNE_CLUSTER_NAME:-kubetune-real}" ;;
  *)
    echo "[$(basename "$0" .sh)] KUBETUNE_CLUSTER_NODES must be kwok or real, not '$NODES'" >&2
    exit 1
    ;;
esac
