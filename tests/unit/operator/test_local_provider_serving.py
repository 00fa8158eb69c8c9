"""local_provider.reconcile around serving: a serve config that cannot be built leaves the
training result standing, and a trainer Job found without a start time gives it one."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import kube, local_provider, manifests, serving_manifests
from kubetune.operator.settings import OperatorSettings

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")
SETTINGS = OperatorSettings()


def spec(model: dict[str, Any]) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate(
        {
            "model": model,
            "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
            "serve": {"engine": "vllm-cpu"},
        }
    )


PVC_MODEL = {"pvc": {"claimName": "models", "path": "llama/Llama 3 8B"}}


def complete_job() -> dict[str, Any]:
    return {
        "metadata": {
            "name": "daoyan-trainer",
            "uid": "job-uid",
            "creationTimestamp": "2026-11-28T04:00:00Z",
        },
        "spec": {"suspend": False},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }


class FakeKube:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        monkeypatch.setattr(kube, "apply", self.apply)
        monkeypatch.setattr(kube, "create_or_adopt", self.create)
        # The Events of a trainer Job without pods (none here: nothing was refused).
        monkeypatch.setattr(kube, "list_objects", lambda *a, **kw: [])

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(obj)
        return obj

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return obj


def reconcile(
    s: ftj.FineTuneJobSpec, status: jobstatus.FineTuneJobStatus, children: local_provider.Children
) -> jobstatus.FineTuneJobStatus:
    return local_provider.reconcile(s, OWNER, status, children, SETTINGS, 5)


def serving_ready(status: jobstatus.FineTuneJobStatus) -> jobstatus.Condition:
    return {c.type: c for c in status.conditions}["ServingReady"]


def running() -> jobstatus.FineTuneJobStatus:
    return jobstatus.FineTuneJobStatus(
        phase=jobstatus.Phase.RUNNING, start_time="2026-11-28T04:00:01Z"
    )


def test_a_pvc_model_folder_with_spaces_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    new = reconcile(spec(PVC_MODEL), running(), local_provider.Children(job=complete_job()))
    assert new.phase == jobstatus.Phase.SUCCEEDED
    assert [o["kind"] for o in fake.applied][-1] == "Deployment"
    assert serving_ready(new).reason == "DeploymentNotReady"
    assert new.endpoint is not None and new.endpoint.model == "daoyan"


def test_a_serve_config_that_cannot_be_built_is_refused_and_training_success_stands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    # As before the fix: the folder's raw name, which the serve config refuses.
    monkeypatch.setattr(serving_manifests, "base_served_name", lambda model, adapter: "Llama 3 8B")
    new = reconcile(spec(PVC_MODEL), running(), local_provider.Children(job=complete_job()))
    assert new.phase == jobstatus.Phase.SUCCEEDED and new.completion_time
    cond = serving_ready(new)
    assert (cond.status, cond.reason) == ("False", "ServingRefused")
    assert "`servedModelName`" in cond.message or "`served_model_name`" in cond.message
    assert "\n" not in cond.message
    assert new.message is not None and new.message.startswith("training finished; the serve")
    assert new.endpoint is None and fake.applied == []


def test_a_job_found_without_a_start_time_gets_the_jobs_creation_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    job = complete_job()
    job["status"] = {"active": 1}
    # The tick that created the Job lost its status patch: status still says Validating.
    new = reconcile(
        spec({"id": "Qwen/Qwen2.5-0.5B-Instruct"}),
        jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.VALIDATING),
        local_provider.Children(job=job),
    )
    assert new.start_time == "2026-11-28T04:00:00Z"
    assert fake.created == []  # the Job is there: nothing is created again
    # A start time already recorded stays.
    again = reconcile(
        spec({"id": "Qwen/Qwen2.5-0.5B-Instruct"}), running(), local_provider.Children(job=job)
    )
    assert again.start_time == "2026-11-28T04:00:01Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_deleted_endpoint_or_service_is_applied_again_at_the_next_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    clock = Clock()
    monkeypatch.setattr(local_provider, "_clock", clock)
    monkeypatch.setattr(local_provider, "_checked", {})
    s = spec({"id": "Qwen/Qwen2.5-0.5B-Instruct"})
    wanted = local_provider.serving_wanted(s, OWNER, SETTINGS)
    existing = {(o["kind"], o["metadata"]["name"]): o for o in wanted}
    gets: list[tuple[str, str]] = []

    def get(api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        gets.append((kind, name))
        return existing.get((kind, name))

    monkeypatch.setattr(kube, "get", get)
    deployment = wanted[-1]

    # The operator just (re)started: everything is read back once; all there, nothing applied.
    local_provider.ensure_serving(wanted, OWNER, deployment)
    assert sorted(gets) == [
        ("ConfigMap", "daoyan-endpoint"),
        ("ConfigMap", "daoyan-server-config"),
        ("Service", "daoyan-server"),
    ]
    assert fake.applied == []

    # Someone deletes the endpoint ConfigMap and the Service: ticks before the recheck cost
    # nothing; the recheck applies exactly those two again.
    del existing[("ConfigMap", "daoyan-endpoint")]
    del existing[("Service", "daoyan-server")]
    gets.clear()
    clock.now += local_provider.SERVING_RECHECK_SECONDS - 1
    local_provider.ensure_serving(wanted, OWNER, deployment)
    assert gets == [] and fake.applied == []
    clock.now += 1
    local_provider.ensure_serving(wanted, OWNER, deployment)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in fake.applied) == [
        ("ConfigMap", "daoyan-endpoint"),
        ("Service", "daoyan-server"),
    ]
    assert len(gets) == 3


def test_objects_just_applied_are_not_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    monkeypatch.setattr(local_provider, "_clock", Clock())
    monkeypatch.setattr(local_provider, "_checked", {})
    monkeypatch.setattr(kube, "get", lambda *a: pytest.fail(f"unexpected GET {a}"))
    s = spec({"id": "Qwen/Qwen2.5-0.5B-Instruct"})
    wanted = local_provider.serving_wanted(s, OWNER, SETTINGS)
    local_provider.ensure_serving(wanted, OWNER, None)
    assert len(fake.applied) == 4
    local_provider.ensure_serving(wanted, OWNER, fake.applied[-1])
    assert len(fake.applied) == 4
