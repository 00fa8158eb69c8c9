"""Serving after success (local_provider.serve): follows spec.serve, costs nothing when unchanged,
and a server the API refuses leaves the training result standing."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import kube, kueue, local_provider, manifests
from kubetune.operator.settings import OperatorSettings

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")
SETTINGS = OperatorSettings()


def spec(**serve: Any) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate(
        {
            "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
            "serve": serve,
        }
    )


class FakeKube:
    """Records what the provider asks of the API server."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> None:
        self.applied: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str]] = []
        self.delete_options: list[dict[str, Any]] = []
        self.refuse = refuse
        monkeypatch.setattr(kube, "apply", self.apply)
        monkeypatch.setattr(kube, "delete", self.delete)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.refuse:
            raise kube.NameTaken(f"{obj['kind']} team-a/daoyan-server already exists")
        self.applied.append(obj)
        return obj

    def delete(self, api_version: str, kind: str, namespace: str, name: str, **kw: Any) -> None:
        self.deleted.append((kind, name))
        self.delete_options.append(kw)


def succeeded() -> jobstatus.FineTuneJobStatus:
    return jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.SUCCEEDED)


def serve(
    s: ftj.FineTuneJobSpec,
    status: jobstatus.FineTuneJobStatus,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]] | None = None,
) -> jobstatus.FineTuneJobStatus:
    children = local_provider.Children(deployment=deployment, server_pods=pods or [])
    local_provider.serve(s, OWNER, status, children, SETTINGS, generation=3)
    return status


def test_first_time_every_serving_object_is_applied_the_deployment_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    status = serve(spec(), succeeded(), None)
    kinds = [o["kind"] for o in fake.applied]
    assert sorted(kinds) == ["ConfigMap", "ConfigMap", "Deployment", "Service"]
    assert kinds[-1] == "Deployment"
    assert status.endpoint is not None and status.fine_tuned_model == "daoyan"


def test_nothing_is_sent_while_spec_serve_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    serve(spec(), succeeded(), None)
    deployment = fake.applied[-1]
    fake.applied.clear()
    serve(spec(), succeeded(), deployment)
    assert fake.applied == []


def test_a_changed_spec_serve_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    serve(spec(), succeeded(), None)
    deployment = fake.applied[-1]
    fake.applied.clear()
    serve(spec(replicas=3), succeeded(), deployment)
    applied = {o["kind"]: o for o in fake.applied}
    assert applied["Deployment"]["spec"]["replicas"] == 3
    before, after = (
        d["metadata"]["annotations"][local_provider.APPLIED_HASH]
        for d in (deployment, applied["Deployment"])
    )
    assert before != after


def test_a_server_moved_to_another_queue_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    serve(spec(queue="serving"), succeeded(), None)
    deployment = fake.applied[-1]
    deployment["metadata"]["uid"] = "deploy-uid-1"
    fake.applied.clear()
    # Replicas alone: applied in place.
    serve(spec(queue="serving", replicas=2), succeeded(), deployment)
    assert fake.deleted == [] and fake.applied[-1]["kind"] == "Deployment"
    # Another queue: Kueue would refuse the change while replicas run, so that very Deployment
    # (by uid: not one made again since) is deleted before the new one is applied.
    serve(spec(queue="serving-2"), succeeded(), deployment)
    assert fake.deleted == [("Deployment", "daoyan-server")]
    assert fake.delete_options == [{"uid": "deploy-uid-1"}]
    labels = fake.applied[-1]["metadata"]["labels"]
    assert labels[manifests.KUEUE_QUEUE_LABEL] == "serving-2"


def test_a_refused_server_is_reported_and_the_job_stays_succeeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeKube(monkeypatch, refuse=True)
    status = serve(spec(), succeeded(), None)
    assert status.phase == jobstatus.Phase.SUCCEEDED
    cond = {c.type: c for c in status.conditions}["ServingReady"]
    assert (cond.status, cond.reason) == ("False", "ServingRefused")
    assert "already exists" in cond.message and status.endpoint is None


def test_turning_serving_off_finishes_a_removal_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    status = serve(spec(), succeeded(), None)
    # The Deployment is gone already (an earlier removal failed after deleting it), the
    # status still shows the endpoint: the rest is removed all the same.
    status = serve(spec(enabled=False), status, None)
    assert ("ConfigMap", "daoyan-endpoint") in fake.deleted
    assert ("Service", "daoyan-server") in fake.deleted
    assert status.endpoint is None
    assert "ServingReady" not in {c.type for c in status.conditions}
    fake.deleted.clear()
    serve(spec(enabled=False), status, None)
    assert fake.deleted == []


def test_replicas_kueue_holds_say_which_queue_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    serve(spec(replicas=2, queue="serving"), succeeded(), None)
    deployment = fake.applied[-1]
    deployment["status"] = {"readyReplicas": 1}
    running = {"metadata": {"name": "a", "uid": "uid-a"}, "spec": {}}
    gated = {
        "metadata": {
            "name": "b",
            "uid": "uid-b",
            "labels": {"kueue.x-k8s.io/queue-name": "serving"},
        },
        "spec": {"schedulingGates": [{"name": kueue.ADMISSION_GATE}]},
    }
    asked: list[str] = []
    waiting = kueue.Workload(
        "v1beta2", "pod-b-1f2e3", True, False, "insufficient quota for nvidia.com/gpu"
    )
    monkeypatch.setattr(kueue, "find", lambda ns, uid: asked.append(uid) or waiting)

    status = serve(spec(replicas=2, queue="serving"), succeeded(), deployment, [running, gated])
    cond = {c.type: c for c in status.conditions}["ServingReady"]
    assert (cond.status, cond.reason) == ("False", "ServingQueued")
    assert cond.message == (
        "1/2 replicas ready; 1 replica waiting in the Kueue queue serving (workload pod-b-1f2e3): "
        "insufficient quota for nvidia.com/gpu"
    )
    assert asked == ["uid-b"] and status.phase == jobstatus.Phase.SUCCEEDED

    # Once every replica is ready, Kueue is not asked.
    deployment["status"] = {"readyReplicas": 2}
    status = serve(spec(replicas=2, queue="serving"), succeeded(), deployment, [running])
    cond = {c.type: c for c in status.conditions}["ServingReady"]
    assert (cond.status, cond.reason) == ("True", "DeploymentReady") and asked == ["uid-b"]
