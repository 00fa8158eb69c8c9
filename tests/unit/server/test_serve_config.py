"""The serve config: what a person or the operator writes, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.serveconfig import ServeConfig

MINIMAL: dict[str, Any] = {"model": "/models/tiny"}


def test_yaml_and_json_files_load_the_same(tmp_path: Path) -> None:
    doc = {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "servedModelName": "qwen",
        "adapters": [{"name": "daoyan", "path": "/kubetune/output/adapter"}],
        "maxModelLen": 4096,
        "apiKeyEnv": "KUBETUNE_API_KEY",
        "tensorParallelSize": 2,
        "extraArgs": ["--gpu-memory-utilization", "0.85"],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "a.yaml").write_text(ServeConfig.model_validate(doc).dump_yaml())
    from_json = ServeConfig.load(tmp_path / "a.json")
    from_yaml = ServeConfig.load(tmp_path / "a.yaml")
    assert from_json == from_yaml
    assert from_json.adapters[0].name == "daoyan" and from_json.max_model_len == 4096
    assert from_json.base_name == "qwen"


def test_defaults_serve_on_port_8000_with_the_model_as_its_own_name() -> None:
    c = ServeConfig.model_validate(MINIMAL)
    assert (c.host, c.port, c.engine, c.base_name) == ("0.0.0.0", 8000, "vllm", "/models/tiny")
    assert not c.lora_enabled and c.api_key_env is None


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, "unique"),
        ({"servedModelName": "a", "adapters": [{"name": "a", "path": "/x"}]}, "servedModelName"),
        ({"engine": "vllm-cpu", "tensorParallelSize": 2}, "tensorParallelSize"),
        ({"adapters": [{"name": "a=b", "path": "/x"}]}, "name"),
        ({"apiKey": "sk-secret"}, "apiKey"),  # the key itself never goes in the file
        ({"apiKeyEnv": "not a name"}, "apiKeyEnv"),
        ({"maxLoraRank": 1024}, "maxLoraRank"),
        ({"engine": "tgi"}, "engine"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeConfig.model_validate({**MINIMAL, **over})


def test_runtime_updating_turns_lora_on_without_adapters() -> None:
    assert ServeConfig.model_validate({**MINIMAL, "runtimeLoraUpdating": True}).lora_enabled


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--api-key", "sk-secret"], "`--api-key`"),
        (["--api_key=sk-secret"], "`--api-key` (as `--api_key`)"),
        (["--api-k", "sk-secret"], "`--api-key` (as `--api-k`)"),
        (["--enforce-eager", "--max-lora-rank", "512"], "`--max-lora-rank`"),
        (["--max_lora_rank=512"], "`--max-lora-rank` (as `--max_lora_rank`)"),
        (["--lora-modules", "x=/elsewhere"], "`--lora-modules`"),
        (["--model", "/other"], "`--model`"),
        (["--served-model-name", "x"], "`--served-model-name`"),
        (["--chat-template=/t.jinja"], "`--chat-template`"),
        (["--config", "vllm.yaml"], "`--config`"),
    ],
)
def test_extra_args_may_not_set_what_the_launcher_owns(args: list[str], flag: str) -> None:
    with pytest.raises(ValidationError) as err:
        ServeConfig.model_validate({"model": "/m", "extraArgs": args})
    assert f"`extraArgs` must not set {flag}:" in str(err.value)


@pytest.mark.parametrize(
    "args",
    [
        ["--gpu-memory-utilization", "0.85"],
        ["--max-loras", "4", "--max-cpu-loras=8"],
        ["--chat-template-content-format", "openai"],
        ["--model-impl", "transformers", "--api-server-count", "2"],
        ["--enforce-eager", "-tp", "2"],
    ],
)
def test_other_extra_args_pass(args: list[str]) -> None:
    assert ServeConfig.model_validate({"model": "/m", "extraArgs": args}).extra_args == args
