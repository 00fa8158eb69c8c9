"""The kopf handlers of ``provider: openai`` jobs, end to end against the fake OpenAI API.

``handlers.reconcile`` (the timer) and ``handlers.delete_remote`` (the finalizer) are called as
kopf calls them, with a live ``kopf.Body``; the Kubernetes side is in memory (the Secret, the
dataset, the ConfigMaps written, the Events posted) and the OpenAI side is the fake, driven by
the real ``openai`` client. What is checked is what a user would see: status, Events, and how
many paid jobs exist at OpenAI and which were cancelled.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from fakes.openai_finetune import FakeOpenAI, Timing
from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import checks, handlers, kube
from kubetune.operator.settings import OperatorSettings

KEY = "sk-kubetune-reconcile-Z8x7C6v5B4n3M2l1K0jH"
NAMESPACE, NAME = "team-a", "daoyan"
UID = "5e4d3c2b-0000-4000-8000-0000000000aa"
MODEL = "gpt-4o-mini-2024-07-18"
ENDPOINT = f"{NAME}-endpoint"
TRAINING = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]})
    for i in range(12)
).encode()  # fmt: skip


def secret(**data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "openai",
            "namespace": NAMESPACE,
            "labels": {"kubetune.io/credentials": "openai"},
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


class Cluster:
    """The API server as the handlers see it: Secrets, the dataset, ConfigMaps, Events."""

    def __init__(self) -> None:
        self.secrets = {"openai": secret(**{"api-key": KEY})}
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.taken: set[str] = set()
        """ConfigMap names that belong to someone else (creating one raises NameTaken)."""
        self.events: list[tuple[str, str, str]] = []
        self.dataset_reads = 0

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        return self.secrets.get(name) if kind == "Secret" else None

    def create_or_adopt(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name in self.taken:
            raise kube.NameTaken(
                f"ConfigMap {NAMESPACE}/{name} already exists and belongs to something else; "
                "rename the FineTuneJob or remove that object"
            )
        self.configmaps[name] = obj
        return obj

    @contextlib.contextmanager
    def open_dataset(
        self, src: Any, namespace: str, field: str, *_: Any, **__: Any
    ) -> Iterator[io.BytesIO]:
        self.dataset_reads += 1
        yield io.BytesIO(TRAINING)

    def event(self, body: Any, *, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    def warn(self, body: Any, *, reason: str, message: str) -> None:
        self.events.append(("Warning", reason, message))


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(2, 2, 10)).serve() as f:
        yield f


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, fake: FakeOpenAI) -> Cluster:
    c = Cluster()
    monkeypatch.setattr(kube, "get", c.get)
    monkeypatch.setattr(kube, "create_or_adopt", c.create_or_adopt)
    monkeypatch.setattr(checks, "open_dataset", c.open_dataset)
    monkeypatch.setattr(kopf, "event", c.event)
    monkeypatch.setattr(kopf, "warn", c.warn)
    settings = OperatorSettings(
        openai_allowed_base_urls=(fake.base_url,), openai_poll_interval=0.0
    )  # every tick polls: the fake's clock, not the wall clock, moves the job
    monkeypatch.setattr(handlers, "SETTINGS", settings)
    return c


class Flag:
    """kopf's ``stopped`` for a sync handler: set when the timer is being stopped."""

    def __init__(self) -> None:
        self.flag = threading.Event()

    def is_set(self) -> bool:
        return self.flag.is_set()


class Job:
    """One FineTuneJob as kopf hands it to the handlers: a live body, patched after each call."""

    def __init__(self, fake: FakeOpenAI, **spec: Any) -> None:
        openai_spec = {"model": MODEL, "baseURL": fake.base_url,
                       "apiKeySecretRef": {"name": "openai"}}  # fmt: skip
        openai_spec.update(spec.pop("openai", {}))
        self.raw: dict[str, Any] = {
            "apiVersion": f"{ftj.GROUP}/{ftj.VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID, "generation": 1},
            "spec": {
                "provider": "openai",
                "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}},
                "openai": openai_spec,
                **spec,
            },
            "status": {},
        }
        self.body = kopf.Body(self.raw)
        self.stopped = Flag()

    @property
    def status(self) -> jobstatus.FineTuneJobStatus:
        return jobstatus.FineTuneJobStatus.model_validate(self.raw["status"])

    def condition(self, type_: str) -> jobstatus.Condition | None:
        return next((c for c in self.status.conditions if c.type == type_), None)

    def tick(self, retry: int = 0) -> None:
        """One timer tick; its status patch is applied even when it raises (as kopf does)."""
        patch = kopf.Patch()
        try:
            handlers.reconcile(
                body=self.body,
                spec=self.body.spec,
                status=self.body.status,
                name=NAME,
                namespace=NAMESPACE,
                uid=UID,
                meta=self.body.meta,
                patch=patch,
                stopped=self.stopped,  # type: ignore[arg-type]
                retry=retry,
            )
        finally:
            for k, v in (patch.get("status") or {}).items():
                if v is None:
                    self.raw["status"].pop(k, None)
                else:
                    self.raw["status"][k] = v

    def delete(self) -> None:
        """The finalizer (kopf marks the body deleted first)."""
        self.raw["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:00Z"
        self.stopped.flag.set()
        handlers.delete_remote(
            body=self.body,
            spec=self.body.spec,
            status=self.body.status,
            name=NAME,
            namespace=NAMESPACE,
            uid=UID,
            runtime=datetime.timedelta(seconds=1),
        )


def run(fake: FakeOpenAI, job: Job, until: jobstatus.Phase, ticks: int = 40) -> None:
    """Ticks like the timer (a temporary error is retried next tick) until ``until``."""
    for _ in range(ticks):
        with contextlib.suppress(kopf.TemporaryError):
            job.tick()
        if job.status.phase == until:
            return
        fake.advance(1)
    raise AssertionError(f"not {until} after {ticks} ticks: {job.raw['status']}")


def remote_jobs(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [
        j for j in fake.snapshot()["jobs"] if (j["metadata"] or {}).get("kubetune.io/uid") == UID
    ]


def files_of(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [f for f in fake.snapshot()["files"] if f["filename"].startswith(f"kubetune-{UID}-")]


# ----------------------------------------------------------------------------- deletion


class Background:
    """A tick running in a thread, as kopf runs the timer next to the deletion handler."""

    def __init__(self, job: Job) -> None:
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        self.thread.start()

    def _run(self, job: Job) -> None:
        try:
            job.tick()
        except BaseException as exc:  # reported by join
            self.errors.append(exc)

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the tick did not end"
        assert self.errors == []


@pytest.mark.parametrize("seen_by_the_tick", [True, False])
def test_a_deletion_during_an_upload_leaves_no_paid_job_running(
    cluster: Cluster, fake: FakeOpenAI, seen_by_the_tick: bool
) -> None:
    """The finalizer waits for the tick; a tick that sees the deletion creates nothing, and
    one whose last look came before the deletion has its job cancelled by the cleanup."""
    job = Job(fake)
    job.tick()  # Pending -> Validating, the estimate in status
    assert job.status.phase == jobstatus.Phase.VALIDATING and fake.requests == [], job.raw["status"]
    upload = fake.hold("POST", "/v1/files")
    tick = Background(job)
    assert upload.arrived.wait(10), "the tick never uploaded"

    with pytest.raises(kopf.TemporaryError, match="still running"):
        job.delete()  # the tick holds the lock: no look at OpenAI yet, retried by kopf
    assert fake.cancelled == [] and fake.deleted_files == []
    if not seen_by_the_tick:  # the deletion lands after the tick's last look
        del job.raw["metadata"]["deletionTimestamp"]
        job.stopped.flag.clear()
    upload.release()
    tick.join()

    if seen_by_the_tick:
        assert remote_jobs(fake) == []
        assert "being deleted" in (job.status.message or "")
        assert not any(r["path"] == "/v1/fine_tuning/jobs" and r["method"] == "POST"
                       for r in fake.requests)  # fmt: skip
    else:
        assert len(remote_jobs(fake)) == 1
    job.delete()  # the retry: the tick is over
    jobs = remote_jobs(fake)
    assert all(j["status"] == "cancelled" for j in jobs)
    assert sorted(fake.cancelled) == sorted(j["id"] for j in jobs)
    assert files_of(fake) == [], "the uploaded file is deleted too"


def test_a_tick_while_the_cleanup_runs_does_nothing(cluster: Cluster, fake: FakeOpenAI) -> None:
    job = Job(fake)
    job.tick()
    listing = fake.hold("GET", "/v1/fine_tuning/jobs")
    cleanup = threading.Thread(target=job.delete, daemon=True)
    cleanup.start()
    assert listing.arrived.wait(10)
    before = len(fake.requests)
    del job.raw["metadata"]["deletionTimestamp"]  # even without seeing the deletion
    job.tick()
    assert len(fake.requests) == before, "the tick sent nothing to OpenAI"
    listing.release()
    cleanup.join(30)
    assert remote_jobs(fake) == [] and files_of(fake) == []


# ----------------------------------------------------------------------------- endpoint


def test_success_is_kept_when_the_endpoint_configmap_cannot_be_written(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    cluster.taken.add(ENDPOINT)
    job = Job(fake)
    run(fake, job, jobstatus.Phase.SUCCEEDED)

    done = job.status
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{MODEL}:")
    assert done.cost_usd is not None and done.trained_tokens
    assert done.completion_time and done.endpoint is not None
    serving = job.condition("ServingReady")
    assert serving is not None and (serving.status, serving.reason) == ("False", "EndpointRefused")
    assert f"{NAMESPACE}/{ENDPOINT}" in serving.message and "belongs to something else" in (
        serving.message
    )
    ready = job.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("True", "Succeeded")
    refused = [e for e in cluster.events if e[1] == "EndpointRefused"]
    assert len(refused) == 1 and refused[0][0] == "Warning"

    before = len(fake.requests)
    job.tick()  # still taken: retried, reported once, OpenAI left alone
    assert len(fake.requests) == before and cluster.configmaps == {}
    assert len([e for e in cluster.events if e[1] == "EndpointRefused"]) == 1

    cluster.taken.clear()  # the other object was removed
    job.tick()
    assert cluster.configmaps[ENDPOINT]["data"] == {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_MODEL": done.fine_tuned_model,
    }
    serving = job.condition("ServingReady")
    assert serving is not None and (serving.status, serving.reason) == ("True", "EndpointPublished")
    after = job.status
    assert after.phase == jobstatus.Phase.SUCCEEDED and after.cost_usd == done.cost_usd
    assert after.message == f"fine-tuned model {done.fine_tuned_model} is ready"
    configmaps = dict(cluster.configmaps)
    job.tick()  # published: nothing more is done
    assert len(fake.requests) == before and cluster.configmaps == configmaps


# ----------------------------------------------------------------------------- following


def test_a_refusal_while_following_is_retried_not_failed(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    job = Job(fake)
    while not (job.status.remote and job.status.remote.id):
        job.tick()
    job_id = job.status.remote.id
    fake.fail(422, path=f"/v1/fine_tuning/jobs/{job_id}/events")

    with pytest.raises(kopf.TemporaryError) as caught:
        job.tick()
    assert caught.value.delay is not None and caught.value.delay >= 60
    assert job.status.phase != jobstatus.Phase.FAILED
    retrying = job.condition("Reconciled")
    assert retrying is not None and retrying.status == "False"
    assert "422" in retrying.message and job_id in retrying.message
    assert "may still be running" in retrying.message

    run(fake, job, jobstatus.Phase.SUCCEEDED)  # the refusal passed: following resumed
    assert job.condition("Reconciled") is None and fake.jobs_created() == 1


def test_suspend_whose_cancel_is_refused_is_retried_until_cancelled(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    job = Job(fake)
    while not (job.status.remote and job.status.remote.id):
        job.tick()
    job_id = job.status.remote.id
    job.raw["spec"]["suspend"] = True
    job.raw["metadata"]["generation"] = 2
    fake.fail(422, method="POST", path=f"/v1/fine_tuning/jobs/{job_id}/cancel")
    with pytest.raises(kopf.TemporaryError):
        job.tick()
    assert job.status.phase != jobstatus.Phase.FAILED and fake.cancelled == []
    job.tick()
    assert job.status.phase == jobstatus.Phase.CANCELLED and fake.cancelled == [job_id]


# ----------------------------------------------------------------------------- failures


def test_a_failed_job_names_the_providers_reason(cluster: Cluster, fake: FakeOpenAI) -> None:
    fake.fail(401, method="POST", path="/v1/files")
    job = Job(fake)
    run(fake, job, jobstatus.Phase.FAILED)
    ready = job.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "Unauthorized")
    assert "401" in (job.status.message or "")


def test_a_key_with_a_line_break_inside_fails_naming_the_secret_never_the_key(
    cluster: Cluster, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broken = KEY[:20] + "\n" + KEY[20:]  # pasted across two lines
    cluster.secrets["openai"] = secret(**{"api-key": broken})
    job = Job(fake)
    run(fake, job, jobstatus.Phase.FAILED, ticks=3)

    message = job.status.message or ""
    assert "Secret team-a/openai" in message and "'api-key'" in message
    assert "line break" in message
    ready = job.condition("Ready")
    assert ready is not None and ready.reason == "InvalidKey"
    assert fake.requests == [], "nothing is sent with a key the HTTP library would refuse"
    seen = [json.dumps(job.raw["status"]), caplog.text, *(e[2] for e in cluster.events)]
    for text in seen:
        for part in (KEY[:20], KEY[20:], KEY[-4:]):
            assert part not in text


# ----------------------------------------------------------------------------- validation


def test_the_dataset_is_read_once_for_validation_and_once_for_the_upload(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    fake.timing = Timing(2, 2, 10, processing_s=5)  # OpenAI takes a few ticks to process it
    job = Job(fake)
    job.tick()
    assert job.status.estimate is not None and cluster.dataset_reads == 1
    job.tick()  # validated again on the way (nothing uploaded yet), then uploaded
    assert job.status.remote is not None and job.status.remote.training_file
    assert job.status.phase == jobstatus.Phase.VALIDATING and cluster.dataset_reads == 3
    for _ in range(4):  # waiting for OpenAI to process the file: nothing is read again
        fake.advance(1)
        job.tick()
        assert cluster.dataset_reads == 3
    run(fake, job, jobstatus.Phase.SUCCEEDED)
    assert cluster.dataset_reads == 3 and fake.jobs_created() == 1


# ----------------------------------------------------------------------------- backoff


def test_a_lasting_outage_is_retried_less_and_less_often(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    job = Job(fake)
    job.tick()
    fake.fail(503, count=100, retry_after_ms="10")  # the server asks for no real wait
    delays = []
    for retry in range(4):  # kopf counts the failed attempts of the tick in `retry`
        with pytest.raises(kopf.TemporaryError) as caught:
            job.tick(retry=retry)
        delays.append(caught.value.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert job.status.phase == jobstatus.Phase.VALIDATING and fake.jobs_created() == 0
