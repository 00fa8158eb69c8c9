"""The fake OpenAI fine-tuning API behaves like the real one where kubetune depends on it.

Checked through the real ``openai`` client: pagination (``after``/``limit``/``has_more``),
the metadata filter, newest-first events, error classes, and the subprocess mode with its
admin endpoints that the cluster tests use.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from fakes.openai_finetune import FakeOpenAI, Timing, run_subprocess  # noqa: E402

KEY = "sk-fake-test-0123456789abcdef"
DATA = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]})
    for i in range(12)
).encode()  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(1, 1, 5)).serve() as f:
        yield f


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as c:
        yield c


def upload(client: openai.OpenAI, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, DATA), purpose="fine-tune").id


def test_jobs_list_filters_by_metadata_and_paginates_newest_first(client: openai.OpenAI) -> None:
    fid = upload(client)
    ids = [
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini-2024-07-18", training_file=fid, metadata={"team": team}
        ).id
        for team in ("a", "b", "a", "a", "b")
    ]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]  # auto-paginates
    team_a = client.fine_tuning.jobs.list(metadata={"team": "a"}, limit=1)
    assert [j.id for j in team_a] == [ids[3], ids[2], ids[0]]
    assert list(client.fine_tuning.jobs.list(metadata={"team": "c"})) == []


def test_a_job_runs_through_its_states_with_metrics_events(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18", training_file=upload(client)
    )
    seen = [job.status]
    for _ in range(10):
        fake.advance(1)
        seen.append(client.fine_tuning.jobs.retrieve(job.id).status)
    assert seen[:3] == ["validating_files", "queued", "running"] and seen[-1] == "succeeded"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:")
    assert done.trained_tokens and done.finished_at and done.result_files
    assert done.hyperparameters.n_epochs == 9  # "auto": 3, raised so 12 examples make >= 100

    newest = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert newest.data[0].message == "The job has successfully completed" and newest.has_more
    older = client.fine_tuning.jobs.list_events(job.id, limit=2, after=newest.data[-1].id)
    metrics = older.data[0]
    assert metrics.type == "metrics" and isinstance(metrics.data, dict)
    assert metrics.data["step"] == metrics.data["total_steps"] and "train_loss" in metrics.data
    every = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert every[-1].message.startswith("Validating training file")
    assert [e.created_at for e in every] == sorted((e.created_at for e in every), reverse=True)


def test_errors_have_openais_status_codes_and_shapes(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="gpt-2", training_file=upload(client))
    assert (bad.value.code, bad.value.param) == ("model_not_available", "model")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("train.txt", DATA), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18", training_file=upload(client)
    )
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    fake.fail(429, retry_after="3")
    with pytest.raises(openai.RateLimitError) as limited:
        client.files.list()
    assert limited.value.response.headers["retry-after"] == "3"
    wrong = openai.OpenAI(api_key="sk-wrong-000000000000", base_url=fake.base_url)
    with wrong, pytest.raises(openai.AuthenticationError) as denied:
        wrong.files.list()
    assert denied.value.code == "invalid_api_key"


def test_requests_record_organization_and_project_and_jobs_their_organization(
    fake: FakeOpenAI,
) -> None:
    with openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0,
                       organization="org-abc", project="proj_xyz") as scoped:  # fmt: skip
        job = scoped.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18",
                                             training_file=upload(scoped))  # fmt: skip
    assert job.organization_id == "org-abc"
    assert [(r["organization"], r["project"]) for r in fake.requests] == [
        ("org-abc", "proj_xyz"), ("org-abc", "proj_xyz")
    ]  # fmt: skip
    with openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as plain:
        plain.files.list()
    assert (fake.requests[-1]["organization"], fake.requests[-1]["project"]) == (None, None)


def test_a_held_request_waits_until_released(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    held = fake.hold("POST", "/v1/files")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (upload(client), done.set()), daemon=True)
    worker.start()
    assert held.arrived.wait(10)
    assert client.files.list().data == [] and not done.is_set()  # others are answered
    held.release()
    worker.join(10)
    assert done.is_set() and len(client.files.list().data) == 1


def test_files_are_listed_by_purpose_and_deleted(client: openai.OpenAI) -> None:
    fid = upload(client)
    client.files.create(file=("notes.txt", b"x"), purpose="assistants")
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [fid]
    assert client.files.content(fid).read() == DATA
    assert client.files.delete(fid).deleted
    assert list(client.files.list(purpose="fine-tune")) == []


def test_subprocess_mode_with_admin_endpoints() -> None:
    with run_subprocess(api_keys=(KEY,), timing=Timing(0.2, 0.2, 0.5)) as admin:
        assert admin.base_url.startswith("http://127.0.0.1:") and admin.base_url.endswith("/v1")
        with openai.OpenAI(api_key=KEY, base_url=admin.base_url, max_retries=0) as c:
            admin.fail(500, path="/v1/files")
            with pytest.raises(openai.InternalServerError):
                c.files.list()
            job = c.fine_tuning.jobs.create(
                model="gpt-4o-mini-2024-07-18",
                training_file=upload(c),
                metadata={"kubetune.io/uid": "u-1"},
            )
            admin.advance(5)
            assert c.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        assert admin.state()["jobs_created"] == 1
        assert [j["id"] for j in admin.jobs_for("u-1")] == [job.id] and admin.jobs_for("u-2") == []
        assert admin.leaks(KEY) == []
        assert len(admin.requests()) == 4
