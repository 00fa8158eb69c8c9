"""local_provider.reconcile around the trainer Job: a pod the API server refuses is named in
status (from the Job's FailedCreate Events), and completion time is the Job's own."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import kube, local_provider, manifests
from kubetune.operator.settings import OperatorSettings

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")
SPEC = ftj.FineTuneJobSpec.model_validate(
    {
        "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
        "serve": {"enabled": False},
    }
)
QUOTA = (
    'Error creating: pods "daoyan-trainer-x7k2p" is forbidden: exceeded quota: no-pods, '
    "requested: pods=1, used: pods=0, limited: pods=0"
)


def job(created: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "daoyan-trainer",
            "namespace": "team-a",
            "uid": "job-uid",
            "creationTimestamp": created,
        },
        "spec": {"suspend": False},
        "status": status,
    }


def event(message: str, last: str, reason: str = "FailedCreate") -> dict[str, Any]:
    return {"reason": reason, "message": message, "lastTimestamp": last}


def running() -> jobstatus.FineTuneJobStatus:
    return jobstatus.FineTuneJobStatus(
        phase=jobstatus.Phase.QUEUED, start_time="2026-11-28T04:00:01Z"
    )


class Events:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.calls: list[tuple[Any, ...]] = []
        monkeypatch.setattr(kube, "list_objects", self.list)

    def list(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append((*args, kwargs))
        return self.items


def reconcile(j: dict[str, Any]) -> jobstatus.FineTuneJobStatus:
    children = local_provider.Children(job=j)
    return local_provider.reconcile(SPEC, OWNER, running(), children, OperatorSettings(), 3)


def test_a_trainer_pod_the_api_server_refuses_is_named_in_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = Events(
        monkeypatch, [event("older", "2026-11-28T04:00:05Z"), event(QUOTA, "2026-11-28T04:01:00Z")]
    )
    new = reconcile(job("2026-11-28T04:00:00Z", active=0))
    assert new.phase == jobstatus.Phase.QUEUED
    assert new.message == f"the trainer pod cannot be created: {QUOTA}"
    ready = {c.type: c for c in new.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("False", "PodCreationRefused")
    [(version, kind, namespace, selectors)] = events.calls
    assert (version, kind, namespace) == ("v1", "Event", "team-a")
    assert selectors == {"field_selector": "involvedObject.uid=job-uid,reason=FailedCreate"}


def test_a_young_job_without_pods_costs_no_events_request(monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events(monkeypatch, [event(QUOTA, "2026-11-28T04:01:00Z")])
    just_now = local_provider.st.now()
    new = reconcile(job(just_now))
    assert new.message == "waiting for the trainer pod" and events.calls == []


def test_no_refusal_or_no_right_to_list_events_leaves_the_plain_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Events(
        monkeypatch, [event("Created pod: daoyan-trainer-x7k2p", "t", reason="SuccessfulCreate")]
    )
    assert reconcile(job("2026-11-28T04:00:00Z")).message == "waiting for the trainer pod"

    def forbidden(*_: Any, **__: Any) -> list[dict[str, Any]]:
        raise kube.PermanentKubeError("events is forbidden: cannot list resource events")

    monkeypatch.setattr(kube, "list_objects", forbidden)
    assert reconcile(job("2026-11-28T04:00:00Z")).message == "waiting for the trainer pod"


def test_completion_time_is_the_jobs_own() -> None:
    done = job(
        "2026-11-28T04:00:00Z",
        completionTime="2026-11-28T05:30:00Z",
        conditions=[{"type": "Complete", "status": "True"}],
    )
    assert reconcile(done).completion_time == "2026-11-28T05:30:00Z"
    failed = job(
        "2026-11-28T04:00:00Z",
        conditions=[
            {"type": "Failed", "status": "True", "lastTransitionTime": "2026-11-28T04:10:00Z"}
        ],
    )
    assert reconcile(failed).completion_time == "2026-11-28T04:10:00Z"


def test_the_trainer_config_is_applied_so_a_stale_one_from_a_failed_tick_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config ConfigMap of a tick whose Job creation failed may predate a spec edit: it is
    applied (its content made the current config's), the rest is created or adopted."""
    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(
        kube,
        "create_or_adopt",
        lambda o: calls.append(("create", o["kind"], o["metadata"]["name"])) or o,
    )
    monkeypatch.setattr(
        kube, "apply", lambda o: calls.append(("apply", o["kind"], o["metadata"]["name"])) or o
    )
    local_provider.ensure_trainer(SPEC, OWNER, OperatorSettings())
    config = manifests.trainer_configmap(manifests.trainer_config(SPEC, OWNER), OWNER)
    assert ("apply", "ConfigMap", config["metadata"]["name"]) in calls
    assert [c for c in calls if c[0] == "apply"] == [
        ("apply", "ConfigMap", config["metadata"]["name"])
    ]
    assert calls[-1] == ("create", "Job", "daoyan-trainer")
