"""How soon a changed ConfigMap reaches a running pod's file, with and without a pod annotation.

A ``Live`` ModelServer's new adapter set reaches its pods as a ConfigMap file, which the kubelet
rewrites on its next sync of the pod: its periodic resync, or at once when the pod object
changes. The operator annotates a replica that reports an older set
(``operator/kubelet_nudge.py``); this measures what that buys, on the real kubelet of the pods
tier (hack/node): one pod mounts a ConfigMap and logs each new value with the time it saw it
(polling the file every 50 ms); the bench changes the value, alternately alone ("resync") and
followed by a merge patch of the pod's annotations as the operator sends ("annotated"), and
takes the time from the change to the pod's log line. Each change waits --settle seconds after
the last, so that a sync the previous change caused is over before it.

Writes bench/results/configmap_refresh.json. Needs root (kubelet, containerd) and the cluster
binaries; starts its own real-node cluster unless KUBETUNE_TEST_REAL_KUBECONFIG names one.

    python bench/configmap_refresh.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kubetune.operator import kubelet_nudge  # noqa: E402
from kubetune.operator import status as st  # noqa: E402
from support import cluster as kcluster  # noqa: E402
from support import images as kimages  # noqa: E402

WATCHER = """
import pathlib, sys, time
path, seen = pathlib.Path("/probe/value"), None
while True:
    try:
        value = path.read_text()
    except OSError:
        value = None
    if value != seen:
        seen = value
        print(f"{time.time():.3f} {value}", flush=True)
    time.sleep(0.05)
"""


def configmap(value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "probe"},
        "data": {"value": value},
    }


def probe_pod(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "containers": [
                {
                    "name": "watch",
                    "image": image,
                    "command": ["python", "-u", "-c", WATCHER],
                    "volumeMounts": [{"name": "probe", "mountPath": "/probe"}],
                }
            ],
            "volumes": [{"name": "probe", "configMap": {"name": "probe"}}],
            "terminationGracePeriodSeconds": 0,
        },
    }


def seen_at(cluster: kcluster.Cluster, namespace: str, value: str) -> float | None:
    """When the pod logged ``value`` (epoch seconds), or None."""
    logs = cluster.kubectl("logs", "probe", "-n", namespace, check=False).stdout
    for line in logs.splitlines():
        stamp, _, text = line.partition(" ")
        if text == value:
            return float(stamp)
    return None


def one_change(
    cluster: kcluster.Cluster, namespace: str, value: str, annotate: bool, timeout: float
) -> float:
    start = time.time()
    cluster.apply(configmap(value), namespace=namespace)
    if annotate:  # what kubelet_nudge.nudge sends: a merge patch of two annotations
        asked = st.rfc3339(datetime.datetime.fromtimestamp(start, datetime.UTC))
        notes = {kubelet_nudge.ADAPTER_SET: value, kubelet_nudge.ASKED_AT: asked}
        patch = json.dumps({"metadata": {"annotations": notes}})
        cluster.kubectl("patch", "pod", "probe", "-n", namespace, "--type=merge", "-p", patch)
    found = kcluster.wait_until(
        lambda: seen_at(cluster, namespace, value),
        timeout=timeout,
        interval=0.25,
        description=f"the pod to see value {value}",
    )
    return round(found - start, 3)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="changes per mode")
    parser.add_argument("--timeout", type=float, default=180, help="per change (s)")
    parser.add_argument("--settle", type=float, default=10, help="pause before a change (s)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "configmap_refresh.json"
    )
    args = parser.parse_args()
    times: dict[str, list[float]] = {"resync": [], "annotated": []}
    with kcluster.session_cluster("real") as cluster:
        (image,) = cluster.push_images(kimages.build("operator"))
        namespace = cluster.create_namespace("bench-")
        cluster.apply(configmap("0"), probe_pod(image), namespace=namespace)
        kcluster.wait_until(
            lambda: seen_at(cluster, namespace, "0"), timeout=300, description="the probe pod"
        )
        for i in range(1, 2 * args.rounds + 1):
            mode = "annotated" if i % 2 else "resync"
            time.sleep(args.settle)
            took = one_change(cluster, namespace, str(i), mode == "annotated", args.timeout)
            times[mode].append(took)
            print(f"change {i} ({mode}): in the pod after {took:.2f} s", flush=True)
        version = cluster.get("nodes")["items"][0]["status"]["nodeInfo"]["kubeletVersion"]
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    medians = {mode: round(statistics.median(ts), 3) for mode, ts in times.items()}
    result = {
        "benchmark": "configmap_refresh",
        "machine": "2-core shared VM, one real node (kubelet + containerd, hack/node)",
        "kubelet": f"{version}, default syncFrequency (1m) and Watch change detection",
        "rounds_per_mode": args.rounds,
        "settle_s": args.settle,
        "seconds": times,
        "median_s": medians,
        "resync_over_annotated": round(medians["resync"] / medians["annotated"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
