"""spec.suspend on the trainer: the Job's own suspend, or for a queued Job its Kueue Workload
(Kueue unsuspends an admitted Job that anyone else suspends)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import kube, kueue, local_provider, manifests
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")


def spec(**fields: Any) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate(
        {
            "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
            **fields,
        }
    )


def job(suspend: bool) -> dict[str, Any]:
    return {"metadata": {"name": "daoyan-trainer", "uid": "job-uid"}, "spec": {"suspend": suspend}}


def workload(active: bool = True, admitted: bool = False) -> kueue.Workload:
    return kueue.Workload(
        api_version="kueue.x-k8s.io/v1beta2",
        name="job-daoyan-trainer-3f2a1",
        active=active,
        admitted=admitted,
        waiting="" if admitted else "insufficient unused quota for nvidia.com/gpu",
    )


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, found: kueue.Workload | None) -> None:
        self.found = found
        self.installed = True
        self.calls: list[tuple[Any, ...]] = []
        monkeypatch.setattr(kube, "patch_merge", lambda *a: self.calls.append(("patch", *a)))
        monkeypatch.setattr(kueue, "find", self.find)
        monkeypatch.setattr(kube, "create_or_adopt", self.create)
        monkeypatch.setattr(kube, "apply", self.apply)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return obj

    def find(self, namespace: str, job_uid: str) -> kueue.Workload | None:
        self.calls.append(("find", namespace, job_uid))
        if self.installed:
            return self.found
        raise kueue.NotInstalled("spec.queue is set, but this cluster serves no Kueue")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))
        return obj


def test_a_job_of_its_own_is_suspended_and_resumed_directly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, None)
    assert local_provider.sync_suspend(spec(suspend=True), job(False), OWNER) is None
    assert local_provider.sync_suspend(spec(suspend=False), job(True), OWNER) is None
    assert [c[-1] for c in rec.calls] == [{"spec": {"suspend": True}}, {"spec": {"suspend": False}}]
    rec.calls.clear()
    local_provider.sync_suspend(spec(suspend=False), job(False), OWNER)
    assert rec.calls == []


def test_a_queued_admitted_job_is_stopped_through_its_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, workload(active=True, admitted=True))
    seen = local_provider.sync_suspend(spec(queue="gpus", suspend=True), job(False), OWNER)
    assert seen is not None and not seen.active
    assert rec.calls == [
        ("find", "team-a", "job-uid"),
        (
            "patch",
            "kueue.x-k8s.io/v1beta2",
            "Workload",
            "team-a",
            "job-daoyan-trainer-3f2a1",
            {"spec": {"active": False}},
        ),
    ]


def test_a_resumed_queued_job_is_reactivated_not_unsuspended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, workload(active=False))
    seen = local_provider.sync_suspend(spec(queue="gpus"), job(True), OWNER)
    assert seen is not None and seen.active
    assert [c[0] for c in rec.calls] == ["find", "patch"]
    assert rec.calls[-1][-1] == {"spec": {"active": True}}


def test_a_queued_job_waiting_for_kueue_is_left_to_kueue(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, workload(active=True))
    seen = local_provider.sync_suspend(spec(queue="gpus"), job(True), OWNER)
    assert seen == workload(active=True)
    rec.found = None  # Kueue has not made the Workload yet (or is not installed)
    assert local_provider.sync_suspend(spec(queue="gpus"), job(True), OWNER) is None
    assert [c[0] for c in rec.calls] == ["find", "find"]


def test_a_running_queued_job_costs_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, workload(active=True, admitted=True))
    assert local_provider.sync_suspend(spec(queue="gpus"), job(False), OWNER) is None
    assert rec.calls == []


def test_a_queued_job_with_no_workload_is_still_suspended_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, None)
    local_provider.sync_suspend(spec(queue="gpus", suspend=True), job(False), OWNER)
    assert rec.calls[-1][-1] == {"spec": {"suspend": True}}


def test_a_queued_job_suspended_before_it_starts_creates_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch, None)
    new = local_provider.reconcile(
        spec(queue="gpus", suspend=True),
        OWNER,
        jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.VALIDATING),
        local_provider.Children(),
        OperatorSettings(),
        3,
    )
    assert rec.calls == []
    assert new.phase == jobstatus.Phase.QUEUED and new.message == st.SUSPENDED_BEFORE_START
    assert new.start_time  # the spec is fixed from now on, as for any started job
    resumed = local_provider.reconcile(
        spec(queue="gpus"), OWNER, new, local_provider.Children(), OperatorSettings(), 4
    )
    assert ("create", "Job", "daoyan-trainer") in rec.calls
    assert resumed.start_time == new.start_time


def test_a_queued_job_in_a_cluster_without_kueue_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, None)
    rec.installed = False
    children = local_provider.Children(job=job(True))
    status = jobstatus.FineTuneJobStatus(
        phase=jobstatus.Phase.QUEUED, start_time="2026-11-28T04:00:00Z"
    )
    new = local_provider.reconcile(
        spec(queue="gpus"), OWNER, status, children, OperatorSettings(), 2
    )
    assert new.phase == jobstatus.Phase.QUEUED
    assert new.message is not None and "serves no Kueue" in new.message
    # Asked to stop a running one anyway, it suspends the Job itself.
    local_provider.reconcile(
        spec(queue="gpus", suspend=True),
        OWNER,
        status,
        local_provider.Children(job=job(False)),
        OperatorSettings(),
        3,
    )
    assert rec.calls[-1] == (
        "patch",
        "batch/v1",
        "Job",
        "team-a",
        "daoyan-trainer",
        {"spec": {"suspend": True}},
    )
