"""Trainer Job + pods -> phase and message."""

from __future__ import annotations

from typing import Any

from kubetune.api.jobstatus import Phase
from kubetune.operator import status as st
from kubetune.operator.kueue import Workload


def job(*conds: dict[str, Any], suspend: bool = False) -> dict[str, Any]:
    return {"spec": {"suspend": suspend}, "status": {"conditions": list(conds)}}


def pod(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": phase, **status},
    }


def test_no_job_is_pending() -> None:
    assert st.observe_trainer(None, []).phase == Phase.PENDING


def test_unschedulable_pod_is_queued_with_the_schedulers_reason() -> None:
    p = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 2 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    seen = st.observe_trainer(job(), [p])
    assert seen.phase == Phase.QUEUED
    assert "Insufficient nvidia.com/gpu" in seen.message


def test_running_pod_is_running() -> None:
    assert st.observe_trainer(job(), [pod("Running")]).phase == Phase.RUNNING


def test_suspended_job_is_queued() -> None:
    seen = st.observe_trainer(job(suspend=True), [])
    assert seen.phase == Phase.QUEUED and "suspended" in seen.message


def test_complete_job_succeeds() -> None:
    assert (
        st.observe_trainer(job({"type": "Complete", "status": "True"}), []).phase == Phase.SUCCEEDED
    )


def test_failure_names_oom_exit_code_and_last_line() -> None:
    p = pod(
        "Failed",
        containerStatuses=[
            {
                "state": {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "OOMKilled",
                        "message": "loading\nCUDA out of memory",
                    }
                }
            }
        ],
    )
    seen = st.observe_trainer(
        job({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}), [p]
    )
    assert seen.phase == Phase.FAILED and seen.reason == "OOMKilled"
    assert "exit code 137" in seen.message and "CUDA out of memory" in seen.message


def test_deadline_is_the_reason() -> None:
    seen = st.observe_trainer(
        job(
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
            }
        ),
        [],
    )
    assert seen.reason == "DeadlineExceeded" and "deadline" in seen.message


def test_condition_transition_time_moves_only_on_change() -> None:
    conds = st.set_condition([], "Ready", False, "Running", "training")
    first = conds[0].last_transition_time
    conds[0] = conds[0].model_copy(update={"last_transition_time": "2000-01-01T00:00:00Z"})
    same = st.set_condition(conds, "Ready", False, "Running", "still training")
    assert (
        same[0].last_transition_time == "2000-01-01T00:00:00Z"
        and same[0].message == "still training"
    )
    flipped = st.set_condition(same, "Ready", True, "Completed", "done")
    assert flipped[0].last_transition_time != "2000-01-01T00:00:00Z" and first is not None


def test_a_queued_job_says_what_its_kueue_workload_says() -> None:
    def wl(active: bool, admitted: bool, waiting: str = "") -> Workload:
        return Workload("kueue.x-k8s.io/v1beta2", "job-x-1", active, admitted, waiting)

    quota = "insufficient unused quota for nvidia.com/gpu in flavor a100, 1 more needed"
    seen = st.observe_trainer(job(suspend=True), [], wl(True, False, quota))
    assert seen.phase == Phase.QUEUED and seen.reason == "InQueue"
    assert seen.message == f"waiting in the Kueue queue (workload job-x-1): {quota}"
    off = st.observe_trainer(job(suspend=True), [], wl(False, False, quota))
    assert off.reason == "Suspended" and "deactivated" in off.message
    assert st.observe_trainer(job(suspend=True), [], wl(True, True)).reason == "Admitted"


def waiting(reason: str, message: str = "", name: str = "trainer") -> dict[str, Any]:
    return {"name": name, "state": {"waiting": {"reason": reason, "message": message}}}


def test_a_container_that_cannot_start_says_why_in_the_kubelets_words() -> None:
    p = pod(
        "Pending",
        containerStatuses=[waiting("CreateContainerConfigError", 'secret "hf-token" not found')],
    )
    p["metadata"]["name"] = "daoyan-trainer-x7k2p"
    seen = st.observe_trainer(job(), [p])
    assert seen.phase == Phase.QUEUED and seen.reason == st.NOT_STARTING
    assert seen.message == (
        'trainer pod cannot start: CreateContainerConfigError: secret "hf-token" not found '
        "(pod daoyan-trainer-x7k2p, container trainer)"
    )


def test_an_image_pull_back_off_is_reported_and_a_container_being_created_is_not() -> None:
    pulling = pod(
        "Pending", containerStatuses=[waiting("ImagePullBackOff", "Back-off pulling\n image")]
    )
    assert (
        "ImagePullBackOff: Back-off pulling image" in st.observe_trainer(job(), [pulling]).message
    )
    creating = pod("Pending", containerStatuses=[waiting("ContainerCreating")])
    seen = st.observe_trainer(job(), [creating])
    assert (seen.reason, seen.message) == ("PodPending", "trainer pod is starting")
