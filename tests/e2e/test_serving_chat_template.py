"""The chat template an adapter was trained with reaches the real vLLM (``--chat-template``).

vLLM renders prompts with ``--chat-template`` or the base model's own template and never looks
in an adapter's folder. Here the base model has no template (the demo model, its template
removed) and the adapter carries the one it was trained with as ``chat_template.jinja``, as the
trainer leaves it when it trains with its fallback: the launcher must hand that file to vLLM,
and the adapter must answer with its training answers through the chat API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from kubetune.demo_model import CHAT_TEMPLATE
from support.net import free_port
from support.server_process import cpu_serve_config, start_server, stop_server, wait_ready

pytestmark = pytest.mark.e2e

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_without_template(demo_model: Path, dst: Path) -> Path:
    shutil.copytree(demo_model, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = dst / "tokenizer_config.json"
    doc = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    doc.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(doc), encoding="utf-8")
    return dst


def adapter_with_template(trained: Path, dst: Path, base: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(trained / name, dst / name)
    config = json.loads((dst / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base)
    (dst / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    result = json.loads((trained / "result.json").read_text(encoding="utf-8"))
    result["chatTemplate"] = "fallback"
    (dst / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return dst


def test_the_adapters_template_is_served_when_the_base_model_has_none(
    demo_model: Path,
    trained_adapter: Path,
    daoyan_examples: list[list[dict[str, str]]],
    launcher_env: dict[str, str],
    tmp_path: Path,
) -> None:
    base = base_without_template(demo_model, tmp_path / "base")
    adapter = adapter_with_template(trained_adapter, tmp_path / "adapter", base)
    port = free_port()
    config = cpu_serve_config(str(base), {"daoyan": adapter}, port)
    config_path = tmp_path / "dry-run.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    dry = subprocess.run(
        [sys.executable, "-m", "kubetune.server", "--config", str(config_path), "--dry-run"],
        capture_output=True, text=True, env=launcher_env, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    argv = json.loads(dry.stdout)["argv"]
    assert argv[argv.index("--chat-template") + 1] == str(adapter / "chat_template.jinja")

    proc = start_server(config, tmp_path, launcher_env)
    try:
        root = f"http://127.0.0.1:{port}"
        wait_ready(proc, root, "daoyan", tmp_path / "server.log", None)
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        example = daoyan_examples[0]
        messages: list[dict[str, str]] = [m for m in example if m["role"] != "assistant"]
        reply = client.chat.completions.create(
            model="daoyan",
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=160,
            seed=0,
        )
        trained = next(m["content"] for m in example if m["role"] == "assistant")
        assert reply.choices[0].message.content == trained
    finally:
        stop_server(proc)
