"""The test cluster is a real control plane: schema validation, the Job controller, the scheduler
with extended resources and taints, and the garbage collector all behave as in production.

Only kubelets are simulated (kwok): pods start at once, Job pods exit after
`kwok.kubetune.io/run-seconds` with the exit code of `kwok.kubetune.io/exit-code`.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from typing import Any

import pytest

from support import cluster as kcluster
from support.cluster import Cluster, wait_until

pytestmark = pytest.mark.cluster

POOL_SELECTOR = f"{kcluster.GPU_POOL_LABEL}={kcluster.GPU_POOL}"


def _container(gpus: int = 0) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {kcluster.GPU_RESOURCE: str(gpus)}
    return {"name": "main", "image": "kubetune.test/none:0", "resources": resources}


def _gpu_pod_spec(gpus: int) -> dict[str, Any]:
    return {
        "nodeSelector": {kcluster.GPU_POOL_LABEL: kcluster.GPU_POOL},
        "tolerations": kcluster.GPU_TOLERATIONS,
        "containers": [_container(gpus)],
    }


def _job(name: str, annotations: dict[str, str], pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never", **pod_spec},
            },
        },
    }


def _deployment(name: str, replicas: int, pod_spec: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return dict(cond)
    return None


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return list(cluster.get("pods", "-n", namespace, "-l", selector)["items"])


def _job_pod(cluster: Cluster, namespace: str, job: str) -> dict[str, Any]:
    pods = wait_until(
        lambda: _pods(cluster, namespace, f"job-name={job}"),
        timeout=30,
        description=f"the Job controller to create a pod for {job}",
    )
    assert len(pods) == 1
    return pods[0]


def _wait_job_condition(cluster: Cluster, namespace: str, job: str, type_: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        obj = cluster.get("job", job, "-n", namespace)
        cond = _condition(obj, type_)
        return obj if cond and cond["status"] == "True" else None

    return wait_until(finished, timeout=60, description=f"Job {job} to become {type_}")


def _gpu_nodes(cluster: Cluster) -> set[str]:
    return {n["metadata"]["name"] for n in cluster.get("nodes", "-l", POOL_SELECTOR)["items"]}


def test_cluster_has_the_pinned_control_plane_and_the_gpu_pool(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"].startswith("v1.34."), version
    gpu_nodes = cluster.get("nodes", "-l", POOL_SELECTOR)["items"]
    assert len(gpu_nodes) == kcluster.GPU_NODE_COUNT
    for node in gpu_nodes:
        assert node["status"]["allocatable"][kcluster.GPU_RESOURCE] == str(kcluster.GPUS_PER_NODE)
        assert {"key": kcluster.GPU_RESOURCE, "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
        assert (_condition(node, "Ready") or {}).get("status") == "True"
    cpu_nodes = cluster.get("nodes", "-l", "kubetune.io/node-kind=cpu")["items"]
    assert len(cpu_nodes) == 1
    assert kcluster.GPU_RESOURCE not in cpu_nodes[0]["status"]["allocatable"]


def test_crd_schema_rejects_invalid_objects_with_field_errors(
    cluster: Cluster, namespace: str
) -> None:
    group = f"{namespace}.kubetune.test"
    crd_name = f"widgets.{group}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["model", "replicas"],
                                    "properties": {
                                        "model": {"type": "string", "minLength": 1},
                                        "replicas": {"type": "integer", "minimum": 1},
                                        "mode": {"type": "string", "enum": ["lora", "full"]},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.apply(crd)
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd_name}", "--timeout=60s")

        def create(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
            widget = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}}
            return cluster.kubectl(
                "create",
                "-n",
                namespace,
                "-f",
                "-",
                input=json.dumps({**widget, "spec": spec}),
                check=False,
            )

        def create_invalid() -> subprocess.CompletedProcess[str] | None:
            proc = create({"replicas": 0, "mode": "quantum"})
            # kubectl learns the new kind from discovery, which can lag Established a moment.
            return None if "no matches for kind" in proc.stderr else proc

        invalid = wait_until(create_invalid, timeout=30, description="discovery of the new kind")
        assert invalid.returncode != 0
        assert "spec.model: Required value" in invalid.stderr
        assert "spec.replicas: Invalid value: 0" in invalid.stderr
        assert "greater than or equal to 1" in invalid.stderr
        assert 'spec.mode: Unsupported value: "quantum"' in invalid.stderr
        assert cluster.get("widgets", "w", "-n", namespace) is None

        unknown = create({"model": "qwen", "replicas": 1, "colour": "blue"})
        assert unknown.returncode != 0
        assert 'unknown field "spec.colour"' in unknown.stderr

        create({"model": "qwen", "replicas": 2, "mode": "lora"}).check_returncode()
        stored = cluster.get("widgets", "w", "-n", namespace)
        assert stored["spec"] == {"model": "qwen", "replicas": 2, "mode": "lora"}
    finally:
        cluster.kubectl("delete", "crd", crd_name, "--wait=false", check=False)


def test_gpu_job_is_scheduled_on_the_pool_and_completes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        _job("train", {kcluster.RUN_SECONDS_ANNOTATION: "5"}, _gpu_pod_spec(gpus=2)),
        namespace=namespace,
    )
    pod = _job_pod(cluster, namespace, "train")
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Job", "train", True)

    job = _wait_job_condition(cluster, namespace, "train", "Complete")
    assert job["status"]["succeeded"] == 1
    pod = cluster.get("pod", pod["metadata"]["name"], "-n", namespace)
    assert pod["spec"]["nodeName"] in _gpu_nodes(cluster)
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    # The run-seconds annotation (5) held the pod Running, not the stage default (3s).
    ran = _seconds(terminated["finishedAt"]) - _seconds(pod["status"]["startTime"])
    assert ran >= 4, (pod["status"]["startTime"], terminated["finishedAt"])


def test_job_pod_fails_with_the_annotated_exit_code_and_reason(
    cluster: Cluster, namespace: str
) -> None:
    annotations = {
        kcluster.RUN_SECONDS_ANNOTATION: "1",
        kcluster.EXIT_CODE_ANNOTATION: "137",
        kcluster.REASON_ANNOTATION: "OOMKilled",
        kcluster.MESSAGE_ANNOTATION: "CUDA out of memory",
    }
    cluster.apply(_job("oom", annotations, _gpu_pod_spec(gpus=1)), namespace=namespace)
    pod = _job_pod(cluster, namespace, "oom")
    job = _wait_job_condition(cluster, namespace, "oom", "Failed")
    assert (_condition(job, "Failed") or {})["reason"] == "BackoffLimitExceeded"
    pod = cluster.get("pod", pod["metadata"]["name"], "-n", namespace)
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137
    assert terminated["reason"] == "OOMKilled"
    assert terminated["message"] == "CUDA out of memory"


def test_exhausted_gpu_pool_leaves_the_next_pod_pending(cluster: Cluster, namespace: str) -> None:
    def busy_gpus() -> int:
        pods = cluster.get(
            "pods", "-A", "--field-selector=status.phase!=Succeeded,status.phase!=Failed"
        )
        return sum(
            int(c.get("resources", {}).get("limits", {}).get(kcluster.GPU_RESOURCE, 0))
            for p in pods["items"]
            if p["spec"].get("nodeName") in _gpu_nodes(cluster)
            for c in p["spec"]["containers"]
        )

    # Another test's pods may still be leaving the pool (namespace deletion is asynchronous).
    wait_until(lambda: busy_gpus() == 0, timeout=60, description="an idle GPU pool")

    # Two pods of 8 GPUs fill both nodes; Deployment pods keep running.
    cluster.apply(
        _deployment("hog", kcluster.GPU_NODE_COUNT, _gpu_pod_spec(gpus=kcluster.GPUS_PER_NODE)),
        namespace=namespace,
    )
    wait_until(
        lambda: (
            (cluster.get("deployment", "hog", "-n", namespace) or {})
            .get("status", {})
            .get("availableReplicas")
            == kcluster.GPU_NODE_COUNT
        ),
        timeout=60,
        description="the GPU hogs to become available",
    )
    hogs = _pods(cluster, namespace, "app=hog")
    assert {p["spec"]["nodeName"] for p in hogs} == _gpu_nodes(cluster)

    cluster.apply(
        _job("late", {kcluster.RUN_SECONDS_ANNOTATION: "1"}, _gpu_pod_spec(gpus=1)),
        namespace=namespace,
    )
    pod_name = _job_pod(cluster, namespace, "late")["metadata"]["name"]

    def unschedulable() -> dict[str, Any] | None:
        cond = _condition(cluster.get("pod", pod_name, "-n", namespace), "PodScheduled")
        return cond if cond and cond.get("reason") == "Unschedulable" else None

    cond = wait_until(unschedulable, timeout=60, description="the scheduler to give up on the pod")
    assert cond["status"] == "False"
    assert f"Insufficient {kcluster.GPU_RESOURCE}" in cond["message"], cond["message"]
    pod = cluster.get("pod", pod_name, "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]

    # Freeing a node lets the real scheduler place the waiting pod, and its Job then completes.
    cluster.kubectl("scale", "-n", namespace, "deployment/hog", "--replicas=1")
    _wait_job_condition(cluster, namespace, "late", "Complete")


def test_deleting_an_owner_deletes_its_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_deployment("web", 2, {"containers": [_container()]}), namespace=namespace)
    wait_until(
        lambda: (
            (cluster.get("deployment", "web", "-n", namespace) or {})
            .get("status", {})
            .get("readyReplicas")
            == 2
        ),
        timeout=60,
        description="deployment web to have 2 ready pods",
    )
    replicasets = cluster.get("replicasets", "-n", namespace, "-l", "app=web")["items"]
    assert [rs["metadata"]["ownerReferences"][0]["kind"] for rs in replicasets] == ["Deployment"]
    assert len(_pods(cluster, namespace, "app=web")) == 2

    # Background cascading deletion: the owner goes at once, the garbage collector does the rest.
    cluster.kubectl("delete", "-n", namespace, "deployment", "web", "--cascade=background")
    wait_until(
        lambda: (
            not cluster.get("replicasets", "-n", namespace, "-l", "app=web")["items"]
            and not _pods(cluster, namespace, "app=web")
        ),
        timeout=60,
        description="the garbage collector to delete the ReplicaSet and its pods",
    )


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
