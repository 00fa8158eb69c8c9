"""Serving after success (local_provider.serve): follows spec.serve, costs nothing when unchanged,
and a server the API refuses leaves the training result standing."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.operator import kube, local_provider, manifests
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
        self.refuse = refuse
        monkeypatch.setattr(kube, "apply", self.apply)
        monkeypatch.setattr(kube, "delete", self.delete)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.refuse:
            raise kube.NameTaken(f"{obj['kind']} team-a/daoyan-server already exists")
        self.applied.append(obj)
        return obj

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.deleted.append((kind, name))


def succeeded() -> ftj.FineTuneJobStatus:
    return ftj.FineTuneJobStatus(phase=ftj.Phase.SUCCEEDED)


def serve(
    s: ftj.FineTuneJobSpec, status: ftj.FineTuneJobStatus, deployment: dict[str, Any] | None
) -> ftj.FineTuneJobStatus:
    children = local_provider.Children(deployment=deployment)
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


def test_a_refused_server_is_reported_and_the_job_stays_succeeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeKube(monkeypatch, refuse=True)
    status = serve(spec(), succeeded(), None)
    assert status.phase == ftj.Phase.SUCCEEDED
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
