"""A base model named by Hub id, downloaded the way a trainer pod does it: real
``python -m kubetune.trainer`` processes with ``HF_ENDPOINT`` (the chart's mirror) and ``HF_TOKEN``
(``spec.model.tokenSecretRef``) in their environment, against the fake Hub serving the demo model
as a gated repo (``tests/fakes/hf_hub.py``).

- With a granted token it trains, every download carries the token, and the token is in no
  output file and no line of the log.
- Without a token it stops before training with exit code 2 (the Job fails at once) and says
  which field to set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.hf_hub import FakeHub
from kubetune.api.result import RESULT_FILE, TrainingResult

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
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))},
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(work / "cache"),  # the pod's model cache: empty
        "HF_HUB_DISABLE_TELEMETRY": "1",  # as the pod's env has it
        "PYTHONSAFEPATH": "1",
        "OMP_NUM_THREADS": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(work / "trainer.json")],
        env=env, cwd=work, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_a_gated_model_trains_with_the_token_and_the_token_leaks_nowhere(
    hub: FakeHub, tmp_path: Path
) -> None:
    start = len(hub.requests)
    code, log = train(hub, tmp_path, TOKEN)
    assert code == 0, log[-3000:]
    result = TrainingResult.model_validate_json((tmp_path / "out" / RESULT_FILE).read_text())
    assert result.base_model == GATED and result.steps > 0
    downloads = [r for r in hub.requests[start:] if r.route == "resolve"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        r.path.rsplit("/", 1)[-1] for r in downloads if r.status == 200
    }
    assert {r.user for r in downloads} == {"team-a"}  # every download carried the token
    assert not hub.unexpected
    assert TOKEN not in log
    for path in (tmp_path / "out").rglob("*"):
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
