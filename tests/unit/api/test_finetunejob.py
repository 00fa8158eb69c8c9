"""The FineTuneJob model: defaults, round trips, and a clear error for every cross-field rule."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus, openai_spec
from kubetune.api.jobconfig import TrainerConfig

LOCAL: dict[str, Any] = {
    "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
    "dataset": {"configMap": {"name": "daoyan", "key": "train.jsonl"}},
}
OPENAI: dict[str, Any] = {
    "provider": "openai",
    "dataset": {"url": "https://example.com/train.jsonl"},
    "openai": {"model": "gpt-4o-mini-2024-07-18", "apiKeySecretRef": {"name": "openai"}},
}


def test_local_defaults_are_applied() -> None:
    spec = ftj.FineTuneJobSpec.model_validate(LOCAL)
    assert spec.provider == "local"
    assert spec.lora.r == 16 and spec.lora.target_modules == ["all-linear"]
    assert spec.hyperparameters.epochs == "auto"
    assert spec.resources.gpus == 1 and spec.resources.gpu_resource_name is None  # chart default
    assert spec.serve.enabled


def test_the_server_is_queued_where_the_job_is_unless_serve_queue_says() -> None:
    assert ftj.FineTuneJobSpec.model_validate(LOCAL).serving_queue is None
    queued = ftj.FineTuneJobSpec.model_validate({**LOCAL, "queue": "team-a"})
    assert queued.serving_queue == "team-a"
    own = ftj.FineTuneJobSpec.model_validate(
        {**LOCAL, "queue": "team-a-batch", "serve": {"queue": "team-a-serving"}}
    )
    assert own.serving_queue == "team-a-serving"


@pytest.mark.parametrize(
    "model",
    [
        ftj.FineTuneJobSpec,
        jobstatus.FineTuneJobStatus,
        ftj.LoraSpec,
        ftj.Hyperparameters,
        ftj.Resources,
        ftj.ServeSpec,
        ftj.OutputSpec,
        openai_spec.OpenAIHyperparameters,
    ],
)
def test_round_trip_through_wire_form(model: type[BaseModel]) -> None:
    sample = {
        ftj.FineTuneJobSpec: LOCAL,
        jobstatus.FineTuneJobStatus: {"phase": "Running", "progress": {"step": 3, "totalSteps": 9}},
    }.get(model, {})
    obj = model.model_validate(sample)
    wire = obj.to_wire()  # type: ignore[attr-defined]
    assert model.model_validate(wire) == obj


def test_int_or_auto_accepts_both_and_rejects_other_strings() -> None:
    assert ftj.Hyperparameters(epochs=3).epochs == 3
    assert ftj.Hyperparameters.model_validate({"epochs": "auto"}).epochs == "auto"
    with pytest.raises(ValidationError, match="epochs"):
        ftj.Hyperparameters.model_validate({"epochs": "many"})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**LOCAL, "model": None}, "`model` is required when `provider` is `local`"),
        ({**OPENAI, "openai": None}, "`openai` is required when `provider` is `openai`"),
        (
            {**OPENAI, "dataset": {"pvc": {"claimName": "data", "path": "t.jsonl"}}},
            "`dataset.pvc` cannot be used with provider `openai`",
        ),
        ({**LOCAL, "method": "qlora", "resources": {"gpus": 0}}, "needs `resources.gpus` >= 1"),
        ({**LOCAL, "dataset": {}}, "set exactly one of `configMap`, `pvc` or `url`"),
        (
            {**LOCAL, "model": {"id": "a/b", "pvc": {"claimName": "m"}}},
            "exactly one of `id` or `pvc`",
        ),
        (
            {
                **LOCAL,
                "model": {"pvc": {"claimName": "m"}, "tokenSecretRef": {"name": "t", "key": "k"}},
            },
            "`tokenSecretRef` applies only to `id`",
        ),
        (
            {
                **LOCAL,
                "output": {"pvc": {"claimName": "out", "path": "../other"}},
            },
            "must not contain `..`",
        ),
        ({**LOCAL, "lora": {"r": 0}}, "lora.r"),
        ({**LOCAL, "lorra": {}}, "lorra"),
        (
            {**LOCAL, "serve": {"engine": "vllm", "resources": {"gpus": 0}}},
            "`serve.engine: vllm` needs `serve.resources.gpus` >= 1; use `engine: vllm-cpu`",
        ),
    ],
)
def test_cross_field_rules_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ftj.FineTuneJobSpec.model_validate(spec)
    text = str(err.value)
    assert message in text or message in text.replace("\n", " ")


def test_openai_spec_is_valid() -> None:
    spec = ftj.FineTuneJobSpec.model_validate(OPENAI)
    assert spec.openai is not None and spec.openai.api_key_secret_ref.key == "api-key"
    assert spec.openai.hyperparameters.learning_rate_multiplier == "auto"


def test_immutability_rule_covers_every_spec_field_but_suspend_and_serve() -> None:
    rule = ftj.immutability_rule()["rule"]
    for name in ftj.spec_field_names():
        frozen = f"self.spec.{name} == oldSelf.spec.{name}" in rule
        assert frozen == (name not in ftj.MUTABLE_AFTER_START), name


def test_trainer_config_round_trips_through_yaml(tmp_path: Any) -> None:
    config = TrainerConfig.model_validate(
        {
            "job": {"name": "daoyan"},
            "model": {"idOrPath": "/models/tiny", "display": "tiny"},
            "dataset": {"path": "/data/train.jsonl"},
            "outputDir": "/out",
        }
    )
    path = tmp_path / "config.yaml"
    path.write_text(config.dump_yaml(), encoding="utf-8")
    assert TrainerConfig.load(path) == config


@pytest.mark.parametrize(
    "serve",
    [
        {"engine": "vllm-cpu", "resources": {"gpus": 0}},
        {"enabled": False, "engine": "vllm", "resources": {"gpus": 0}},
        {"engine": "vllm"},
    ],
)
def test_serving_without_gpus_is_valid_on_the_cpu_engine_or_when_off(serve: dict[str, Any]) -> None:
    assert ftj.FineTuneJobSpec.model_validate({**LOCAL, "serve": serve}).serve.engine


def test_name_rules_are_those_of_a_service_name() -> None:
    pattern = re.compile(ftj.NAME_PATTERN)
    for good in ("daoyan", "qwen2-5-tune", "a", "x" * ftj.MAX_NAME_LENGTH):
        assert pattern.match(good), good
    for bad in ("qwen2.5-tune", "7b-lora", "-x", "x-", "Daoyan", "tune_1"):
        assert not pattern.match(bad), bad
