"""What other teams' objects cost the operator: the same FineTuneJobs with and without many
foreign ConfigMaps and Pods in their namespace, on the simulated cluster.

The operator watches Pods, Jobs, ConfigMaps and Deployments through a server-side label
selector (``app.kubernetes.io/managed-by=kubetune``), so the API server should send it none of
the foreign ones: its memory, CPU time and speed should not change with them. Both runs go
through ``operator_scale.run_once`` in one session, and the ratios (foreign / none) are the
figures to read: this machine is shared and noisy.

    python bench/operator_foreign.py [--n 50] [--configmaps 1000] [--kib 64] [--pods 200]

Writes bench/results/operator_foreign.json. Needs the cluster binaries (`make k8s-bin`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from operator_scale import Setup, run_once  # noqa: E402

from support import cluster as kcluster  # noqa: E402
from support import ftj  # noqa: E402

TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
CHUNK = 100


def foreign(configmaps: int, kib: int, pods: int) -> Setup:
    """Fills a namespace with another app's objects: ``configmaps`` ConfigMaps of ``kib`` KiB
    each and a Deployment of ``pods`` running Pods (kwok runs them), none labelled for us."""

    def setup(c: kcluster.Cluster, ns: str) -> dict[str, Any]:
        t0 = time.monotonic()
        value = "x" * (kib * 1024)
        for start in range(0, configmaps, CHUNK):
            items = [
                {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": f"app-config-{i:05d}", "namespace": ns,
                              "labels": {"app": "someone-else"}},
                 "data": {"settings.txt": value}}
                for i in range(start, min(start + CHUNK, configmaps))
            ]  # fmt: skip
            listed = {"apiVersion": "v1", "kind": "List", "items": items}
            c.kubectl("create", "-f", "-", input=json.dumps(listed), timeout=300)
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "someone-elses-app", "namespace": ns},
            "spec": {
                "replicas": pods,
                "selector": {"matchLabels": {"app": "someone-else"}},
                "template": {
                    "metadata": {"labels": {"app": "someone-else"}},
                    "spec": {"tolerations": TOLERATIONS,
                             "containers": [{"name": "app", "image": "app:1"}]},
                },
            },
        }  # fmt: skip
        c.kubectl("apply", "-f", "-", input=json.dumps(deployment), timeout=60)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = (c.get("deployment", "someone-elses-app", "-n", ns) or {}).get("status") or {}
            if status.get("readyReplicas", 0) >= pods:
                break
            time.sleep(2)
        else:
            raise RuntimeError(f"the foreign Deployment did not get {pods} ready pods")
        return {
            "foreign_configmaps": configmaps,
            "foreign_configmap_kib": kib,
            "foreign_pods": pods,
            "foreign_setup_s": round(time.monotonic() - t0, 1),
        }

    return setup


def ratio(with_: Any, without: Any) -> float | None:
    if not isinstance(with_, int | float) or not isinstance(without, int | float) or not without:
        return None
    return round(with_ / without, 2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50, help="FineTuneJobs per run")
    parser.add_argument("--configmaps", type=int, default=1000)
    parser.add_argument("--kib", type=int, default=64, help="size of each foreign ConfigMap")
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--run-seconds", type=float, default=5)
    parser.add_argument("--interval", type=float, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "operator_foreign.json"
    )
    args = parser.parse_args()
    with kcluster.session_cluster() as c:
        ftj.install_crd(c)
        none = run_once(c, args.n, args.run_seconds, args.interval)
        crowded = run_once(
            c, args.n, args.run_seconds, args.interval,
            setup=foreign(args.configmaps, args.kib, args.pods),
        )  # fmt: skip
    keys = ("operator_peak_rss_mib", "operator_cpu_s", "all_succeeded_s",
            "ftj_created_to_job_p50_s")  # fmt: skip
    result = {
        "benchmark": "operator_foreign",
        "machine": "2-core shared VM, kwok-simulated nodes (3 nodes x 110 pods)",
        "reconcile_interval_s": args.interval,
        "pod_run_seconds": args.run_seconds,
        "runs": [none, crowded],
        "ratios_foreign_over_none": {k: ratio(crowded.get(k), none.get(k)) for k in keys},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
