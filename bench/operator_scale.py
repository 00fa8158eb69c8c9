"""How the operator copes with many FineTuneJobs at once, on the simulated cluster.

Applies N FineTuneJobs in one `kubectl apply` (N = 100 and 500 by default), then measures:
- latency from the apply to each trainer Job appearing (seen through a watch, p50/p99),
- the time until every FineTuneJob is Succeeded (kwok pods run for --run-seconds),
- the operator process's peak RSS (VmHWM) and CPU time,
- what its /metrics counted (jobs that entered Succeeded: N when no event was missed) and how
  many lines it logged.
Writes bench/results/operator_scale.json. Needs the cluster binaries (`make k8s-bin`); starts
its own kwok cluster unless KUBETUNE_TEST_KUBECONFIG names one.

    python bench/operator_scale.py [--n 100 500] [--run-seconds 5] [--interval 2]
                                   [--without-metrics]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support import cluster as kcluster  # noqa: E402
from support import ftj  # noqa: E402
from support.operator import running_operator  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def watch_objects(
    kubeconfig: Path, namespace: str, kind: str, seen: dict[str, float], stop: threading.Event
) -> None:
    """Records when each Job (or FineTuneJob) was first seen, by name."""
    from kubernetes import client, config, watch

    api_client = config.new_client_from_config(str(kubeconfig))
    if kind == "Job":
        lister: Any = client.BatchV1Api(api_client).list_namespaced_job
        args: tuple[Any, ...] = (namespace,)
    else:
        lister = client.CustomObjectsApi(api_client).list_namespaced_custom_object
        args = ("kubetune.io", "v1alpha1", namespace, "finetunejobs")
    while not stop.is_set():
        w = watch.Watch()
        for event in w.stream(lister, *args, timeout_seconds=5):
            obj = event["object"]
            name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
            seen.setdefault(name, time.monotonic())
            if stop.is_set():
                w.stop()
                break


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Setup = Callable[[kcluster.Cluster, str], dict[str, Any]]
"""Prepares the namespace before the operator starts; what it returns joins the run's record."""


def run_once(
    c: kcluster.Cluster,
    n: int,
    run_seconds: float,
    interval: float,
    setup: Setup | None = None,
    *,
    metrics: bool = True,
) -> dict[str, Any]:
    ns = c.create_namespace(f"bench-{n}-")
    prepared = setup(c, ns) if setup is not None else {}
    ftj.output_volume(c, ns)
    ftj.dataset_configmap(c, ns, ftj.dataset_text())
    toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    jobs = []
    for i in range(n):
        job = ftj.local_job(f"ftj-{i:04d}", gpus=0, run_seconds=run_seconds, serve=False)
        job["spec"]["resources"]["tolerations"] = toleration
        job["metadata"]["namespace"] = ns
        jobs.append(job)
    log = Path(tempfile.mkdtemp()) / "operator.log"
    seen: dict[str, float] = {}
    created: dict[str, float] = {}
    stop = threading.Event()
    env = {"KUBETUNE_RECONCILE_INTERVAL": str(interval)}
    with running_operator(c.kubeconfig, log, namespaces=(ns,), env=env, metrics=metrics) as op:
        for kind, into in (("Job", seen), ("FineTuneJob", created)):
            threading.Thread(
                target=watch_objects, args=(c.kubeconfig, ns, kind, into, stop), daemon=True
            ).start()
        time.sleep(2)  # the operator's watches are up
        t0 = time.monotonic()
        c.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs}),
            timeout=300,
        )
        applied = time.monotonic() - t0
        done_at = None
        deadline = t0 + 1800
        while time.monotonic() < deadline:
            items = (c.get("ftj", "-n", ns) or {}).get("items", [])
            phases = [(i.get("status") or {}).get("phase") for i in items]
            if len(phases) == n and all(p == "Succeeded" for p in phases):
                done_at = time.monotonic() - t0
                break
            time.sleep(2)
        stop.set()
        rss = peak_rss_mib(op.proc.pid) if op.proc else float("nan")
        cpu = cpu_seconds(op.proc.pid) if op.proc else float("nan")
        # What the operator's /metrics saw: every job entering Succeeded, once.
        local = {"namespace": ns, "provider": "local"}
        succeeded = {"phase": "Succeeded", **local}
        counted = (
            op.metric("kubetune_finetunejob_transitions_total", **succeeded) if metrics else None
        )
        log_lines = len(op.logs().splitlines())
    # Each FineTuneJob from its own creation to its trainer Job: kubectl applies them one by
    # one, which for 500 takes minutes on this machine and is not the operator's doing.
    latencies = [
        seen[f"ftj-{i:04d}-trainer"] - created[f"ftj-{i:04d}"]
        for i in range(n)
        if f"ftj-{i:04d}-trainer" in seen and f"ftj-{i:04d}" in created
    ]
    c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return {
        "n": n,
        "metrics": metrics,
        "apply_seconds": round(applied, 2),
        "jobs_created": len(latencies),
        "ftj_created_to_job_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "ftj_created_to_job_p99_s": round(percentile(latencies, 0.99), 2) if latencies else None,
        "all_succeeded_s": None if done_at is None else round(done_at, 1),
        "operator_peak_rss_mib": round(rss, 1),
        "operator_cpu_s": round(cpu, 1),
        "metrics_succeeded_transitions": counted,
        "operator_log_lines": log_lines,
        **prepared,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--run-seconds", type=float, default=5)
    parser.add_argument("--interval", type=float, default=2, help="operator reconcile interval (s)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "operator_scale.json"
    )
    parser.add_argument(
        "--without-metrics",
        action="store_true",
        help="run each size again with the operator's metrics off (--metrics ''), for their cost",
    )
    args = parser.parse_args()
    variants = [True, False] if args.without_metrics else [True]
    with kcluster.session_cluster() as c:
        ftj.install_crd(c)
        runs = [
            run_once(c, n, args.run_seconds, args.interval, metrics=on)
            for n in args.n
            for on in variants
        ]
    result: dict[str, Any] = {
        "benchmark": "operator_scale",
        "machine": "2-core shared VM, kwok-simulated nodes (3 nodes x 110 pods)",
        "reconcile_interval_s": args.interval,
        "pod_run_seconds": args.run_seconds,
        "runs": runs,
    }
    if args.without_metrics:
        keys = ("operator_peak_rss_mib", "operator_cpu_s", "all_succeeded_s")
        on = {r["n"]: r for r in runs if r["metrics"]}
        off = {r["n"]: r for r in runs if not r["metrics"]}
        result["ratios_metrics_on_over_off"] = {
            str(n): {k: round(on[n][k] / off[n][k], 3) for k in keys if on[n][k] and off[n][k]}
            for n in args.n
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
