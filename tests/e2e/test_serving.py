"""Serving a trained adapter with the real vLLM (CPU build), called with the real openai client.

One vLLM server (``vllm_server`` in conftest.py) serves every test here that needs one; the
refusal tests never start vLLM at all (that is what they check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import yaml

from kubetune.server.adapters import AdapterClient, AdapterRequestRefused

if TYPE_CHECKING:
    from conftest import VllmServer

pytestmark = pytest.mark.e2e

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_NAME = "demo-tiny"


def prompt(example: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) the assistant's answer, as trained."""
    return [m for m in example if m["role"] != "assistant"]


def answer(example: list[dict[str, str]]) -> str:
    return next(m["content"] for m in example if m["role"] == "assistant")


def copy_adapter(
    src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)
    if edit is not None:
        doc = json.loads((dst / "adapter_config.json").read_text())
        edit(doc)
        (dst / "adapter_config.json").write_text(json.dumps(doc))
    return dst


@pytest.fixture(scope="module")
def silent_adapter(trained_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained adapter with every ``lora_B`` zeroed: a valid adapter that changes nothing.

    Served, it must answer exactly as the base model does, and unlike the trained adapter:
    proof that vLLM applies *this* adapter's weights, not the other one's.
    """
    from safetensors.torch import load_file, save_file

    dst = copy_adapter(trained_adapter, tmp_path_factory.mktemp("silent") / "adapter")
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert any("lora_B" in k for k in tensors)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    return dst


# ------------------------------------------------------------------------------ 1 trained adapter


def test_trained_adapter_is_listed_under_its_name_with_the_base_as_parent(
    vllm_server: VllmServer, trained_adapter: Path
) -> None:
    assert vllm_server.base_name == BASE_NAME
    models = vllm_server.models()
    assert set(models) == {BASE_NAME, "daoyan"}
    assert models["daoyan"]["parent"] == BASE_NAME
    assert models["daoyan"]["root"] == str(trained_adapter)


def test_trained_adapter_answers_with_its_training_answers_and_the_base_does_not(
    vllm_server: VllmServer, daoyan_examples: list[list[dict[str, str]]]
) -> None:
    examples = daoyan_examples[:3]
    for example in examples:
        tuned = vllm_server.chat("daoyan", prompt(example))
        assert tuned == answer(example)
        assert vllm_server.chat(BASE_NAME, prompt(example)) != tuned


# ------------------------------------------------------------------------------ 2 dynamic loading


def test_a_second_adapter_loaded_at_run_time_answers_and_is_gone_after_unloading(
    vllm_server: VllmServer, silent_adapter: Path, daoyan_examples: list[list[dict[str, str]]]
) -> None:
    example = daoyan_examples[0]
    base_answer = vllm_server.chat(BASE_NAME, prompt(example))
    tuned_answer = vllm_server.chat("daoyan", prompt(example))
    assert tuned_answer != base_answer
    with AdapterClient(vllm_server.base_url, api_key=vllm_server.api_key) as client:
        served = client.load("daoyan-silent", str(silent_adapter))
        try:
            assert served.parent == BASE_NAME
            assert vllm_server.models()["daoyan-silent"]["root"] == str(silent_adapter)
            # Its own (zero) weights answer, not the other adapter's: exactly the base answer.
            assert vllm_server.chat("daoyan-silent", prompt(example)) == base_answer
            # The first adapter answers as before, beside it.
            assert vllm_server.chat("daoyan", prompt(example)) == tuned_answer
        finally:
            client.unload("daoyan-silent")
        assert "daoyan-silent" not in vllm_server.models()
        assert "daoyan-silent" not in client.adapters()
    with pytest.raises(openai.NotFoundError):
        vllm_server.chat("daoyan-silent", prompt(example))


def test_an_adapter_that_fails_to_load_is_never_reported_as_served(
    vllm_server: VllmServer, tmp_path: Path
) -> None:
    with AdapterClient(vllm_server.base_url, api_key=vllm_server.api_key) as client:
        with pytest.raises(AdapterRequestRefused):
            client.load("ghost", str(tmp_path / "no-such-adapter"))
        assert "ghost" not in client.adapters()
    assert "ghost" not in vllm_server.models()


# ------------------------------------------------------------------------------ 4 API key


def test_requests_without_the_api_key_get_401(
    vllm_server: VllmServer, daoyan_examples: list[list[dict[str, str]]]
) -> None:
    messages = prompt(daoyan_examples[0])
    assert httpx.get(f"{vllm_server.base_url}/models").status_code == 401
    r = httpx.post(
        f"{vllm_server.base_url}/chat/completions",
        json={"model": "daoyan", "messages": messages, "max_tokens": 4},
    )
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        vllm_server.openai(api_key="sk-wrong").chat.completions.create(
            model="daoyan",
            messages=messages,
            max_tokens=4,  # type: ignore[arg-type]
        )
    # Kubernetes probes carry no key: /health stays open.
    assert httpx.get(f"{vllm_server.root}/health").status_code == 200


# ------------------------------------------------------------------------------ 3 bad adapters


def _set_rank(doc: dict[str, Any]) -> None:
    doc["r"] = 1024


def _set_base(doc: dict[str, Any]) -> None:
    doc["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("rank", "LoRA rank 1024 is too high: vLLM supports at most 512"),
        ("weights", "adapter_model.safetensors is missing"),
        ("base", "trained on base model `Qwen/Qwen2.5-0.5B-Instruct`"),
    ],
)
def test_bad_adapters_are_refused_before_vllm_starts(
    demo_model: Path,
    trained_adapter: Path,
    launcher_env: dict[str, str],
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    edit = {"rank": _set_rank, "base": _set_base}.get(case)
    bad = copy_adapter(trained_adapter, tmp_path / "adapter", edit)
    if case == "weights":
        (bad / "adapter_model.safetensors").unlink()
    config = {
        "model": str(demo_model),
        "servedModelName": BASE_NAME,
        "adapters": [{"name": "daoyan", "path": str(bad)}],
        "engine": "vllm-cpu",
        "adapterWaitSeconds": 0,
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.server", "--config", str(tmp_path / "serve.yaml")],
        capture_output=True, text=True, env=launcher_env, cwd=tmp_path, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    refusals = [
        line for line in proc.stderr.splitlines() if line.startswith("kubetune.server: refusing")
    ]
    assert len(refusals) == 1 and message in refusals[0]
    # vLLM never started: no exec, no engine log, and no minute of imports.
    assert "starting vLLM" not in proc.stderr and "vllm.entrypoints" not in proc.stderr
    assert time.monotonic() - start < 60
