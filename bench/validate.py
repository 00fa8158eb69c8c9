"""Benchmark of the dataset doctor against the OpenAI cookbook's per-line loop.

Generates 200,000 chat examples (seeded), pins the process to one CPU core, and times, in the
same run and interleaved (best of ``--repeats``):

- ``cookbook``: the data-preparation cookbook's format check: ``json.loads`` per line, then its
  dict checks per message (missing keys, unknown keys, roles, content, assistant present);
- ``kubetune_format``: :func:`kubetune.data.validate_file` without token counting (it checks
  more: weights, system position, duplicates, per-role keys, types of every known key);
- ``kubetune_tokens_hf`` / ``kubetune_tokens_openai``: the same with token counting, by a
  tokenizer trained here on the data (ChatML template) and by tiktoken (or, where no encoding
  file can be had, the labelled approximation; the JSON says which).

Writes ``bench/results/validate.json``. Usage: ``python bench/validate.py [--lines N]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "validate.json"
GOAL_RATIO = 2.0

WORDS = [
    "the",
    "way",
    "that",
    "can",
    "be",
    "told",
    "is",
    "not",
    "the",
    "eternal",
    "way",
    "water",
    "benefits",
    "all",
    "things",
    "without",
    "contending",
    "softness",
    "overcomes",
    "hardness",
    "know",
    "when",
    "to",
    "stop",
    "and",
    "you",
    "meet",
    "no",
    "danger",
    "how",
    "do",
    "I",
    "deploy",
    "a",
    "model",
    "to",
    "kubernetes",
    "with",
    "a",
    "gpu",
    "node",
    "pool",
    "and",
    "a",
    "service",
    "account",
    "please",
    "summarise",
    "this",
    "ticket",
    "for",
    "the",
    "on-call",
    "engineer",
    "in",
    "two",
    "short",
    "sentences",
]


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    system = {"role": "system", "content": "You are a concise assistant for the platform team."}
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            messages: list[dict[str, Any]] = [system] if rng.random() < 0.8 else []
            for turn in range(1 if rng.random() < 0.85 else rng.randint(2, 4)):
                messages.append({"role": "user", "content": f"{i}.{turn} {text(4, 30)}"})
                reply: dict[str, Any] = {"role": "assistant", "content": text(5, 80)}
                if turn == 0 and len(messages) > 3:
                    reply["weight"] = 0
                messages.append(reply)
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def cookbook(path: Path) -> dict[str, int]:
    """The format-validation loop of OpenAI's chat fine-tuning data-preparation cookbook."""
    from collections import defaultdict

    with path.open(encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]
    format_errors: dict[str, int] = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(
                k not in ("role", "content", "name", "function_call", "weight") for k in message
            ):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1
    return dict(format_errors)


def hf_counter(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubetune.data import tokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with path.open(encoding="utf-8") as f:
        tok.train_from_iterator(itertools.islice(f, 5000), trainer)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=template, name_or_path="bench-bpe-4k"
    )
    return tokens.HFChatCounter(fast)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of this process: steadier than wall time on a shared machine."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--hf-lines", type=int, default=20_000, help="lines for the Hugging Face token run"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from kubetune import data

    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})  # one core, as the goal is stated

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        path = Path(tmp) / "chat.jsonl"
        generate(path, args.lines)
        size = path.stat().st_size
        print(f"{args.lines:,} lines, {size / 1e6:.1f} MB", file=sys.stderr)

        best: dict[str, float] = {}
        for r in range(args.repeats):
            t_cook, errs = timed(lambda: cookbook(path))
            t_kt, report = timed(lambda: data.validate_file(path))
            assert errs == {} and report.ok and report.n_valid == args.lines, report.counts
            best["cookbook"] = min(best.get("cookbook", 1e9), t_cook)
            best["kubetune_format"] = min(best.get("kubetune_format", 1e9), t_kt)
            print(f"  run {r + 1}: cookbook {t_cook:.2f} s, kubetune {t_kt:.2f} s", file=sys.stderr)

        os.sched_setaffinity(0, set(cpus))  # token counting may use every core
        runs: dict[str, Any] = {}
        for key, n_tok, make in (
            ("kubetune_tokens_openai", args.lines, lambda: data.openai_counter("gpt-4o-mini")),
            ("kubetune_tokens_hf", min(args.hf_lines, args.lines), lambda: hf_counter(path)),
        ):
            token_path = path
            if n_tok < args.lines:
                token_path = Path(tmp) / f"head-{n_tok}.jsonl"
                with path.open("rb") as src, token_path.open("wb") as dst:
                    dst.writelines(itertools.islice(src, n_tok))
            counter = make()
            start = time.perf_counter()
            rep = data.validate_file(token_path, counter=counter)
            secs = time.perf_counter() - start
            assert rep.stats is not None and rep.ok
            runs[key] = {
                "lines": n_tok,
                "cores": len(cpus),
                "clock": "wall",
                "seconds": round(secs, 3),
                "lines_per_s": round(n_tok / secs),
                "counter": counter.name,
                "exact": counter.exact,
                "total_tokens": rep.stats.total_tokens,
                "trained_tokens": rep.stats.trained_tokens,
            }
            print(f"  {key}: {secs:.2f} s ({counter.name})", file=sys.stderr)

    def rate(key: str) -> dict[str, Any]:
        return {
            "seconds": round(best[key], 3),
            "lines_per_s": round(args.lines / best[key]),
            "mb_per_s": round(size / 1e6 / best[key], 1),
        }

    ratio = best["cookbook"] / best["kubetune_format"]
    result = {
        "benchmark": "kubetune validate vs OpenAI cookbook format loop",
        "lines": args.lines,
        "file_bytes": size,
        "repeats": args.repeats,
        "cores": 1,
        "clock": "process CPU time, best of repeats, cookbook and kubetune interleaved",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus_visible": len(cpus),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "cookbook": rate("cookbook"),
        "kubetune_format": rate("kubetune_format"),
        "ratio_format_vs_cookbook": round(ratio, 2),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        **runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
