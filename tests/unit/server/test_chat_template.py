"""The chat template an adapter was trained with reaches vLLM as ``--chat-template``.

vLLM renders prompts with ``--chat-template`` or the base model's tokenizer template; it never
reads an adapter's folder. The trainer writes its fallback template (for a base model without
one) next to the adapter as ``chat_template.jinja``: the launcher must pass that file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.serveconfig import ServeConfig
from kubetune.server import adapter_checks, launcher, vllm_args

MakeAdapter = Callable[..., Path]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def with_template(folder: Path, text: str = CHATML, result: str | None = "fallback") -> Path:
    (folder / adapter_checks.CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
    if result is not None:
        (folder / "result.json").write_text(json.dumps({"chatTemplate": result}))
    return folder


def config(base: str, *folders: Path, **over: Any) -> ServeConfig:
    return ServeConfig.model_validate(
        {
            "model": base,
            "servedModelName": "tiny",
            "adapters": [{"name": f.name, "path": str(f)} for f in folders],
            "engine": "vllm-cpu",
            "adapterWaitSeconds": 0,
            **over,
        }
    )


def launch_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg: ServeConfig
) -> tuple[int | None, list[str]]:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg.to_wire()))
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execvpe", lambda file, argv, env: calls.append(argv))
    monkeypatch.setattr(launcher, "installed_engine_problem", lambda engine: None)
    code = launcher.main(["--config", str(path)])
    return code, (calls[0] if calls else [])


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_trainers_fallback_template_is_passed_to_vllm(
    tmp_path: Path, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = with_template(make_adapter("daoyan"))
    _, argv = launch_argv(tmp_path, monkeypatch, config("/models/tiny-llama", folder))
    assert flag(argv, "--chat-template") == str(folder / "chat_template.jinja")


def test_no_template_file_means_the_base_models_own(
    tmp_path: Path, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, argv = launch_argv(tmp_path, monkeypatch, config("/models/tiny-llama", make_adapter()))
    assert argv and "--chat-template" not in argv


def test_a_copy_of_the_base_models_template_is_not_passed(make_adapter: MakeAdapter) -> None:
    folder = with_template(make_adapter(), result="model")
    cfg = config("/models/tiny-llama", folder)
    infos = adapter_checks.check_adapters(cfg)
    assert adapter_checks.chat_template(cfg, infos) is None


def test_a_base_folder_with_its_own_template_keeps_it(
    tmp_path: Path, make_adapter: MakeAdapter
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    folder = with_template(make_adapter(base=str(base)))
    cfg = config(str(base), folder)
    assert adapter_checks.chat_template(cfg, adapter_checks.check_adapters(cfg)) is None
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert adapter_checks.chat_template(cfg, adapter_checks.check_adapters(cfg)) == str(
        folder / "chat_template.jinja"
    )


def test_two_adapters_with_the_same_template_share_it(make_adapter: MakeAdapter) -> None:
    a, b = with_template(make_adapter("a")), with_template(make_adapter("b"))
    cfg = config("/models/tiny-llama", a, b)
    got = adapter_checks.chat_template(cfg, adapter_checks.check_adapters(cfg))
    assert got == str(a / "chat_template.jinja")


def test_adapters_with_different_templates_are_refused(
    tmp_path: Path,
    make_adapter: MakeAdapter,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = with_template(make_adapter("a"))
    b = with_template(make_adapter("b"), text=CHATML.replace("im_start", "start"))
    code, argv = launch_argv(tmp_path, monkeypatch, config("/models/tiny-llama", a, b))
    assert code == launcher.EXIT_REFUSED and argv == []
    err = capsys.readouterr().err.strip()
    assert err.startswith("kubetune.server: refusing to start: adapter `b`")
    assert "adapter `a` with a different one" in err and "\n" not in err


def test_the_configured_template_wins(
    tmp_path: Path, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = with_template(make_adapter("a"))
    b = with_template(make_adapter("b"), text="other")
    cfg = config("/models/tiny-llama", a, b, chatTemplate="/templates/chatml.jinja")
    _, argv = launch_argv(tmp_path, monkeypatch, cfg)
    assert flag(argv, "--chat-template") == "/templates/chatml.jinja"


def test_argv_carries_the_template_only_when_given() -> None:
    cfg = ServeConfig(model="m")
    assert "--chat-template" not in vllm_args.vllm_argv(cfg)
    argv = vllm_args.vllm_argv(cfg, chat_template="/a/chat_template.jinja")
    assert flag(argv, "--chat-template") == "/a/chat_template.jinja"
