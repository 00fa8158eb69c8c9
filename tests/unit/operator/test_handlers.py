"""The kopf glue: which children count as a job's, retries shown in status, deletion cleanup."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf
import prometheus_client
import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import checks, handlers, kube, local_provider, watch_indices

UID = "0123456789abcdef"
SPEC: dict[str, Any] = {
    "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
    "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
    "output": {"keepOnDelete": False},
}
KEY = ("team-a", "daoyan")
RETRIES = "kubetune_reconcile_retries_total"


def owned(name: str, owner_uid: str, uid: str = "", **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "uid": uid, "ownerReferences": [{"uid": owner_uid}]}
    return {"metadata": meta, **extra}


def pod(job_uid: str, phase: str) -> dict[str, Any]:
    return owned("daoyan-trainer-abcde", job_uid, status={"phase": phase})


def indices(job: dict[str, Any] | None, *pods: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "trainer_jobs": {KEY: [job] if job else []},
        "trainer_pods": {KEY: list(pods)},
        "progress_maps": {KEY: more.get("progress", [])},
        "servers": {KEY: more.get("servers", [])},
        "server_pods": {KEY: more.get("server_pods", [])},
    }


def test_children_of_an_earlier_job_of_the_same_name_are_not_this_ones() -> None:
    old_job = owned("daoyan-trainer", "earlier-uid", uid="old-job")
    new_job = owned("daoyan-trainer", UID, uid="new-job")
    found = watch_indices.children(
        {
            "trainer_jobs": {KEY: [new_job, old_job]},
            "trainer_pods": {KEY: [pod("old-job", "Running"), pod("new-job", "Pending")]},
            "progress_maps": {KEY: [owned("daoyan-progress", "earlier-uid")]},
            "servers": {KEY: []},
            "server_pods": {KEY: []},
        },
        KEY,
        UID,
    )
    assert found.job is new_job
    assert [p["status"]["phase"] for p in found.pods] == ["Pending"]
    assert found.progress is None and found.deployment is None


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.warnings: list[str] = []
        monkeypatch.setattr(kube, "patch_merge", lambda *a: self.calls.append(("patch", a)))
        monkeypatch.setattr(
            kube, "delete", lambda *a, **kw: self.calls.append(("delete", (*a, kw)))
        )
        monkeypatch.setattr(
            kube, "create_or_adopt", lambda obj: self.calls.append(("create", obj)) or obj
        )
        monkeypatch.setattr(kube, "apply", lambda obj: self.calls.append(("apply", obj)) or obj)
        monkeypatch.setattr(
            kopf, "warn", lambda body, reason, message: self.warnings.append(message)
        )


def body(spec: dict[str, Any], status: dict[str, Any] | None = None) -> kopf.Body:
    meta = {"name": "daoyan", "namespace": "team-a", "uid": UID, "generation": 2}
    return kopf.Body({"metadata": meta, "spec": spec, "status": status or {}})


def delete_output(index: dict[str, Any], spec: dict[str, Any] = SPEC, runtime: float = 0.0) -> None:
    b = body(spec)
    handlers.delete_output(
        body=b,
        spec=b.spec,
        name="daoyan",
        namespace="team-a",
        uid=UID,
        runtime=datetime.timedelta(seconds=runtime),
        **index,
    )


def test_deletion_removes_the_trainer_before_emptying_its_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    # Finished or not, queued or running: a trainer Job left would be started by Kueue, or
    # write a checkpoint when stopped, into the folder being emptied.
    for phase in ("Running", "Succeeded"):
        job = owned("daoyan-trainer", UID, uid="job", spec={"suspend": True})
        with pytest.raises(kopf.TemporaryError, match="trainer Job and its pods to go"):
            delete_output(indices(job, pod("job", phase)))
        # Deleted in the foreground (its pods get their grace period), not suspended.
        assert rec.calls == [
            ("delete", ("batch/v1", "Job", "team-a", "daoyan-trainer", {"foreground": True}))
        ]
        rec.calls.clear()
    job["metadata"]["deletionTimestamp"] = "2026-11-28T03:00:00Z"
    with pytest.raises(kopf.TemporaryError, match="trainer Job and its pods to go"):
        delete_output(indices(job, pod("job", "Running")))
    assert rec.calls == []  # asked once; now waited for
    delete_output(indices(None))
    assert [(what, obj["metadata"]["name"]) for what, obj in rec.calls] == [
        ("create", "daoyan-cleanup-012345")
    ]


def test_deletion_lets_go_of_a_cleanup_that_keeps_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    job = owned("daoyan-trainer", UID, uid="job", spec={"suspend": True})
    with pytest.raises(kopf.TemporaryError):
        delete_output(indices(job, pod("job", "Running")), runtime=60)
    later = handlers.CLEANUP_PATIENCE.total_seconds() + 1
    delete_output(indices(job, pod("job", "Running")), runtime=later)  # returns: finalizer goes
    assert "the output folder was not removed" in rec.warnings[-1]


def test_deletion_of_a_job_whose_stored_spec_no_longer_parses_is_not_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    delete_output(indices(None), spec={**SPEC, "lora": {"r": 0}})
    assert rec.calls == [] and "invalid" in rec.warnings[-1]
    with pytest.raises(checks.InvalidJob):
        checks.parse_spec({**SPEC, "lora": {"r": 0}})


def reconcile(status: dict[str, Any], patch: kopf.Patch) -> None:
    b = body(SPEC, status)
    handlers.reconcile(
        body=b,
        spec=b.spec,
        status=b.status,
        name="daoyan",
        namespace="team-a",
        uid=UID,
        meta=b.meta,
        patch=patch,
        **indices(None),
    )


def test_a_step_being_retried_is_shown_in_status_until_it_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = jobstatus.FineTuneJobStatus(
        phase=jobstatus.Phase.RUNNING, start_time="2026-11-28T00:00:00Z"
    )

    def busy(*_: Any) -> jobstatus.FineTuneJobStatus:
        raise kube.TemporaryKubeError("create Job team-a/daoyan-trainer: API server answered 503")

    monkeypatch.setattr(local_provider, "reconcile", busy)
    patch = kopf.Patch()

    def retries() -> float:
        sample = {"kind": "FineTuneJob", "api": "kubernetes"}
        return prometheus_client.REGISTRY.get_sample_value(RETRIES, sample) or 0.0

    before = retries()
    with pytest.raises(kopf.TemporaryError):
        reconcile(running.to_wire(), patch)
    assert retries() == before + 1
    conditions = {c["type"]: c for c in patch["status"]["conditions"]}
    assert conditions["Reconciled"]["status"] == "False"
    assert "503" in conditions["Reconciled"]["message"]

    retried = running.model_copy(deep=True)
    retried.conditions = [
        jobstatus.Condition.model_validate(c) for c in patch["status"]["conditions"]
    ]
    monkeypatch.setattr(local_provider, "reconcile", lambda spec, owner, new, *_: new)
    patch = kopf.Patch()
    reconcile(retried.to_wire(), patch)
    assert "Reconciled" not in {c["type"] for c in patch["status"]["conditions"]}


def test_a_phase_change_is_an_event_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda _, type, reason, message: posted.append((reason, message))
    )
    running = jobstatus.FineTuneJobStatus(
        phase=jobstatus.Phase.RUNNING, start_time="2026-11-28T00:00:00Z"
    )

    def finished(spec: Any, owner: Any, new: jobstatus.FineTuneJobStatus, *_: Any) -> Any:
        return new.model_copy(
            update={"phase": jobstatus.Phase.SUCCEEDED, "message": "training finished"}
        )

    monkeypatch.setattr(local_provider, "reconcile", finished)
    caplog.set_level(logging.INFO, logger=handlers.__name__)
    reconcile(running.to_wire(), kopf.Patch())
    assert posted == [("Succeeded", "training finished")]
    assert [r.getMessage() for r in caplog.records if r.name == handlers.__name__] == [
        "FineTuneJob team-a/daoyan: Running -> Succeeded: training finished"
    ]

    monkeypatch.setattr(local_provider, "reconcile", lambda spec, owner, new, *_: new)
    caplog.clear()
    reconcile(running.to_wire(), kopf.Patch())  # no change: no event, no line
    assert len(posted) == 1 and not caplog.records


def _resource(group: str, version: str, plural: str) -> kopf.Resource:
    return kopf.Resource(group, version, plural, namespaced=True)


@pytest.mark.parametrize(
    ("group", "version", "plural"),
    [
        ("batch", "v1", "jobs"),
        ("", "v1", "pods"),
        ("", "v1", "configmaps"),
        ("apps", "v1", "deployments"),
    ],
)
def test_children_are_watched_with_a_server_side_label_selector(
    group: str, version: str, plural: str
) -> None:
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings)
    selectors = list(settings.watching.label_selectors.collect(_resource(group, version, plural)))
    assert selectors == ["app.kubernetes.io/managed-by=kubetune"]


def test_finetunejobs_and_other_kinds_are_watched_unfiltered() -> None:
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings)
    for resource in (
        _resource(ftj.GROUP, ftj.VERSION, ftj.PLURAL),
        _resource("", "v1", "secrets"),
        _resource("kueue.x-k8s.io", "v1beta2", "jobs"),
    ):
        assert not list(settings.watching.label_selectors.collect(resource)), resource


# ----------------------------------------------------------------------------- ModelServer


def reconcile_server(spec: dict[str, Any], jobs: list[Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(local_provider, "_checked", {})
    meta = {"name": "qwen", "namespace": "team-a", "uid": "server-uid", "generation": 3}
    b = kopf.Body({"metadata": meta, "spec": spec, "status": {}})
    patch = kopf.Patch()
    key = ("team-a", "qwen")
    handlers.reconcile_model_server(
        body=b,
        spec=b.spec,
        status=b.status,
        name="qwen",
        namespace="team-a",
        uid="server-uid",
        meta=b.meta,
        patch=patch,
        served_jobs={key: jobs},
        model_server_deployments={key: []},
        model_server_pods={key: []},
    )
    return patch.status


def test_an_invalid_model_server_says_which_field_and_creates_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    status = reconcile_server({"model": {"id": "m/x"}, "maxLoras": 0}, [], monkeypatch)
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Invalid")
    assert ready["message"].startswith("`maxLoras`: Input should be greater than or equal to 1")
    assert rec.calls == []


def test_a_model_server_serves_the_jobs_the_index_says_name_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    job = handlers.model_server.member(
        {
            "metadata": {"name": "daoyan", "uid": UID},
            "spec": {**SPEC, "model": {"id": "m/x"}, "serve": {"server": "qwen"}},
            "status": {"phase": "Succeeded"},
        }
    )
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda b, type, reason, message: posted.append((reason, message))
    )
    spec = {"model": {"id": "m/x"}, "engine": "vllm-cpu", "resources": {"gpus": 0}}
    status = reconcile_server(spec, [job], monkeypatch)
    assert status["adapters"] == ["daoyan"] and status["observedGeneration"] == 3
    assert posted == [
        ("AdaptersChanged", "added daoyan; the replicas restart with the new adapter set")
    ]
    kinds = [obj["kind"] for verb, obj in rec.calls if verb == "apply"]
    assert kinds == ["ConfigMap", "Service", "Deployment"]
