"""The Hub's refusals of a base model become one clear, permanent error naming what to change.

Through the real transformers and huggingface_hub code against the fake Hub
(``tests/fakes/hf_hub.py``), as a trainer pod loads ``spec.model.id`` with ``HF_TOKEN`` from
``spec.model.tokenSecretRef``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.hf_hub import FakeHub, fresh_client, use_endpoint
from kubetune import hub
from kubetune.api.jobconfig import TrainerConfig
from kubetune.trainer import modelload
from support.net import free_port

GRANTED = "hf_granted_0123456789abcdefABCDEF"
OTHER = "hf_other_0123456789abcdefABCDEFGH"
GATED, OPEN = "meta-llama/demo-tiny", "acme/demo-tiny"


@pytest.fixture
def served(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    fresh_client(monkeypatch, tmp_path / "home")
    fake = FakeHub(
        {GATED: demo_model_dir, OPEN: demo_model_dir},
        tokens={"granted": GRANTED, "other": OTHER},
        gated={GATED: {"granted"}},
    )
    with fake.serve() as running, use_endpoint(running.endpoint):
        yield running


def config(model: str, tmp_path: Path, revision: str | None = None) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": "j", "namespace": "team", "uid": "u1"},
            "model": {"idOrPath": model, "revision": revision, "display": model},
            "dataset": {"path": "/d.jsonl"},
            "outputDir": str(tmp_path / "out"),
        }
    )


def refusal(model: str, tmp_path: Path, revision: str | None = None) -> str:
    with pytest.raises(hub.ModelAccessError) as refused:
        modelload.load_tokenizer(config(model, tmp_path, revision))
    return str(refused.value)


def test_a_gated_model_without_a_token_names_the_field_to_set(
    served: FakeHub, tmp_path: Path
) -> None:
    message = refusal(GATED, tmp_path)
    assert message == (
        f"model {GATED} on {served.endpoint}: the model is gated and the job gave no token; put "
        "a token of an account that was granted access in a Secret and name it in "
        "spec.model.tokenSecretRef"
    )


def test_each_refusal_with_a_token_says_its_own_cause_and_never_the_token(
    served: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", OTHER)
    not_granted = refusal(GATED, tmp_path)
    assert "has not been granted access" in not_granted
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_0123456789abcdefABCDEF")
    rejected = refusal(GATED, tmp_path)
    assert rejected.endswith(
        "the Hub rejected the token in spec.model.tokenSecretRef (invalid or expired)"
    )
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert refusal("acme/missing", tmp_path).endswith("no such model, or no access to it")
    assert refusal(GATED, tmp_path, revision="v9").endswith(
        "it has no revision 'v9' (spec.model.revision)"
    )
    for message in (not_granted, rejected):
        assert "hf_" not in message
    # With the granted token it loads: the same tokenizer as the folder it was served from.
    tokenizer = modelload.load_tokenizer(config(GATED, tmp_path))
    assert tokenizer.get_vocab() and tokenizer.is_fast
    assert {r.user for r in served.requests if r.route == "resolve" and r.status == 200} == {
        "granted"
    }
    assert not served.unexpected


def test_an_unknown_public_model_hints_at_a_token_and_other_errors_pass_through(
    served: FakeHub, tmp_path: Path
) -> None:
    assert refusal("acme/missing", tmp_path).endswith(
        "no such model, or no access to it; a private model needs a token "
        "(spec.model.tokenSecretRef)"
    )
    modelload.load_tokenizer(config(OPEN, tmp_path))  # an open model needs no token
    # Not a refusal: a passing failure the Job retries.
    assert hub.refusal(OSError("No space left on device"), OPEN, None) is None


def test_a_cached_gated_model_is_refused_to_a_job_without_access(
    served: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A namespace's model cache is shared: a job with access fills it, and the next job is
    still asked for its own (huggingface_hub alone would serve the cached files)."""
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    modelload.load_tokenizer(config(GATED, tmp_path))
    monkeypatch.delenv("HF_TOKEN")
    assert "the job gave no token" in refusal(GATED, tmp_path)
    monkeypatch.setenv("HF_TOKEN", OTHER)
    assert "has not been granted access" in refusal(GATED, tmp_path)
    # A Hub that cannot be reached refuses nothing: the cache serves, with a warning.
    with use_endpoint(f"http://127.0.0.1:{free_port()}"), caplog.at_level(logging.WARNING):
        assert modelload.load_tokenizer(config(GATED, tmp_path)).is_fast
    assert f"could not check {GATED} on the Hub" in caplog.text
    assert not served.unexpected
