"""A job's dataset files on OpenAI, with the real ``openai`` client against the fake API: named by
FineTuneJob, role and content, uploaded once, found again by name, and waited for until processed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from fakes.openai_finetune import FakeOpenAI, Timing
from kubetune.api import jobstatus
from kubetune.operator import openai_client
from kubetune.operator import openai_files as uploads

KEY = "sk-kubetune-test-files-Qx9LmN2pR8sVw4Zq"
UID = "0a1b2c3d-0000-4000-8000-0000000000f1"


def jsonl(tag: str) -> bytes:
    line = {"messages": [{"role": "user", "content": tag}, {"role": "assistant", "content": "ok"}]}
    return (json.dumps(line) + "\n").encode() * 10


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(processing_s=5)).serve() as f:
        yield f


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    timeout = httpx.Timeout(5.0)
    with openai_client.make_client(KEY, base_url=fake.base_url, timeout=timeout) as c:
        yield c


def test_the_name_is_decided_by_job_role_and_content() -> None:
    name = uploads.file_name(UID, "training", "ab" * 32)
    assert name == f"kubetune-{UID}-training-{'ab' * 8}.jsonl"
    assert uploads.file_name(UID, "validation", "ab" * 32) != name
    assert uploads.file_name(UID, "training", "cd" * 32) != name


def test_files_are_uploaded_once_and_found_again_by_name(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    first = jobstatus.RemoteJob()
    seen = uploads.ensure(client, UID, first, jsonl("train"), jsonl("valid"))
    assert set(seen) == {first.training_file, first.validation_file}
    again = jobstatus.RemoteJob()  # a status that lost the ids (a crash before the patch)
    assert uploads.ensure(client, UID, again, jsonl("train"), jsonl("valid")).keys() == seen.keys()
    assert (again.training_file, again.validation_file) == (
        first.training_file,
        first.validation_file,
    )
    assert len(fake.files) == 2
    edited = jobstatus.RemoteJob()
    uploads.ensure(client, UID, edited, jsonl("edited"), None)
    assert edited.training_file not in (first.training_file, None)
    assert len(fake.files) == 3


def test_creation_waits_until_openai_has_processed_the_files(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    remote = jobstatus.RemoteJob()
    seen = uploads.ensure(client, UID, remote, jsonl("train"), None)
    assert uploads.waiting(client, remote, seen) == (
        f"OpenAI is processing the training file {remote.training_file} (status uploaded)"
    )
    fake.advance(6)
    assert uploads.waiting(client, remote, seen) is None
