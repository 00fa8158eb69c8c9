"""status.serving_state: what ServingReady says about a server Deployment and its pods."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import kube, local_provider, manifests
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings
from kubetune.server import launcher

HASH = "0123456789abcdef"
REFUSAL = (
    "kubetune.server: refusing to start: adapter `daoyan` (/kubetune/output): LoRA rank 64 is "
    "too high: `maxLoraRank` is 16, so the server accepts at most 16"
)


def deployment(replicas: int = 1, ready: int = 0, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "daoyan-server", "uid": "d-uid"},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {manifests.CONFIG_HASH_ANNOTATION: HASH}}},
        },
        "status": {"readyReplicas": ready, **status},
    }


def server_pod(
    name: str,
    *,
    last: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    config_hash: str = HASH,
    created: str = "2026-11-28T05:00:00Z",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "annotations": {manifests.CONFIG_HASH_ANNOTATION: config_hash},
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "vllm", "state": state or {}, "lastState": last or {}}],
        },
    }


def terminated(code: int, message: str = "") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": "Error", "message": message}}


def test_a_crash_looping_launcher_refusal_is_reported_with_its_message() -> None:
    pod = server_pod(
        "daoyan-server-7c9-abcde",
        last=terminated(launcher.EXIT_REFUSED, REFUSAL + "\n"),
        state={"waiting": {"reason": "CrashLoopBackOff"}},
    )
    got = st.serving_state(deployment(), [pod])
    assert (got.ready, got.reason) == (False, "LaunchRefused")
    assert got.message == (
        "the server refuses to start: adapter `daoyan` (/kubetune/output): LoRA rank 64 is too "
        "high: `maxLoraRank` is 16, so the server accepts at most 16 "
        "(pod daoyan-server-7c9-abcde, exit code 2)"
    )


def test_a_refusal_in_the_current_state_counts_too() -> None:
    pod = server_pod("p", state=terminated(launcher.EXIT_REFUSED, REFUSAL))
    assert st.serving_state(deployment(), [pod]).reason == "LaunchRefused"


def test_other_exits_and_pods_of_an_older_serve_config_are_not_a_refusal() -> None:
    oom = server_pod("p1", last=terminated(137))
    old = server_pod("p2", last=terminated(launcher.EXIT_REFUSED, REFUSAL), config_hash="old")
    got = st.serving_state(deployment(), [oom, old])
    assert (got.reason, got.message) == ("DeploymentNotReady", "0/1 replicas ready")


def test_a_deployment_that_cannot_create_pods_says_why() -> None:
    failure = {
        "type": "ReplicaFailure",
        "status": "True",
        "reason": "FailedCreate",
        "message": 'pods "daoyan-server-7c9-x" is forbidden: exceeded quota: gpu, '
        "requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: "
        "requests.nvidia.com/gpu=4",
    }
    got = st.serving_state(deployment(conditions=[failure]), [])
    assert (got.ready, got.reason) == (False, "ReplicaFailure")
    assert got.message.startswith("0/1 replicas ready; the server's pods cannot be created: ")
    assert "exceeded quota: gpu" in got.message


def test_zero_replicas_is_scaled_to_zero_not_waiting() -> None:
    got = st.serving_state(deployment(replicas=0), [])
    assert (got.ready, got.reason) == (False, "ScaledToZero")
    assert "scaled to zero" in got.message


def test_ready_replicas_are_ready_whatever_an_old_pod_said() -> None:
    pod = server_pod("p", last=terminated(launcher.EXIT_REFUSED, REFUSAL))
    got = st.serving_state(deployment(ready=1), [pod])
    assert (got.ready, got.reason, got.message) == (True, "DeploymentReady", "1/1 replicas ready")


def test_the_refusal_reaches_the_jobs_status(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[dict[str, Any]] = []
    monkeypatch.setattr(kube, "apply", lambda obj: applied.append(obj) or obj)
    s = ftj.FineTuneJobSpec.model_validate(
        {
            "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
            "serve": {"engine": "vllm-cpu"},
        }
    )
    owner = manifests.Owner(name="daoyan", namespace="team-a", uid="u")
    status = jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.SUCCEEDED)
    local_provider.serve(s, owner, status, local_provider.Children(), OperatorSettings(), 2)
    deploy = applied[-1]
    deploy["status"] = {"readyReplicas": 0}
    template_hash = deploy["spec"]["template"]["metadata"]["annotations"]
    pod = server_pod("p", last=terminated(launcher.EXIT_REFUSED, REFUSAL))
    pod["metadata"]["annotations"] = dict(template_hash)
    children = local_provider.Children(deployment=deploy, server_pods=[pod])
    local_provider.serve(s, owner, status, children, OperatorSettings(), 2)
    cond = {c.type: c for c in status.conditions}["ServingReady"]
    assert (cond.status, cond.reason) == ("False", "LaunchRefused")
    assert "LoRA rank 64 is too high" in cond.message
    assert status.phase == jobstatus.Phase.SUCCEEDED
    assert status.message is not None and "waiting for vLLM" not in status.message


def test_a_server_pod_whose_image_cannot_be_pulled_says_so() -> None:
    state = {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}}
    old = server_pod("daoyan-server-old", state=state, config_hash="older")
    seen = st.serving_state(deployment(), [old])
    assert seen.reason == "DeploymentNotReady"  # a pod of an older config is not the server's
    seen = st.serving_state(deployment(), [server_pod("daoyan-server-abc", state=state)])
    assert seen.reason == st.NOT_STARTING and not seen.ready
    assert seen.message == (
        "0/1 replicas ready; a server pod cannot start: ErrImagePull: pull access denied "
        "(pod daoyan-server-abc, container vllm)"
    )
