"""Drive the kubetune test cluster from Python: find or build the binaries, start, reuse or stop
a cluster, and talk to it through its kubectl.

The cluster is defined once, by hack/k8s/build.sh and hack/cluster/ (cluster-up.sh, nodes.yaml,
stages.yaml); this module only runs those scripts, so `make cluster-up` and the test fixtures bring
up the same thing. It needs the standard library only and never imports the kubernetes client:
tests see the API server through the 1.34 kubectl built beside it, as a user would.

Environment (all optional):

- ``KUBETUNE_TEST_KUBECONFIG``: run against the cluster behind this kubeconfig; nothing is created
  or deleted. It must carry the nodes and kwok stages of hack/cluster (cluster-up.sh gives them).
- ``KUBETUNE_TEST_REAL_KUBECONFIG``: the same for the pods tier, whose cluster has a real node
  (``KUBETUNE_CLUSTER_NODES=real bash hack/cluster/cluster-up.sh`` gives one).
- ``KUBETUNE_TEST_KEEP_CLUSTER=1``: leave a cluster that a session created running afterwards.
- ``KUBETUNE_K8S_BIN``, ``KUBETUNE_CACHE``: as for hack/k8s/build.sh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "k8s" / "build.sh"
CLUSTER_UP = REPO_ROOT / "hack" / "cluster" / "cluster-up.sh"
CLUSTER_DOWN = REPO_ROOT / "hack" / "cluster" / "cluster-down.sh"
PUSH_IMAGES = REPO_ROOT / "hack" / "node" / "push-images.sh"

ENV_KUBECONFIG = "KUBETUNE_TEST_KUBECONFIG"
ENV_REAL_KUBECONFIG = "KUBETUNE_TEST_REAL_KUBECONFIG"
ENV_KEEP = "KUBETUNE_TEST_KEEP_CLUSTER"
TEST_CLUSTER_PREFIX = "kubetune-test-"

# The simulated GPU pool (hack/cluster/nodes.yaml).
GPU_RESOURCE = "nvidia.com/gpu"
GPU_POOL_LABEL = "kubetune.io/gpu-pool"
GPU_POOL = "a100"
GPU_NODE_COUNT = 2
GPUS_PER_NODE = 8
GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
]

# Pod annotations read by the kwok stages (hack/cluster/stages.yaml); put them on a Job's pod
# template. Only pods owned by a Job finish; other pods stay Running and Ready.
RUN_SECONDS_ANNOTATION = "kwok.kubetune.io/run-seconds"
"""Seconds a Job's pod runs before it exits ("0.5", "30", or a Go duration like "1m"); default 3."""
EXIT_CODE_ANNOTATION = "kwok.kubetune.io/exit-code"
"""Integer exit code; anything but "0" makes the pod fail (phase Failed) instead of succeed."""
REASON_ANNOTATION = "kwok.kubetune.io/reason"
"""Terminated container reason of a failing pod, e.g. "OOMKilled"; default "Error"."""
MESSAGE_ANNOTATION = "kwok.kubetune.io/message"
"""Terminated container message of a failing pod; default empty."""

REAL_NODE = "kubetune-node"
"""The node of a cluster with real nodes (hack/node/node-up.sh)."""

T = TypeVar("T")
Nodes = Literal["kwok", "real"]
"""kwok: simulated GPU nodes (the cluster tier); real: one kubelet + containerd node (pods tier)."""


class ClusterError(RuntimeError):
    """A cluster script or kubectl call failed; the message carries its stderr."""


def cache_root() -> Path:
    """The cache root shared with the hack scripts (``KUBETUNE_CACHE``)."""
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def _run_script(script: Path, env: Mapping[str, str] | None = None) -> str:
    """Run a hack script; its progress (stderr) goes to ours, its last stdout line is returned."""
    proc = subprocess.run(
        ["bash", str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(
            f"{script.relative_to(REPO_ROOT)} failed with exit code {proc.returncode}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ClusterError(f"{script.relative_to(REPO_ROOT)} printed nothing on stdout")
    return lines[-1]


def ensure_binaries() -> Path:
    """Folder with kube-apiserver, kubectl, etcd, kwok, kwokctl, helm, ... at the pinned versions.

    Builds them on first use (slow on a cold machine: see docs/cluster.md) unless
    ``KUBETUNE_K8S_BIN`` names an existing folder.
    """
    return Path(_run_script(BUILD_SCRIPT))


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    description: str,
    interval: float = 0.25,
) -> T:
    """Poll ``condition`` until it returns something truthy and return that.

    Raises TimeoutError naming ``description`` and the last value seen, so a failing test says
    what it was waiting for and how far it got.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {description}; last: {last!r}"
            )
        time.sleep(interval)


@dataclass(frozen=True)
class Cluster:
    """A running cluster and the binaries that match it."""

    name: str
    """kwokctl cluster name, or "external" for a cluster given by ``KUBETUNE_TEST_KUBECONFIG``."""
    kubeconfig: Path
    """Admin kubeconfig of the cluster."""
    bin_dir: Path
    """Folder of the 1.34 binaries (kubectl, helm, kube-apiserver, ...)."""
    owned: bool
    """True when this harness created the cluster and deletes it at the end."""

    @property
    def kubectl_bin(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm_bin(self) -> Path:
        return self.bin_dir / "helm"

    def env(self) -> dict[str, str]:
        """Environment for a child process (an operator, helm) that should use this cluster."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with ``check`` a failure raises ClusterError."""
        cmd = [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def apply(self, *objects: Mapping[str, Any], namespace: str | None = None) -> None:
        """``kubectl apply`` the given objects (JSON is YAML, so no YAML library is needed)."""
        items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        ns_args = ["--namespace", namespace] if namespace else []
        self.kubectl("apply", *ns_args, "-f", "-", input=json.dumps(items))

    def get(self, *args: str) -> Any:
        """``kubectl get ... -o json``, parsed; ``None`` when the object does not exist."""
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise ClusterError(f"kubectl get {' '.join(args)} failed: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    def create_namespace(self, prefix: str = "kt-") -> str:
        """Create a namespace with a generated name and return the name."""
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"generateName": prefix}}
        proc = self.kubectl(
            "create", "-f", "-", "-o", "jsonpath={.metadata.name}", input=json.dumps(ns)
        )
        name = proc.stdout.strip()
        # Pods are refused until the namespace's default ServiceAccount exists.
        wait_until(
            lambda: self.get("serviceaccount", "default", "-n", name),
            timeout=60,
            description=f"the default ServiceAccount of namespace {name}",
        )
        return name

    def push_images(self, *images: str) -> list[str]:
        """Put docker images where the real node finds them (hack/node/push-images.sh); returns
        the references to use in pod specs, in order."""
        proc = subprocess.run(
            ["bash", str(PUSH_IMAGES), str(self.kubeconfig.parent), *images],
            stdout=subprocess.PIPE, text=True, timeout=3600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(f"hack/node/push-images.sh failed with exit code {proc.returncode}")
        refs = proc.stdout.split()
        assert len(refs) == len(images), proc.stdout
        return refs

    def server_ready(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0


def start(name: str, nodes: Nodes = "kwok") -> Cluster:
    """Start the cluster ``name`` with hack/cluster/cluster-up.sh (reused if already up): with
    kwok's simulated GPU nodes, or with one real node that runs its pods (root only)."""
    bin_dir = ensure_binaries()
    env = {"KUBETUNE_CLUSTER_NAME": name, "KUBETUNE_CLUSTER_NODES": nodes}
    kubeconfig = Path(_run_script(CLUSTER_UP, env))
    return Cluster(name=name, kubeconfig=kubeconfig, bin_dir=bin_dir, owned=True)


def stop(cluster: Cluster) -> None:
    """Delete a cluster this harness started; a cluster it did not start is left alone."""
    if cluster.owned:
        _run_script_quiet(CLUSTER_DOWN, {"KUBETUNE_CLUSTER_NAME": cluster.name})


def _run_script_quiet(script: Path, env: Mapping[str, str], *args: str) -> None:
    proc = subprocess.run(["bash", str(script), *args], env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        raise ClusterError(
            f"{script.relative_to(REPO_ROOT)} failed with exit code {proc.returncode}"
        )


def use_existing(kubeconfig: Path) -> Cluster:
    """Wrap a cluster started elsewhere (``make cluster-up``, another machine's cluster)."""
    if not kubeconfig.is_file():
        raise ClusterError(f"the test kubeconfig {kubeconfig} is not a file")
    cluster = Cluster(
        name="external", kubeconfig=kubeconfig, bin_dir=ensure_binaries(), owned=False
    )
    if not cluster.server_ready():
        raise ClusterError(f"the API server of {kubeconfig} is not ready")
    return cluster


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_test_clusters() -> None:
    """Delete test clusters whose pytest process died without tearing them down.

    Each session names its cluster ``kubetune-test-<pid>`` (``kubetune-test-real-<pid>`` with a
    real node); one whose pid is gone would keep its etcd and API server running (and their
    ports taken) forever.
    """
    clusters = cache_root() / "kwok" / "clusters"
    if not clusters.is_dir():
        return
    for path in clusters.iterdir():
        m = re.fullmatch(re.escape(TEST_CLUSTER_PREFIX) + r"(?:real-)?(\d+)", path.name)
        if m and not _pid_alive(int(m.group(1))):
            log.info("deleting stale test cluster %s", path.name)
            with contextlib.suppress(ClusterError):
                _run_script_quiet(CLUSTER_DOWN, {"KUBETUNE_CLUSTER_NAME": path.name})


@contextlib.contextmanager
def session_cluster(nodes: Nodes = "kwok") -> Iterator[Cluster]:
    """The cluster a test session runs against, torn down afterwards if the session made it."""
    existing = os.environ.get(ENV_KUBECONFIG if nodes == "kwok" else ENV_REAL_KUBECONFIG)
    if existing:
        yield use_existing(Path(existing))
        return
    reap_stale_test_clusters()
    prefix = TEST_CLUSTER_PREFIX if nodes == "kwok" else f"{TEST_CLUSTER_PREFIX}{nodes}-"
    cluster = start(f"{prefix}{os.getpid()}", nodes)
    try:
        yield cluster
    finally:
        if os.environ.get(ENV_KEEP) == "1":
            log.warning("keeping cluster %s: KUBECONFIG=%s", cluster.name, cluster.kubeconfig)
        else:
            stop(cluster)
