"""vLLM's command line and environment, built from a serve config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.serveconfig import ServeConfig
from kubetune.server import vllm_args


def config(**over: Any) -> ServeConfig:
    doc: dict[str, Any] = {
        "model": "/models/tiny",
        "servedModelName": "tiny",
        "adapters": [{"name": "daoyan", "path": "/out/adapter"}],
        "port": 8123,
    }
    return ServeConfig.model_validate({**doc, **over})


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    ("rank", "rounded"),
    [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (100, 128), (257, 320), (321, 512),
     (512, 512)],
)  # fmt: skip
def test_rank_rounds_up_to_a_rank_vllm_accepts(rank: int, rounded: int) -> None:
    assert vllm_args.round_lora_rank(rank) == rounded
    assert rounded in vllm_args.SUPPORTED_LORA_RANKS


@pytest.mark.parametrize("rank", [0, 513, 1024])
def test_rank_outside_vllm_range_is_an_error(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        vllm_args.round_lora_rank(rank)


def test_argv_starts_the_openai_server_module_with_the_config() -> None:
    argv = vllm_args.vllm_argv(config(maxModelLen=512, dtype="bfloat16"), adapter_ranks=[8])
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/models/tiny"
    assert flag(argv, "--served-model-name") == "tiny"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("0.0.0.0", "8123")
    assert flag(argv, "--max-model-len") == "512" and flag(argv, "--dtype") == "bfloat16"
    assert "--tensor-parallel-size" not in argv and "--revision" not in argv


def test_adapters_are_served_under_their_names_with_the_base_as_parent() -> None:
    argv = vllm_args.vllm_argv(
        config(adapters=[{"name": "a", "path": "/p/a,1"}, {"name": "b", "path": "/p/b"}]),
        adapter_ranks=[8, 16],
    )
    assert "--enable-lora" in argv
    i = argv.index("--lora-modules")
    modules = [json.loads(m) for m in argv[i + 1 : i + 3]]
    assert modules == [
        {"name": "a", "path": "/p/a,1", "base_model_name": "tiny"},
        {"name": "b", "path": "/p/b", "base_model_name": "tiny"},
    ]
    assert flag(argv, "--max-lora-rank") == "16"
    assert flag(argv, "--max-loras") == "2"


def test_max_lora_rank_is_the_largest_adapter_rank_rounded_up() -> None:
    assert flag(vllm_args.vllm_argv(config(), adapter_ranks=[4]), "--max-lora-rank") == "8"
    assert flag(vllm_args.vllm_argv(config(), adapter_ranks=[40]), "--max-lora-rank") == "64"


def test_a_configured_rank_cap_wins_and_is_rounded() -> None:
    argv = vllm_args.vllm_argv(config(maxLoraRank=24), adapter_ranks=[4])
    assert flag(argv, "--max-lora-rank") == "32"
    assert vllm_args.rank_limit(config(maxLoraRank=24)) == 32
    assert vllm_args.rank_limit(config()) == 512


def test_runtime_loading_leaves_room_for_common_ranks() -> None:
    argv = vllm_args.vllm_argv(config(adapters=[], runtimeLoraUpdating=True, maxLoras=4))
    assert "--enable-lora" in argv and "--lora-modules" not in argv
    assert flag(argv, "--max-lora-rank") == "16" and flag(argv, "--max-loras") == "4"


def test_no_adapters_no_lora() -> None:
    argv = vllm_args.vllm_argv(config(adapters=[]))
    assert "--enable-lora" not in argv and "--max-lora-rank" not in argv


def test_gpus_revision_and_extra_args() -> None:
    argv = vllm_args.vllm_argv(
        config(model="Qwen/Qwen2.5-7B", revision="main", tensorParallelSize=4,
               extraArgs=["--gpu-memory-utilization", "0.85"]),
        adapter_ranks=[16], python="/venv/bin/python",
    )  # fmt: skip
    assert argv[0] == "/venv/bin/python"
    assert flag(argv, "--tensor-parallel-size") == "4" and flag(argv, "--revision") == "main"
    assert argv[-2:] == ["--gpu-memory-utilization", "0.85"]


def test_api_key_goes_to_vllm_through_the_environment_never_the_argv() -> None:
    c = config(apiKeyEnv="KUBETUNE_API_KEY")
    env = vllm_args.vllm_env(c, {"KUBETUNE_API_KEY": "sk-test-123\n", "PATH": "/bin"})
    argv = vllm_args.vllm_argv(c, adapter_ranks=[8])
    assert env["VLLM_API_KEY"] == "sk-test-123" and env["PATH"] == "/bin"
    assert not any("sk-test-123" in a for a in argv) and "--api-key" not in argv
    assert "***" in vllm_args.redacted([*argv, "--x", "sk-test-123"], env)


@pytest.mark.parametrize("environ", [{}, {"KUBETUNE_API_KEY": "  "}])
def test_a_missing_api_key_is_refused_rather_than_serving_openly(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="KUBETUNE_API_KEY"):
        vllm_args.vllm_env(config(apiKeyEnv="KUBETUNE_API_KEY"), environ)


def test_runtime_updating_sets_vllms_switch_and_nothing_leaks_by_default() -> None:
    assert (
        vllm_args.vllm_env(config(runtimeLoraUpdating=True), {})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
        == "True"
    )
    env = vllm_args.vllm_env(config(), {})
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env and "VLLM_API_KEY" not in env
    assert env["VLLM_NO_USAGE_STATS"] == "1"
