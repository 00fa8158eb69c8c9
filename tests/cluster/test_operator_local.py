"""The operator, as a real process, runs ``provider: local`` FineTuneJobs on the real control plane.

kwok simulates the GPU nodes and the pods' lives; everything else (CRD validation, the Job
controller, the scheduler, the garbage collector, RBAC) is the real Kubernetes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support import ftj
from support.cluster import Cluster, wait_until
from support.operator import OperatorProcess

pytestmark = pytest.mark.cluster


def children(cluster: Cluster, ns: str, name: str) -> dict[str, object]:
    return {
        "job": cluster.get("job", f"{name}-trainer", "-n", ns),
        "config": cluster.get("configmap", f"{name}-trainer-config", "-n", ns),
        "progress": cluster.get("configmap", f"{name}-progress", "-n", ns),
        "sa": cluster.get("serviceaccount", f"{name}-trainer", "-n", ns),
    }


def test_full_lifecycle_to_a_ready_endpoint(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(ftj.local_job("daoyan", run_seconds=8), namespace=team)
    running = ftj.wait_phase(cluster, team, "daoyan", "Running")
    assert running["status"]["startTime"]
    assert running["status"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"

    trainer = ftj.SimulatedTrainer(cluster, team, "daoyan")
    trainer.step(5, 20, 1.75)

    def progress_seen() -> dict[str, object] | None:
        p = ftj.get_ftj(cluster, team, "daoyan")["status"].get("progress") or {}
        return p if p.get("step") == 5 else None

    progress = wait_until(progress_seen, timeout=30, description="progress in status")
    assert progress["totalSteps"] == 20 and progress["trainLoss"] == 1.75
    assert progress["summary"] == "5/20 (25%)" and progress["eta"]

    trainer.step(20, 20, 0.42)
    trainer.finish(trained_tokens=98765)
    ftj.wait_phase(cluster, team, "daoyan", "Succeeded", timeout=60)
    status = wait_until(
        lambda: (s := ftj.get_ftj(cluster, team, "daoyan")["status"]).get("trainedTokens") and s,
        timeout=30,
        description="the trainer's result in status",
    )
    assert status["trainedTokens"] == 98765
    assert status["adapter"]["rank"] == 16
    assert status["adapter"]["path"].startswith("pvc://kubetune-output/")

    endpoint = wait_until(
        lambda: cluster.get("configmap", "daoyan-endpoint", "-n", team),
        timeout=30,
        description="the endpoint ConfigMap",
    )
    assert endpoint["data"] == {
        "OPENAI_BASE_URL": f"http://daoyan-server.{team}.svc:8000/v1",
        "OPENAI_MODEL": "daoyan",
    }

    st = ftj.wait_serving_ready(cluster, team, "daoyan")
    assert st["endpoint"]["baseURL"] == endpoint["data"]["OPENAI_BASE_URL"]
    assert st["fineTunedModel"] == "daoyan"
    deploy = cluster.get("deployment", "daoyan-server", "-n", team)
    assert deploy["metadata"]["ownerReferences"][0]["name"] == "daoyan"

    ftj.event_reasons(cluster, team, "daoyan", "Running", "Succeeded")
    columns = cluster.kubectl("get", "ftj", "daoyan", "-n", team).stdout
    assert "Succeeded" in columns and "20/20 (100%)" in columns and "daoyan-server" in columns

    # The operator's /metrics saw it all (the namespace is this test's own).
    local = {"namespace": team, "provider": "local"}
    assert operator.metric("kubetune_finetunejobs", phase="Succeeded", **local) == 1
    assert operator.metric("kubetune_finetunejobs", phase="Running", **local) is None
    for phase in ("Running", "Succeeded"):
        assert operator.metric("kubetune_finetunejob_transitions_total", phase=phase, **local) == 1
    assert operator.metric("kubetune_finetunejob_wait_seconds_count", **local) == 1
    ran = operator.metric("kubetune_finetunejob_run_seconds_sum", phase="Succeeded", **local)
    assert ran is not None and ran >= 7  # the simulated pod ran 8 s; times are whole seconds
    assert operator.metric("kubetune_trained_tokens_total", **local) == 98765


def test_api_server_rejects_invalid_specs_naming_the_field(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    bad = ftj.local_job("nomodel")
    del bad["spec"]["model"]
    proc = cluster.kubectl("apply", "-n", team, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "`model` is required when `provider` is `local`" in proc.stderr

    bad = ftj.local_job("badrank", lora={"r": 0})
    proc = cluster.kubectl("apply", "-n", team, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "spec.lora.r" in proc.stderr

    # Legal custom-resource names that no Service could be named after.
    for name in ("qwen2.5-tune", "7b-lora"):
        proc = cluster.kubectl(
            "apply", "-n", team, "-f", "-", input=json.dumps(ftj.local_job(name)), check=False
        )
        assert proc.returncode != 0 and "metadata.name must start with a letter" in proc.stderr

    token_for_a_folder = ftj.local_job("pvctoken")
    token_for_a_folder["spec"]["model"] = {
        "pvc": {"claimName": "weights", "path": "llama"},
        "tokenSecretRef": {"name": "hf-token", "key": "token"},
    }
    proc = cluster.kubectl(
        "apply", "-n", team, "-f", "-", input=json.dumps(token_for_a_folder), check=False
    )
    assert proc.returncode != 0 and "`tokenSecretRef` applies only to `id`" in proc.stderr

    gpu_server_without_gpus = ftj.local_job("nogpu")
    gpu_server_without_gpus["spec"]["serve"]["engine"] = "vllm"
    proc = cluster.kubectl(
        "apply", "-n", team, "-f", "-", input=json.dumps(gpu_server_without_gpus), check=False
    )
    assert proc.returncode != 0
    assert "`serve.engine: vllm` needs `serve.resources.gpus` >= 1" in proc.stderr

    # `resources` left out means one GPU: the QLoRA rule must not read through the absent object.
    qlora = ftj.local_job("qlora-defaults", method="qlora", suspend=True)
    del qlora["spec"]["resources"]
    cluster.kubectl("apply", "-n", team, "-f", "-", input=json.dumps(qlora))
    cluster.kubectl("delete", "ftj", "qlora-defaults", "-n", team, "--wait=false")


def test_bad_dataset_fails_with_the_line_and_creates_no_pods(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    text = ftj.dataset_text().splitlines()
    text[2] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    text[6] = "{not json"
    ftj.dataset_configmap(cluster, team, "\n".join(text) + "\n", name="broken")
    job = ftj.local_job("broken", dataset={"configMap": {"name": "broken", "key": "train.jsonl"}})
    cluster.apply(job, namespace=team)
    failed = ftj.wait_phase(cluster, team, "broken", "Failed")
    message = failed["status"]["message"]
    assert "line 3" in message and "line 7" in message
    assert children(cluster, team, "broken")["job"] is None
    ftj.event_reasons(cluster, team, "broken", "Failed")


def test_gpu_exhaustion_queues_with_the_schedulers_reason(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    for name in ("big-a", "big-b"):
        cluster.apply(ftj.local_job(name, gpus=8, run_seconds=120, serve=False), namespace=team)
    for name in ("big-a", "big-b"):
        ftj.wait_phase(cluster, team, name, "Running")
    cluster.apply(ftj.local_job("waiting", gpus=1, serve=False), namespace=team)
    queued = ftj.wait_phase(cluster, team, "waiting", "Queued")
    wait_until(
        lambda: (
            "nvidia.com/gpu"
            in (ftj.get_ftj(cluster, team, "waiting")["status"].get("message") or "")
        ),
        timeout=30,
        description="the scheduler's reason in status.message",
    )
    assert queued["status"]["phase"] == "Queued"
    cluster.kubectl("delete", "ftj", "big-a", "big-b", "-n", team, "--wait=false")
    ftj.wait_phase(cluster, team, "waiting", "Running", "Succeeded", timeout=90)


def test_a_trainer_pod_the_api_server_refuses_is_named_in_status(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    """A ResourceQuota that allows no pod: the Job controller's FailedCreate Event says why, and
    status says it too (not "waiting for the trainer pod" forever)."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    cluster.apply(quota, namespace=team)
    cluster.apply(ftj.local_job("refused", serve=False), namespace=team)

    def refused() -> dict[str, Any] | None:
        status = ftj.get_ftj(cluster, team, "refused").get("status") or {}
        return status if "exceeded quota: no-pods" in (status.get("message") or "") else None

    status = wait_until(refused, timeout=60, description="the quota's refusal in status")
    assert status["phase"] == "Queued"
    assert status["message"].startswith("the trainer pod cannot be created: ")
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "PodCreationRefused")
    # Room again: the Job controller's next try creates the pod and the job runs on.
    cluster.kubectl("delete", "resourcequota", "no-pods", "-n", team)
    ftj.wait_phase(cluster, team, "refused", "Running", "Succeeded", timeout=120)


def test_failure_reports_oomkilled_and_the_last_line(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    job = ftj.local_job(
        "oom",
        run_seconds=1,
        exit_code=137,
        reason="OOMKilled",
        message="step 3\nCUDA out of memory",
    )
    cluster.apply(job, namespace=team)
    failed = ftj.wait_phase(cluster, team, "oom", "Failed")
    msg = failed["status"]["message"]
    assert "OOMKilled" in msg and "137" in msg and "CUDA out of memory" in msg


def test_delete_mid_run_removes_every_child(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(ftj.local_job("gone", run_seconds=120), namespace=team)
    ftj.wait_phase(cluster, team, "gone", "Running")
    assert all(v is not None for v in children(cluster, team, "gone").values())
    cluster.kubectl("delete", "ftj", "gone", "-n", team)
    wait_until(
        lambda: all(v is None for v in children(cluster, team, "gone").values()),
        timeout=60,
        description="the garbage collector to delete the children",
    )


def test_spec_is_immutable_once_started_but_suspend_is_not(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(ftj.local_job("frozen", run_seconds=120, serve=False), namespace=team)
    ftj.wait_phase(cluster, team, "frozen", "Running")
    proc = cluster.kubectl(
        "patch",
        "ftj",
        "frozen",
        "-n",
        team,
        "--type=merge",
        "-p",
        '{"spec":{"lora":{"r":8}}}',
        check=False,
    )
    assert proc.returncode != 0 and "immutable once the job has started" in proc.stderr
    cluster.kubectl(
        "patch", "ftj", "frozen", "-n", team, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    wait_until(
        lambda: cluster.get("job", "frozen-trainer", "-n", team)["spec"].get("suspend"),
        timeout=30,
        description="the trainer Job to be suspended",
    )
    ftj.wait_phase(cluster, team, "frozen", "Queued")


def test_operator_restart_mid_run_makes_no_duplicates(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(ftj.local_job("restart", run_seconds=10, serve=False), namespace=team)
    ftj.wait_phase(cluster, team, "restart", "Running")
    before = {k: v["metadata"]["uid"] for k, v in children(cluster, team, "restart").items()}  # type: ignore[index]
    operator.restart(kill=True)
    done = ftj.wait_phase(cluster, team, "restart", "Succeeded", timeout=90)
    after = {k: v["metadata"]["uid"] for k, v in children(cluster, team, "restart").items()}  # type: ignore[index]
    assert before == after
    jobs = cluster.get("jobs", "-n", team, "-l", "kubetune.io/finetunejob=restart")
    assert len(jobs["items"]) == 1
    reasons = ftj.event_reasons(cluster, team, "restart", "Succeeded")
    assert reasons.count("Succeeded") == 1, reasons
    assert done["status"]["completionTime"]


def test_two_teams_run_side_by_side(
    cluster: Cluster, operator: OperatorProcess, team: str, tmp_path: Path
) -> None:
    other = cluster.create_namespace("kt-team-b-")
    try:
        ftj.output_volume(cluster, other)
        ftj.dataset_configmap(cluster, other, ftj.dataset_text())
        for ns in (team, other):
            cluster.apply(ftj.local_job("shared-name", run_seconds=2, serve=False), namespace=ns)
        a = ftj.wait_phase(cluster, team, "shared-name", "Succeeded", timeout=90)
        b = ftj.wait_phase(cluster, other, "shared-name", "Succeeded", timeout=90)
        assert a["status"]["adapter"]["path"] != b["status"]["adapter"]["path"]
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
