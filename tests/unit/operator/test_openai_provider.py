"""The OpenAI provider, driven with the real ``openai`` client against the fake API (in-thread).

Each test runs the provider's ``step`` the way the handler's timer does, advancing the fake's
clock between ticks, and checks what a user would see in ``status`` and Events, and what the
fake saw: how many paid jobs exist, which were cancelled, which files remain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest
import yaml

from fakes.openai_finetune import FakeOpenAI, Timing, run_subprocess
from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.operator import manifests, openai_client
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_provider as provider
from kubetune.operator import openai_status as ostatus

ROOT = Path(__file__).resolve().parents[3]

KEY = "sk-kubetune-test-7f3Qx9LmN2pR8sVw4Zq9W"
WRONG_KEY = "sk-kubetune-wrong-Hh5Tt6Yy7Uu8Ii9Oo0Pk3J"
OWNER = manifests.Owner(
    name="daoyan", namespace="team-a", uid="6f1c2d3e-0000-4000-8000-00000000abcd"
)
PRICES = {"gpt-4o-mini": 3.0, "gpt-4o": 25.0, "gpt-4.1-mini": 5.0}
MODEL = "gpt-4o-mini-2024-07-18"


def chat_jsonl(n: int, tag: str = "t") -> bytes:
    rows = [
        {"messages": [
            {"role": "system", "content": "You answer like a Daoist sage."},
            {"role": "user", "content": f"question {tag} {i}: how do I handle stress?"},
            {"role": "assistant", "content": f"Be like water {i}; it yields and overcomes."},
        ]}
        for i in range(n)
    ]  # fmt: skip
    return "\n".join(json.dumps(r) for r in rows).encode()


TRAINING = chat_jsonl(20)
VALIDATION = chat_jsonl(10, "v")


def make_spec(suspend: bool = False, **openai_fields: Any) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate({
        "provider": "openai",
        "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
        "suspend": suspend,
        "openai": {"model": MODEL, "apiKeySecretRef": {"name": "openai"}, **openai_fields},
    })  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(2, 2, 10)).serve() as f:
        yield f


def client_for(fake: FakeOpenAI, key: str = KEY) -> openai.OpenAI:
    return openai_client.make_client(key, base_url=fake.base_url, timeout=httpx.Timeout(5.0))


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with client_for(fake) as c:
        yield c


def tick(
    client: openai.OpenAI,
    spec: ftj.FineTuneJobSpec,
    status: jobstatus.FineTuneJobStatus,
    **kw: Any,
) -> provider.StepResult:
    kw.setdefault("training", TRAINING)
    return provider.step(client, spec, OWNER, status, prices=PRICES, generation=1, **kw)


def drive(
    fake: FakeOpenAI,
    client: openai.OpenAI,
    spec: ftj.FineTuneJobSpec,
    status: jobstatus.FineTuneJobStatus | None = None,
    *,
    until: jobstatus.Phase | None = None,
    max_ticks: int = 60,
    **kw: Any,
) -> tuple[jobstatus.FineTuneJobStatus, list[provider.StepResult], list[errors.ProviderError]]:
    """Ticks like the kopf timer (temporary errors are retried next tick) until done."""
    status = status or jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.VALIDATING)
    results: list[provider.StepResult] = []
    retried: list[errors.ProviderError] = []
    for _ in range(max_ticks):
        try:
            res = tick(client, spec, status, **kw)
        except errors.TemporaryProviderError as exc:
            retried.append(exc)
        else:
            results.append(res)
            status = res.status
            if res.finished or (until is not None and status.phase == until):
                return status, results, retried
        fake.advance(1)
    raise AssertionError(f"not finished after {max_ticks} ticks: {status.phase}")


def condition(status: jobstatus.FineTuneJobStatus, type_: str) -> jobstatus.Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


# ----------------------------------------------------------------------------- success


def test_success_sets_fine_tuned_model_cost_progress_and_endpoint(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status, results, _ = drive(fake, client, make_spec(suffix="daoyan", baseURL=fake.base_url))

    phases = [r.status.phase for r in results]
    assert phases[0] == jobstatus.Phase.VALIDATING
    assert jobstatus.Phase.QUEUED in phases and jobstatus.Phase.RUNNING in phases
    assert status.phase == jobstatus.Phase.SUCCEEDED
    assert fake.jobs_created() == 1
    job = next(iter(fake.jobs.values()))
    assert status.fine_tuned_model == job["fine_tuned_model"]
    assert (
        status.fine_tuned_model.startswith(f"ft:{MODEL}:") and ":daoyan:" in job["fine_tuned_model"]
    )
    assert status.trained_tokens == job["trained_tokens"] > 0
    assert status.cost_usd == round(job["trained_tokens"] * 3.0 / 1_000_000, 4)
    assert status.endpoint == jobstatus.EndpointStatus(
        base_url=fake.base_url, model=job["fine_tuned_model"], config_map="daoyan-endpoint"
    )
    assert status.remote is not None
    assert (status.remote.id, status.remote.status) == (job["id"], "succeeded")
    assert status.remote.training_file == job["training_file"]
    assert status.remote.last_event_id == fake.events(job["id"])[0]["id"]
    total = fake._plans[job["id"]]["total_steps"]
    assert status.progress is not None
    assert (status.progress.step, status.progress.total_steps) == (total, total)
    assert status.progress.summary == f"{total}/{total} (100%)"
    assert status.progress.train_loss is not None
    assert status.start_time and status.completion_time
    ready = condition(status, "Ready")
    assert ready is not None and ready.status == "True"
    assert job["metadata"] == {
        "kubetune.io/uid": OWNER.uid,
        "kubetune.io/namespace": "team-a",
        "kubetune.io/name": "daoyan",
    }
    messages = [e.message for r in results for e in r.events]
    assert any(m.startswith("created OpenAI fine-tuning job") for m in messages)
    assert any("New fine-tuned model created" in m for m in messages)
    assert all(len([e for e in r.events if e.reason == "OpenAI"]) <= 10 for r in results)


def test_running_job_reports_progress_loss_and_eta(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    status, _, _ = drive(fake, client, make_spec(), until=jobstatus.Phase.RUNNING)
    fake.advance(3)
    res = tick(client, make_spec(), status)

    p = res.status.progress
    assert res.status.phase == jobstatus.Phase.RUNNING and not res.finished
    assert p is not None and p.total_steps and 0 < p.step < p.total_steps
    assert p.train_loss is not None and p.eta is not None and p.epoch is not None
    assert res.status.remote is not None and res.status.remote.estimated_finish == p.eta
    assert res.status.message == f"training at OpenAI: step {p.summary}"
    assert res.patch["progress"] == p.to_wire()


def test_validation_file_is_uploaded_and_gives_valid_loss(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status, _, _ = drive(fake, client, make_spec(), validation=VALIDATION)

    job = next(iter(fake.jobs.values()))
    assert status.remote is not None and status.remote.validation_file == job["validation_file"]
    assert fake.contents[job["validation_file"]] == VALIDATION
    assert status.progress is not None and status.progress.valid_loss is not None


def test_create_request_carries_method_hyperparameters_suffix_and_seed(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    spec = make_spec(
        method="dpo", suffix="dao", seed=7,
        hyperparameters={"nEpochs": 2, "batchSize": 4, "learningRateMultiplier": "0.5",
                         "beta": "0.2"},
    )  # fmt: skip
    tick(client, spec, jobstatus.FineTuneJobStatus())

    job = next(iter(fake.jobs.values()))
    assert job["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                    "learning_rate_multiplier": 0.5, "beta": 0.2}},
    }  # fmt: skip
    assert (job["suffix"], job["seed"], job["model"]) == ("dao", 7, MODEL)


def test_supervised_auto_hyperparameters_are_sent_as_auto(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    created = json.loads(
        next(
            r
            for r in fake.requests
            if r["path"] == "/v1/fine_tuning/jobs" and r["method"] == "POST"
        )["body"]
    )
    assert created["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": "auto",
                                           "learning_rate_multiplier": "auto"}},
    }  # fmt: skip
    assert "suffix" not in created and "seed" not in created and "validation_file" not in created


# ----------------------------------------------------------------------------- idempotency


def test_crash_after_create_adopts_the_job_instead_of_creating_another(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    before = jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.VALIDATING)
    first = tick(client, make_spec(), before)
    # The operator died before patching status: the next tick sees the old status again.
    second = tick(client, make_spec(), before)
    third = tick(client, make_spec(), before)

    assert fake.jobs_created() == 1
    assert len([f for f in fake.files.values() if f["purpose"] == "fine-tune"]) == 1
    assert first.status.remote == second.status.remote == third.status.remote
    assert [e.reason for e in second.events if e.reason == "Created"] == []


def test_lost_create_answer_is_not_retried_and_the_job_is_adopted(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(500, method="POST", path="/v1/fine_tuning/jobs", after_handling=True)
    with pytest.raises(errors.TemporaryProviderError):
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert fake.jobs_created() == 1

    status, _, _ = drive(fake, client, make_spec())
    assert fake.jobs_created() == 1
    assert status.phase == jobstatus.Phase.SUCCEEDED
    assert status.remote is not None and status.remote.id == next(iter(fake.jobs))


def test_changed_dataset_before_creation_uploads_a_new_file(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(500, method="POST", path="/v1/fine_tuning/jobs", count=10)
    for data in (TRAINING, TRAINING, chat_jsonl(15)):
        with pytest.raises(errors.TemporaryProviderError):
            tick(client, make_spec(), jobstatus.FineTuneJobStatus(), training=data)
    names = sorted(f["filename"] for f in fake.files.values())
    assert len(names) == 2 and all(n.startswith(f"kubetune-{OWNER.uid}-training-") for n in names)


def test_datasets_are_not_read_once_files_are_recorded(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status = tick(client, make_spec(), jobstatus.FineTuneJobStatus()).status

    def must_not_read() -> contextlib.AbstractContextManager[IO[bytes]]:
        raise AssertionError("dataset read after the upload was recorded")

    res = tick(client, make_spec(), status, training=must_not_read)
    assert res.status.remote == status.remote


def test_a_large_dataset_file_is_hashed_and_uploaded_in_chunks_never_whole(
    tmp_path: Path,
) -> None:
    """The operator's memory limit (512Mi) is OpenAI's file size limit: a dataset must not be
    held in memory to be named or sent. The fake runs in its own process, so what tracemalloc
    sees is the client's side only."""
    block = chat_jsonl(200) + b"\n"
    path = tmp_path / "train.jsonl"
    with path.open("wb") as f:
        for _ in range(24 * 2**20 // len(block) + 1):
            f.write(block)
    size = path.stat().st_size
    with run_subprocess(api_keys=(KEY,), timing=Timing(2, 2, 10, processing_s=0)) as admin:
        with openai_client.make_client(KEY, base_url=admin.base_url) as c:
            c.files.create(file=("warm-up.jsonl", TRAINING), purpose="fine-tune")  # imports
            tracemalloc.start()
            try:
                res = tick(
                    c, make_spec(), jobstatus.FineTuneJobStatus(), training=lambda: path.open("rb")
                )
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        (uploaded,) = admin.files_for(OWNER.uid)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert res.status.remote is not None and res.status.remote.training_file == uploaded["id"]
    assert uploaded["bytes"] == size and uploaded["filename"].endswith(f"-{digest[:16]}.jsonl")
    assert peak < size / 8, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB upload"


# ----------------------------------------------------------------------------- errors


def test_rate_limits_and_server_errors_are_retried_to_success(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(429, count=2, retry_after_ms="50", path="/v1/files", method="POST")
    fake.fail(500, count=1, path="/v1/fine_tuning/jobs", method="GET")
    fake.fail(503, count=2, path="/v1/fine_tuning/jobs/", method="GET")

    status, _, _ = drive(fake, client, make_spec())

    assert status.phase == jobstatus.Phase.SUCCEEDED
    assert fake.jobs_created() == 1
    uploads = [r for r in fake.requests if r["method"] == "POST" and r["path"] == "/v1/files"]
    assert len(uploads) == 3  # two 429s, each retried on the next tick, then the upload
    assert len([f for f in fake.files.values() if f["purpose"] == "fine-tune"]) == 1
    assert fake.failures == []


def test_retries_exhausted_become_a_temporary_error_with_the_servers_delay(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(429, count=5, retry_after="90")
    started = time.monotonic()
    with pytest.raises(errors.TemporaryProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert time.monotonic() - started < 3, "a long Retry-After must not be slept in-process"
    assert caught.value.delay == 90 and caught.value.reason == "RateLimited"
    assert len(fake.requests) == 1

    fake.failures.clear()
    fake.fail(500, count=5, retry_after_ms="10")
    with pytest.raises(errors.TemporaryProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert caught.value.reason == "ServerError" and caught.value.delay == 1.0
    assert len(fake.requests) == 1 + 1 + openai_client.MAX_RETRIES


def test_unreachable_api_is_temporary() -> None:
    unreachable = openai_client.make_client(KEY, base_url="http://127.0.0.1:9/v1", max_retries=0)
    with unreachable as c, pytest.raises(errors.TemporaryProviderError) as caught:
        tick(c, make_spec(), jobstatus.FineTuneJobStatus())
    assert caught.value.reason == "ConnectionError"


def test_wrong_key_fails_fast_and_permanently(fake: FakeOpenAI) -> None:
    started = time.monotonic()
    with client_for(fake, WRONG_KEY) as c, pytest.raises(errors.AuthProviderError) as caught:
        tick(c, make_spec(), jobstatus.FineTuneJobStatus())
    assert time.monotonic() - started < 2
    assert len(fake.requests) == 1, "401 must not be retried"
    assert "401" in str(caught.value) and "invalid_api_key" in str(caught.value)
    assert caught.value.reason == "Unauthorized"
    assert WRONG_KEY not in str(caught.value) and WRONG_KEY[-4:] not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "code", "reason", "fix"),
    [
        (401, None, "Unauthorized", "put a valid API key"),
        (403, None, "Forbidden", "access to that job"),
        (404, None, "NotFound", "another organization or project"),
        (429, "insufficient_quota", "InsufficientQuota", "Billing"),
    ],
)
def test_account_errors_while_following_wait_long_and_following_resumes(
    fake: FakeOpenAI, client: openai.OpenAI, status: int, code: str | None, reason: str, fix: str
) -> None:
    first = tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert first.status.remote is not None and first.status.remote.id
    job_id = first.status.remote.id
    fake.fail(status, code=code, path=f"/v1/fine_tuning/jobs/{job_id}")
    with pytest.raises(errors.TemporaryProviderError) as caught:
        tick(client, make_spec(), first.status)

    assert caught.value.reason == reason and caught.value.delay == 300
    text = str(caught.value)
    assert job_id in text and "may still be running" in text and fix in text
    assert "Secret team-a/openai" in text or reason == "InsufficientQuota"
    # The key is fixed (the injected failure is spent): following resumes where it stopped.
    final, _, _ = drive(fake, client, make_spec(), first.status)
    assert final.phase == jobstatus.Phase.SUCCEEDED and fake.jobs_created() == 1


@pytest.mark.parametrize(("status", "reason"), [(401, "Unauthorized"), (403, "Forbidden")])
def test_auth_errors_before_anything_was_created_stay_permanent(
    fake: FakeOpenAI, client: openai.OpenAI, status: int, reason: str
) -> None:
    fake.fail(status, method="POST", path="/v1/files")
    with pytest.raises(errors.AuthProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert caught.value.reason == reason and fake.jobs_created() == 0


def test_insufficient_quota_is_permanent_not_a_rate_limit(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(429, code="insufficient_quota", count=5, retry_after="1")
    with pytest.raises(errors.PermanentProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())

    assert isinstance(caught.value, errors.QuotaProviderError)
    assert caught.value.reason == "InsufficientQuota"
    text = str(caught.value)
    assert "429 (insufficient_quota)" in text and "no quota left" in text and "Billing" in text
    assert len(fake.requests) == 1, "no quota is not retried, neither by the client nor later"
    assert fake.jobs_created() == 0


def test_lost_upload_answer_is_not_retried_and_the_file_is_found_by_name(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(500, method="POST", path="/v1/files", after_handling=True)
    with pytest.raises(errors.TemporaryProviderError):
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    uploads = [r for r in fake.requests if r["method"] == "POST" and r["path"] == "/v1/files"]
    assert len(uploads) == 1

    status, _, _ = drive(fake, client, make_spec())
    training = [f for f in fake.files.values() if "-training-" in f["filename"]]
    assert len(training) == 1 and status.phase == jobstatus.Phase.SUCCEEDED
    assert status.remote is not None and status.remote.training_file == training[0]["id"]


def test_bad_request_is_permanent_with_the_servers_message(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    spec = make_spec(model="gpt-2-mini")
    with pytest.raises(errors.PermanentProviderError) as caught:
        tick(client, spec, jobstatus.FineTuneJobStatus())
    text = str(caught.value)
    assert "400 (model_not_available)" in text and "gpt-2-mini" in text and "param: model" in text
    assert caught.value.reason == "BadRequest" and fake.jobs_created() == 0


def test_remote_job_that_fails_validation_reports_code_message_and_param(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status, _, _ = drive(fake, client, make_spec(), training=chat_jsonl(3))

    assert status.phase == jobstatus.Phase.FAILED
    assert status.message is not None
    assert "invalid_training_file" in status.message
    assert "must have at least 10 examples" in status.message
    assert "(param: training_file)" in status.message
    ready = condition(status, "Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "RemoteJobFailed")
    assert status.completion_time and status.fine_tuned_model is None and status.cost_usd is None


def test_remote_job_that_fails_mid_run_keeps_its_progress(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail_next_job("server_error", "Fine-tuning job failed due to an internal error.", None, 3)
    status, _, _ = drive(fake, client, make_spec())

    assert status.phase == jobstatus.Phase.FAILED
    assert status.message == (
        "the OpenAI job failed: server_error: Fine-tuning job failed due to an internal error."
    )
    assert status.progress is not None and status.progress.step == 3


# ----------------------------------------------------------------------------- file processing


def test_openai_refuses_a_job_on_a_file_it_has_not_processed_yet(fake: FakeOpenAI) -> None:
    """What the provider guards against, as the fake models it (through the raw client)."""
    fake.timing = Timing(2, 2, 10, processing_s=5)
    with openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as raw:
        upload = raw.files.create(file=("t.jsonl", TRAINING), purpose="fine-tune")
        assert upload.status == "uploaded"
        with pytest.raises(openai.BadRequestError, match="not ready"):
            raw.fine_tuning.jobs.create(model=MODEL, training_file=upload.id)
        fake.advance(5)
        assert raw.files.retrieve(upload.id).status == "processed"
        assert raw.fine_tuning.jobs.create(model=MODEL, training_file=upload.id).id


def test_job_is_created_only_once_openai_has_processed_the_files(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.timing = Timing(2, 2, 10, processing_s=5)
    first = tick(client, make_spec(), jobstatus.FineTuneJobStatus(), validation=VALIDATION)

    assert fake.jobs_created() == 0 and not first.finished
    assert not [
        r for r in fake.requests if r["path"] == "/v1/fine_tuning/jobs" and r["method"] == "POST"
    ]
    remote = first.status.remote
    assert remote is not None and remote.id is None
    assert remote.training_file and remote.validation_file
    assert "OpenAI is processing the training file" in (first.status.message or "")
    assert first.patch["message"] == first.status.message

    def must_not_read() -> bytes:
        raise AssertionError("dataset read again while waiting for processing")

    second = tick(client, make_spec(), first.status, training=must_not_read,
                  validation=must_not_read)  # fmt: skip
    assert fake.jobs_created() == 0 and second.patch == {}
    fake.advance(5)
    third = tick(client, make_spec(), second.status, training=must_not_read,
                 validation=must_not_read)  # fmt: skip
    assert fake.jobs_created() == 1
    job = next(iter(fake.jobs.values()))
    assert (job["training_file"], job["validation_file"]) == (
        remote.training_file,
        remote.validation_file,
    )
    assert third.status.remote is not None and third.status.remote.id == job["id"]
    assert len(fake.files) == 2


def test_a_file_openai_could_not_process_fails_the_job_with_its_details(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail_next_file('Invalid file format. Line 3, key "messages": missing')
    with pytest.raises(errors.PermanentProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())

    assert caught.value.reason == "FileProcessingFailed"
    assert "could not process the uploaded training file file-" in str(caught.value)
    assert 'Line 3, key "messages": missing' in str(caught.value)
    assert fake.jobs_created() == 0


def test_a_recorded_file_that_is_gone_is_uploaded_again(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.timing = Timing(2, 2, 10, processing_s=5)
    first = tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert first.status.remote is not None and first.status.remote.training_file
    client.files.delete(first.status.remote.training_file)

    second = tick(client, make_spec(), first.status)
    assert second.status.remote is not None and second.status.remote.training_file is None
    assert "gone" in (second.status.message or "")
    fake.advance(5)
    status, _, _ = drive(fake, client, make_spec(), second.status)
    assert status.phase == jobstatus.Phase.SUCCEEDED and fake.jobs_created() == 1


# ----------------------------------------------------------------------------- cancel, cleanup


def test_suspend_cancels_a_running_job(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    status, _, _ = drive(fake, client, make_spec(), until=jobstatus.Phase.RUNNING)
    res = tick(client, make_spec(suspend=True), status)

    assert res.status.phase == jobstatus.Phase.CANCELLED and res.finished
    assert fake.cancelled == [next(iter(fake.jobs))]
    assert "Cancelled" in [e.reason for e in res.events]
    assert res.status.completion_time is not None
    again = tick(client, make_spec(suspend=True), res.status)
    assert again.finished and again.patch == {} and fake.cancelled == [next(iter(fake.jobs))]


def test_suspend_before_creation_uploads_and_creates_nothing(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    res = tick(client, make_spec(suspend=True), jobstatus.FineTuneJobStatus())

    assert res.status.phase == jobstatus.Phase.QUEUED and not res.finished
    assert "suspended" in (res.status.message or "")
    assert fake.jobs_created() == 0 and fake.files == {}


def test_job_cancelled_elsewhere_ends_cancelled(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    status, _, _ = drive(fake, client, make_spec(), until=jobstatus.Phase.QUEUED)
    client.fine_tuning.jobs.cancel(next(iter(fake.jobs)))
    res = tick(client, make_spec(), status)
    assert res.status.phase == jobstatus.Phase.CANCELLED and res.finished


@pytest.mark.parametrize("keep_files", [False, True])
def test_cleanup_cancels_the_job_and_deletes_files_unless_kept(
    fake: FakeOpenAI, client: openai.OpenAI, keep_files: bool
) -> None:
    spec = make_spec(keepFiles=keep_files)
    status, _, _ = drive(fake, client, spec, until=jobstatus.Phase.RUNNING, validation=VALIDATION)
    uploaded = (
        {status.remote.training_file, status.remote.validation_file} if status.remote else set()
    )

    events = provider.cleanup(client, spec, OWNER, status)

    assert fake.cancelled == [next(iter(fake.jobs))]
    remaining = {f["id"] for f in fake.files.values() if f["purpose"] == "fine-tune"}
    assert remaining == (uploaded if keep_files else set())
    reasons = [e.reason for e in events]
    assert reasons.count("Cancelled") == 1
    assert reasons.count("FileDeleted") == (0 if keep_files else 2)


def test_cleanup_finds_a_job_the_status_never_recorded(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    tick(client, make_spec(), jobstatus.FineTuneJobStatus())  # its status patch was lost

    provider.cleanup(client, make_spec(), OWNER, jobstatus.FineTuneJobStatus())

    assert fake.cancelled == [next(iter(fake.jobs))]
    assert [f for f in fake.files.values() if f["purpose"] == "fine-tune"] == []


def test_cleanup_of_a_finished_job_cancels_nothing_and_tolerates_gone_files(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status, _, _ = drive(fake, client, make_spec())
    assert status.remote is not None and status.remote.training_file is not None
    client.files.delete(status.remote.training_file)

    provider.cleanup(client, make_spec(), OWNER, status)
    assert fake.cancelled == []
    assert not any(r["path"].endswith("/cancel") for r in fake.requests)


# ----------------------------------------------------------------------------- unknown status


def test_unknown_remote_status_is_kept_as_a_condition(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    status, _, _ = drive(fake, client, make_spec(), until=jobstatus.Phase.RUNNING)
    job_id = next(iter(fake.jobs))
    client.fine_tuning.jobs.pause(job_id)

    paused = tick(client, make_spec(), status)
    again = tick(client, make_spec(), paused.status)

    assert paused.status.phase == jobstatus.Phase.RUNNING and not paused.finished
    assert paused.status.remote is not None and paused.status.remote.status == "paused"
    cond = condition(paused.status, ostatus.UNKNOWN_STATUS_CONDITION)
    assert cond is not None and cond.status == "False" and "'paused'" in cond.message
    assert [e.reason for e in paused.events].count("UnknownRemoteStatus") == 1
    assert "UnknownRemoteStatus" not in [e.reason for e in again.events]

    client.fine_tuning.jobs.resume(job_id)
    resumed = tick(client, make_spec(), again.status)
    assert condition(resumed.status, ostatus.UNKNOWN_STATUS_CONDITION) is None
    final, _, _ = drive(fake, client, make_spec(), resumed.status)
    assert final.phase == jobstatus.Phase.SUCCEEDED


def test_forced_unknown_status_before_running_keeps_the_phase(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    first = tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    fake.force_status(next(iter(fake.jobs)), "migrating")
    res = tick(client, make_spec(), first.status)
    assert res.status.phase == jobstatus.Phase.VALIDATING
    assert "'migrating'" in (res.status.message or "")


# ----------------------------------------------------------------------------- secrets


def test_the_key_never_leaks(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    """Status, Events, exceptions, tracebacks and log records carry no key, full or masked."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    def record_error(exc: BaseException) -> None:
        seen.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])

    with client_for(fake) as c:
        fake.fail(429, count=1, retry_after_ms="10")
        fake.fail(500, count=1, retry_after_ms="10")
        status, results, retried = drive(fake, c, make_spec(), validation=VALIDATION)
        for err in retried:
            record_error(err)
        seen += [json.dumps(r.status.to_wire()) + json.dumps(r.patch) for r in results]
        seen += [e.message for r in results for e in r.events]
        seen += [e.message for e in provider.cleanup(c, make_spec(), OWNER, status)]
    for key in (WRONG_KEY, KEY):  # the wrong key: OpenAI echoes it, masked, in its 401 body
        with client_for(fake, key) as c:
            fake.fail(401)
            try:
                tick(c, make_spec(), jobstatus.FineTuneJobStatus())
            except errors.ProviderError as exc:
                record_error(exc)
    seen += [r.getMessage() for r in caplog.records]
    seen += [caplog.text]

    assert len(seen) > 20
    for text in seen:
        for key in (KEY, WRONG_KEY):
            assert key not in text and key[-4:] not in text and key[7:15] not in text
    assert fake.leaks(KEY) == [], "the key went somewhere besides the Authorization header"


def test_redact_removes_secrets_keys_and_bearer_tokens() -> None:
    text = f"key {KEY} masked sk-kube*********Zq9W header Bearer abc.def"
    out = errors.redact(text, [KEY])
    assert KEY not in out and "Zq9W" not in out and "abc.def" not in out


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # 07:28:00 that day
    assert errors.retry_after(httpx.Headers(headers), now=now) == expected


def test_lasting_outages_back_off_up_to_a_cap() -> None:
    def temporary(delay: float, backoff: bool = True) -> errors.TemporaryProviderError:
        return errors.TemporaryProviderError(
            "x", reason="ServerError", delay=delay, backoff=backoff
        )

    server = temporary(errors.DEFAULT_DELAY_SERVER)
    delays = [errors.retry_delay(server, retry) for retry in range(8)]
    assert delays[:4] == [15.0, 30.0, 60.0, 120.0]
    assert delays[-1] == errors.MAX_BACKOFF_DELAY and delays == sorted(delays)
    assert errors.retry_delay(temporary(3600.0), 5) == 3600.0, "a long Retry-After is kept"
    assert errors.retry_delay(temporary(300.0, backoff=False), 9) == 300.0
    assert errors.retry_delay(server, 10_000) == errors.MAX_BACKOFF_DELAY


def test_classified_outages_back_off_and_waits_chosen_on_purpose_do_not(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    fake.fail(503, count=3)
    with pytest.raises(errors.TemporaryProviderError) as caught:
        tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert caught.value.backoff and errors.retry_delay(caught.value, 3) > caught.value.delay
    first = tick(client, make_spec(), jobstatus.FineTuneJobStatus())
    assert first.status.remote is not None and first.status.remote.id
    fake.fail(401, path=f"/v1/fine_tuning/jobs/{first.status.remote.id}")
    with pytest.raises(errors.TemporaryProviderError) as waiting:
        tick(client, make_spec(), first.status)
    assert errors.retry_delay(waiting.value, 5) == errors.DELAY_WHILE_FOLLOWING


def test_price_uses_the_longest_model_prefix() -> None:
    assert ostatus.price_per_million("gpt-4o-mini-2024-07-18", PRICES) == 3.0
    assert ostatus.price_per_million("gpt-4o-2024-08-06", PRICES) == 25.0
    assert ostatus.price_per_million("davinci-002", PRICES) is None


def test_unknown_price_leaves_cost_unset_with_a_warning(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    spec = make_spec(model="gpt-4.1-nano-2025-04-14")
    status, results, _ = drive(fake, client, spec)
    assert status.phase == jobstatus.Phase.SUCCEEDED and status.cost_usd is None
    assert "NoPrice" in [e.reason for r in results for e in r.events]


# ----------------------------------------------------------------------------- examples


def test_openai_example_and_its_secret_parse() -> None:
    job = yaml.safe_load((ROOT / "examples" / "openai-daoyan.yaml").read_text())
    secret = yaml.safe_load((ROOT / "examples" / "openai-secret.yaml").read_text())

    spec = ftj.FineTuneJobSpec.model_validate(job["spec"])
    assert spec.provider == ftj.Provider.OPENAI and spec.openai is not None
    assert spec.openai.model == MODEL
    ref = spec.openai.api_key_secret_ref
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", ref.name)
    assert ref.key in secret["stringData"]
    assert secret["metadata"]["namespace"] == job["metadata"]["namespace"]
    labels = secret["metadata"].get("labels") or {}
    assert labels.get("kubetune.io/credentials") == "openai", "kubetune uses only marked Secrets"
    assert spec.dataset.config_map is not None
