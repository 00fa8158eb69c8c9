"""Queued FineTuneJobs (``spec.queue``) under the real Kueue, which the test cluster runs.

Each test gets its own ClusterQueue with a quota of one GPU and a LocalQueue in its namespace,
so two one-GPU jobs compete for it. kwok runs the admitted pods on the simulated A100 nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ftj
from support.cluster import Cluster, wait_until
from support.operator import OperatorProcess

pytestmark = pytest.mark.cluster

FLAVOR = "kt-a100"
QUEUE = "gpus"
LONG = 600  # seconds a trainer pod runs unless a test stops it


@pytest.fixture
def team(cluster: Cluster, team: str) -> Iterator[str]:
    """The conftest's team namespace, with a LocalQueue on a one-GPU ClusterQueue."""
    namespace = team
    cluster_queue = f"cq-{namespace}"
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": FLAVOR},
            "spec": {"nodeLabels": {"kubetune.io/gpu-pool": "a100"}},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": 64},
                                    {"name": "memory", "nominalQuota": "512Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": 1},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    )
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": cluster_queue},
        },
        namespace=namespace,
    )
    yield namespace
    cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)


def queued_job(name: str, run_seconds: float = LONG, **spec: Any) -> dict[str, Any]:
    return ftj.local_job(name, run_seconds=run_seconds, serve=False, queue=QUEUE, **spec)


def status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(ftj.get_ftj(cluster, ns, name).get("status") or {})


def wait_message(cluster: Cluster, ns: str, name: str, *parts: str) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        s = status(cluster, ns, name)
        return s if all(p in (s.get("message") or "") for p in parts) else None

    try:
        return wait_until(seen, timeout=60, description=f"{name}'s message to say {parts}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; status: {json.dumps(status(cluster, ns, name))}") from None


def trainer(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    job = cluster.get("job", f"{name}-trainer", "-n", ns)
    return dict(job) if job else None


def workload(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    job = trainer(cluster, ns, name)
    assert job is not None
    uid = job["metadata"]["uid"]
    items = cluster.get("workloads", "-n", ns, "-l", f"kueue.x-k8s.io/job-uid={uid}")["items"]
    assert len(items) == 1, items
    return dict(items[0])


def running_pods(cluster: Cluster, ns: str, name: str) -> list[str]:
    pods = cluster.get("pods", "-n", ns, "-l", f"job-name={name}-trainer")["items"]
    return [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"]


def patch_spec(cluster: Cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = json.dumps({"spec": spec})
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", body)


def test_a_job_waits_in_its_queue_with_kueues_reason_and_runs_when_quota_frees(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(queued_job("first", run_seconds=12), namespace=team)
    ftj.wait_phase(cluster, team, "first", "Running")
    cluster.apply(queued_job("second"), namespace=team)

    # Kueue's own words on why, e.g. "insufficient unused quota for nvidia.com/gpu in flavor".
    # Kueue makes the Workload a moment before it tries to admit it, so a first tick may say
    # only "not admitted yet"; the next tick shows the reason.
    waiting = wait_message(cluster, team, "second", "waiting in the Kueue queue", "nvidia.com/gpu")
    assert waiting["phase"] == "Queued"
    ready = next(c for c in waiting["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InQueue"
    job = trainer(cluster, team, "second")
    assert job is not None and job["spec"]["suspend"] is True

    ftj.wait_phase(cluster, team, "first", "Succeeded", timeout=60)
    ftj.wait_phase(cluster, team, "second", "Running", timeout=60)
    operator.assert_alive()


def test_suspending_an_admitted_job_frees_its_quota_and_resuming_queues_it_again(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(queued_job("holder"), namespace=team)
    ftj.wait_phase(cluster, team, "holder", "Running")
    cluster.apply(queued_job("waiter"), namespace=team)
    wait_message(cluster, team, "waiter", "waiting in the Kueue queue")

    # Kueue would unsuspend an admitted Job suspended directly; the operator deactivates its
    # Workload instead, which stops the pod and gives the GPU to the next job in the queue.
    patch_spec(cluster, team, "holder", {"suspend": True})
    held = wait_message(cluster, team, "holder", "suspended (spec.suspend)", "deactivated")
    assert held["phase"] == "Queued"
    ftj.wait_phase(cluster, team, "waiter", "Running", timeout=60)
    assert workload(cluster, team, "holder")["spec"]["active"] is False
    assert trainer(cluster, team, "holder")["spec"]["suspend"] is True  # type: ignore[index]
    assert running_pods(cluster, team, "holder") == []

    # Resumed, it queues behind the job now holding the GPU, then runs when that one stops.
    patch_spec(cluster, team, "holder", {"suspend": False})
    wait_message(cluster, team, "holder", "waiting in the Kueue queue")
    assert workload(cluster, team, "holder")["spec"]["active"] is True
    patch_spec(cluster, team, "waiter", {"suspend": True})
    ftj.wait_phase(cluster, team, "holder", "Running", timeout=60)
    assert running_pods(cluster, team, "holder")
    operator.assert_alive()


def test_a_queued_job_suspended_from_the_start_is_not_queued_until_resumed(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(queued_job("later", suspend=True), namespace=team)
    s = wait_message(cluster, team, "later", "queued when resumed")
    assert s["phase"] == "Queued" and s["startTime"]
    # No Job, so no Workload to be admitted (and no GPU held) while it is suspended.
    assert trainer(cluster, team, "later") is None
    patch_spec(cluster, team, "later", {"suspend": False})
    ftj.wait_phase(cluster, team, "later", "Running", timeout=60)


def test_deleting_a_running_queued_job_stops_its_trainer_before_the_cleanup(
    cluster: Cluster, operator: OperatorProcess, team: str, tmp_path: Path
) -> None:
    cluster.apply(queued_job("gone", output={"keepOnDelete": False}), namespace=team)
    ftj.wait_phase(cluster, team, "gone", "Running")
    uid = ftj.get_ftj(cluster, team, "gone")["metadata"]["uid"]
    cluster.kubectl("delete", "ftj", "gone", "-n", team, "--wait=false")

    cleanup = wait_until(
        lambda: cluster.get("job", f"gone-cleanup-{uid[:6]}", "-n", team),
        timeout=60,
        description="the cleanup Job",
    )
    # It started only once the trainer's pods were gone, and Kueue did not bring them back.
    assert running_pods(cluster, team, "gone") == []
    assert "kueue.x-k8s.io/queue-name" not in (cleanup["metadata"].get("labels") or {})
    wait_until(
        lambda: cluster.get("ftj", "gone", "-n", team) is None,
        timeout=60,
        description="the FineTuneJob to be deleted",
    )
    operator.assert_alive()


def with_priority(job: dict[str, Any], priority_class: str) -> dict[str, Any]:
    job["spec"]["resources"]["priorityClassName"] = priority_class
    return job


def test_a_higher_priority_job_preempts_a_running_one_which_then_resumes(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(
        *(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name},
                "value": value,
            }
            for name, value in (("kt-research", 100), ("kt-production", 1000))
        )
    )
    preempting = {"spec": {"preemption": {"withinClusterQueue": "LowerPriority"}}}
    cluster.kubectl(
        "patch", "clusterqueue", f"cq-{team}", "--type=merge", "-p", json.dumps(preempting)
    )
    cluster.apply(with_priority(queued_job("research"), "kt-research"), namespace=team)
    ftj.wait_phase(cluster, team, "research", "Running")

    urgent = with_priority(queued_job("urgent", run_seconds=12), "kt-production")
    cluster.apply(urgent, namespace=team)
    # Kueue evicts the running job (its pod is stopped: the trainer checkpoints) and requeues it.
    evicted = wait_message(cluster, team, "research", "waiting in the Kueue queue")
    assert evicted["phase"] == "Queued"
    ftj.wait_phase(cluster, team, "urgent", "Running", timeout=60)
    assert running_pods(cluster, team, "research") == []
    # Preemption is not a failure: with backoffLimit 0 the job runs again once the GPU is free.
    ftj.wait_phase(cluster, team, "urgent", "Succeeded", timeout=60)
    ftj.wait_phase(cluster, team, "research", "Running", timeout=60)
    operator.assert_alive()


def test_a_queue_that_does_not_exist_is_named_in_the_status(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    job = queued_job("typo")
    job["spec"]["queue"] = "gpu-typo"
    cluster.apply(job, namespace=team)
    s = wait_message(cluster, team, "typo", "LocalQueue gpu-typo doesn't exist")
    assert s["phase"] == "Queued"


def serving(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return ftj.serving_condition(status(cluster, ns, name))


def wait_serving(cluster: Cluster, ns: str, name: str, reason: str, *parts: str) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        c = serving(cluster, ns, name)
        ok = c.get("reason") == reason and all(p in c.get("message", "") for p in parts)
        return c if ok else None

    try:
        return wait_until(seen, timeout=60, description=f"{name}: ServingReady {reason} {parts}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; status: {json.dumps(status(cluster, ns, name))}") from None


def server_pods(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    selector = f"kubetune.io/finetunejob={name},app.kubernetes.io/component=server"
    pods = cluster.get("pods", "-n", ns, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_a_queued_jobs_server_is_admitted_by_quota_and_holds_it_until_serving_stops(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    # The one-GPU quota: training takes it, then the server's replicas, one GPU each.
    served = queued_job("served", run_seconds=3)
    served["spec"]["serve"] = {
        "enabled": True,
        "engine": "vllm",
        "replicas": 2,
        "resources": {"gpus": 1},
    }
    cluster.apply(served, namespace=team)
    ftj.wait_phase(cluster, team, "served", "Succeeded", timeout=60)

    # One replica is admitted and runs; Kueue's gate holds the other, and status says why.
    waiting = wait_serving(
        cluster, team, "served", "ServingQueued", "1/2 replicas ready", "Kueue queue gpus",
        "nvidia.com/gpu",
    )  # fmt: skip
    assert waiting["status"] == "False"
    wide = cluster.kubectl("get", "ftj", "served", "-n", team, "-o", "wide").stdout
    assert "SERVING" in wide and "ServingQueued" in wide, wide
    pods = server_pods(cluster, team, "served")
    admitted = [p for p in pods if not p["spec"].get("schedulingGates")]
    assert len(pods) == 2 and len(admitted) == 1, pods
    # The spec names no pool: the admitting flavor's node labels placed the replica.
    assert admitted[0]["spec"]["nodeSelector"] == {"kubetune.io/gpu-pool": "a100"}
    assert admitted[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE

    # Down to one replica: the held one goes (a ReplicaSet removes unscheduled pods first).
    patch_spec(cluster, team, "served", {"serve": {"replicas": 1}})
    wait_serving(cluster, team, "served", "DeploymentReady", "1/1 replicas ready")

    # Another queue (on the same ClusterQueue): Kueue would refuse to relabel a Deployment with
    # running replicas, so the operator replaces the server, and the new queue admits it.
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "serving"},
            "spec": {"clusterQueue": f"cq-{team}"},
        },
        namespace=team,
    )
    patch_spec(cluster, team, "served", {"serve": {"queue": "serving"}})

    def moved() -> list[dict[str, Any]] | None:
        pods = server_pods(cluster, team, "served")
        queues = [p["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") for p in pods]
        ready = [c for p in pods for c in p["status"].get("conditions", []) if c["type"] == "Ready"]
        running = queues == ["serving"] and [c["status"] for c in ready] == ["True"]
        return pods if running and serving(cluster, team, "served")["status"] == "True" else None

    wait_until(moved, timeout=60, description="the server replaced in queue serving, Ready")

    # The server's GPU counts against the team's quota: the next job waits for it.
    cluster.apply(queued_job("next", run_seconds=3), namespace=team)
    wait_message(cluster, team, "next", "waiting in the Kueue queue", "nvidia.com/gpu")

    # Serving off gives the GPU back, and the waiting job runs.
    patch_spec(cluster, team, "served", {"serve": {"enabled": False}})
    ftj.wait_phase(cluster, team, "next", "Running", "Succeeded", timeout=60)
    operator.assert_alive()


def test_a_model_servers_replicas_wait_in_its_queue_with_kueues_reason(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    """A ModelServer queued like a job's own server: one GPU of quota, two replicas."""
    cluster.apply(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "shared"},
            "spec": {
                "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
                "replicas": 2,
                "resources": {"gpus": 1},
                "queue": QUEUE,
            },
        },
        namespace=team,
    )

    def queued() -> dict[str, Any] | None:
        obj = cluster.get("modelserver", "shared", "-n", team) or {}
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
        ready = conds.get("Ready") or {}
        return ready if ready.get("reason") == "ServingQueued" else None

    ready = wait_until(queued, timeout=60, description="the ModelServer ServingQueued")
    assert ready["status"] == "False"
    for part in ("1/2 replicas ready", "Kueue queue gpus", "nvidia.com/gpu"):
        assert part in ready["message"], ready
