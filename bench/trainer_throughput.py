"""Trainer throughput: kubetune's trainer against plain HF Trainer + PEFT with padded batches.

Both train the same LoRA (r=16, all linear layers) on the same model and the same short chat
examples (the Daoist seed data, system + question + short answer, loss on the answer only),
with the same batch size, seed and thread count, for the same number of steps. Reported:
real (non-padding) tokens per second over the timed steps (the first ``--warmup`` steps are
not timed), and the ratio. Engines:

- ``hf-padded``: ``transformers.Trainer`` + PEFT, ``DataCollatorForSeq2Seq`` padding to the
  longest example of each batch, the model's own loss (logits at every position).
- ``kubetune``: the trainer's engine as the pod runs it: padding-free packing (one row per
  micro-batch, per-example position ids), the system prompt that examples share computed once
  per row (the same loss and gradients; see ``kubetune.trainer.packing``), and logits only
  where a label is trained.
- ``kubetune-noshare`` (ablation): the same without prefix sharing.
- ``kubetune-per-segment`` (ablation, GPU): packed rows with an attention call per segment,
  as on CPU, instead of one masked call (``kubetune.trainer.attention``).
- ``kubetune-padded`` (ablation): kubetune's loss with padded batches, to show what packing
  and target-only logits each contribute.
- ``trl-packed`` (``--trl``): TRL ``SFTTrainer`` with ``packing=True`` (BFD, padding-free) and
  ``assistant_only_loss``, the library path the issue prefers, for comparison.

Model shapes (random weights; throughput does not depend on the values):

- ``demo``: the tiny demo model (``kubetune.demo_model``), vocab ~1k.
- ``smollm2-135m``: SmolLM2-135M's shape (30 layers, hidden 576, vocab 49,152): a real small
  model, where the LM head is a large share of the work.
- ``llama3-8b`` (GPU only): Llama-3-8B's shape in bf16; adds model-FLOPs utilisation,
  4 × parameters × tokens/s over the GPU's dense bf16 peak (LoRA: the frozen weights get no
  weight gradients, so 4 rather than 6).

Run: ``python bench/trainer_throughput.py`` (CPU) → ``bench/results/trainer_throughput.json``;
rows of other shapes/devices already in the file are kept. On a GPU:
``python bench/trainer_throughput.py --shapes llama3-8b --data mixed --batch-size 16
--steps 12 --warmup 2 --rounds 1`` (one H100/H200; bf16; flash-attention if installed; what
``hack/device/check.sh`` runs). Batch 16: the padded baseline's activations for 16 mixed
conversations (up to ~270 tokens each) stay well inside an H100's 80 GB without gradient
checkpointing; each GPU run also records its peak GPU memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "data" / "daoyan.jsonl"
RESULTS = ROOT / "bench" / "results" / "trainer_throughput.json"

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets (SXM parts)."""


def load_examples(tokenizer: Any, n: int, data: str) -> list[dict[str, list[int]]]:
    """``n`` tokenised examples with answer-only labels.

    ``single``: the Daoist seed data as it is (one system prompt, one question, one short
    answer: lengths vary little). ``mixed``: the same turns strung into conversations of 1, 2,
    3 and 4 question/answer pairs in turn, as chat data usually mixes short and longer talks.
    """
    from kubetune.trainer import chat, dataset

    singles = dataset.read_conversations(DATASET)
    conversations = []
    for i in range(n):
        if data == "single":
            conversations.append(singles[i % len(singles)])
            continue
        turns = 1 + i % 4
        picked = [singles[(i * 7 + j) % len(singles)] for j in range(turns)]
        messages = [picked[0].messages[0]] + [m for c in picked for m in c.messages[1:]]
        conversations.append(chat.Conversation(messages=tuple(messages), line=i + 1))
    examples, _ = chat.tokenize_all(
        tokenizer, conversations, max_seq_length=4096, truncation="truncate"
    )
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def make_model(shape: str, model_dir: Path, seed: int, attn: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if shape == "demo":
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    else:
        cuda = torch.cuda.is_available()
        config = LlamaConfig(
            max_position_embeddings=4096, attn_implementation=attn, **SHAPES[shape]
        )
        # Built directly in its dtype on its device: an 8B model never exists in fp32.
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16 if cuda else torch.float32
            )
    model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


class Timer:
    """Collator wrapper + callback: real tokens per step and the time of each step end."""

    def __init__(self, collate: Any, warmup: int) -> None:
        self.collate = collate
        self.warmup = warmup
        self.tokens: list[int] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        return dict(self.collate(features))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _StepEnd(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.ends.append(time.perf_counter())
                timer.cpu_ends.append(time.process_time())
                return control

        return _StepEnd()

    def tokens_per_second(self) -> tuple[float, float]:
        """Real tokens per wall-clock second and per CPU second of this process."""
        steps = len(self.ends)
        timed = sum(self.tokens[self.warmup : steps])
        wall = self.ends[-1] - self.ends[self.warmup - 1]
        cpu = self.cpu_ends[-1] - self.cpu_ends[self.warmup - 1]
        return timed / wall, timed / cpu


def args_for(out: Path, steps: int, batch: int, seed: int, **extra: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=2e-4, lr_scheduler_type="constant", seed=seed, save_strategy="no",
        logging_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        bf16=cuda, dataloader_pin_memory=cuda, **extra,
    )  # fmt: skip


def run_hf_padded(
    model: Any, tokenizer: Any, rows: list[Any], opts: argparse.Namespace
) -> tuple[float, float]:
    from transformers import DataCollatorForSeq2Seq, Trainer

    timer = Timer(DataCollatorForSeq2Seq(tokenizer, padding="longest"), opts.warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model, args=args_for(Path(out), opts.steps, opts.batch_size, opts.seed),
            train_dataset=rows, data_collator=timer, callbacks=[timer.callback()],
        )  # fmt: skip
        trainer.train()
    return timer.tokens_per_second()


def run_kubetune(
    model: Any,
    tokenizer: Any,
    rows: list[Any],
    opts: argparse.Namespace,
    *,
    packing: bool,
    share_prefix: bool,
) -> tuple[float, float]:
    from kubetune.trainer import engine
    from kubetune.trainer import packing as packing_module

    collate = packing_module.Collator(
        packing=packing, pad_token_id=int(tokenizer.pad_token_id), share_prefix=share_prefix
    )
    timer = Timer(collate, opts.warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = engine.KubetuneTrainer(
            model=model, args=args_for(Path(out), opts.steps, opts.batch_size, opts.seed),
            train_dataset=engine.ExampleDataset([_Example(r) for r in rows]),
            data_collator=timer, callbacks=[timer.callback()], checkpoint_info=dict,
        )  # fmt: skip
        trainer.train()
    return timer.tokens_per_second()


class _Example:
    def __init__(self, row: dict[str, list[int]]) -> None:
        self.input_ids = row["input_ids"]
        self.labels = row["labels"]


TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The demo ChatML template with TRL's ``{% generation %}`` markers (assistant-only loss)."""


def run_trl(model: Any, tokenizer: Any, n: int, opts: argparse.Namespace) -> tuple[float, float]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lines = [json.loads(x) for x in DATASET.read_text(encoding="utf-8").splitlines()]
    data = Dataset.from_list([{"messages": lines[i % len(lines)]["messages"]} for i in range(n)])
    tokenizer.chat_template = TRAINING_TEMPLATE
    with tempfile.TemporaryDirectory() as out:
        # A packed row holds about batch_size examples, so the work per step matches.
        mean_len = 80
        config = SFTConfig(
            output_dir=out, max_steps=opts.steps, per_device_train_batch_size=1,
            max_length=opts.batch_size * mean_len, packing=True, assistant_only_loss=True,
            learning_rate=2e-4, lr_scheduler_type="constant", seed=opts.seed,
            save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            bf16=torch.cuda.is_available(),
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                             processing_class=tokenizer)  # fmt: skip
        timer = Timer(lambda f: f, opts.warmup)
        collate = trainer.data_collator

        def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
            timer.tokens.append(sum(len(f["input_ids"]) for f in features))
            return dict(collate(features))

        trainer.data_collator = counting
        trainer.add_callback(timer.callback())
        trainer.train()
    return timer.tokens_per_second()


def measure(
    shape: str,
    engine_name: str,
    model_dir: Path,
    tokenizer: Any,
    rows: list[Any],
    opts: argparse.Namespace,
) -> tuple[tuple[float, float], int, str]:
    """One engine on a fresh model: ((wall, CPU) real tokens/s, parameters, attention)."""
    from transformers import AutoTokenizer

    from kubetune.trainer import attention, modelload

    # kubetune's engine runs with the attention the trainer picks (modelload); the baselines
    # with stock SDPA, as a plain script would.
    attn = "sdpa"
    if engine_name.startswith("kubetune"):
        attn = modelload.choose_placement().attn_implementation
        if attn == modelload.PACKED_SDPA:
            attention.register()
    model = make_model(shape, model_dir, opts.seed, attn)
    params = sum(p.numel() for p in model.parameters())
    if engine_name == "hf-padded":
        tps = run_hf_padded(model, tokenizer, rows, opts)
    elif engine_name == "kubetune":  # as kubetune.trainer.run sets it up
        share = attn == modelload.PACKED_SDPA
        tps = run_kubetune(model, tokenizer, rows, opts, packing=True, share_prefix=share)
    elif engine_name == "kubetune-noshare":
        tps = run_kubetune(model, tokenizer, rows, opts, packing=True, share_prefix=False)
    elif engine_name == "kubetune-per-segment":
        one_call = attention.ONE_CALL_DEVICES
        attention.ONE_CALL_DEVICES = frozenset()
        try:
            share = attn == modelload.PACKED_SDPA
            tps = run_kubetune(model, tokenizer, rows, opts, packing=True, share_prefix=share)
        finally:
            attention.ONE_CALL_DEVICES = one_call
    elif engine_name == "kubetune-padded":
        tps = run_kubetune(model, tokenizer, rows, opts, packing=False, share_prefix=False)
    elif engine_name == "trl-packed":
        tps = run_trl(model, AutoTokenizer.from_pretrained(model_dir), len(rows), opts)
    else:
        raise SystemExit(f"unknown engine {engine_name}")
    return tps, params, attn


def gpu_info() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in name), None)
    return {"name": name, "dense_bf16_peak_tflops": peak}


def release_gpu() -> float:
    """Peak GPU memory of the engine just measured (GiB); frees it for the next one."""
    import gc

    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()  # the Trainer and its callbacks hold the model in reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m,demo")
    parser.add_argument("--data", default="mixed,single", help="single and/or mixed turns")
    parser.add_argument("--engines", default="hf-padded,kubetune,kubetune-noshare,kubetune-padded")
    parser.add_argument("--trl", action="store_true", help="also run TRL SFTTrainer packed")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per engine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from kubetune.demo_model import build_demo_model

    if opts.threads:
        torch.set_num_threads(opts.threads)
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    model_dir = build_demo_model(cache / "bench" / "demo-tiny", DATASET)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = opts.steps * opts.batch_size
    engines = opts.engines.split(",") + (["trl-packed"] if opts.trl else [])
    gpu = gpu_info()
    if "llama3-8b" in opts.shapes.split(",") and not gpu:
        raise SystemExit("llama3-8b is a GPU shape: 8B parameters in fp32 do not fit here")
    device = gpu["name"] if gpu else f"cpu ({platform.processor() or platform.machine()})"

    results: list[dict[str, Any]] = []
    for shape, data in itertools.product(opts.shapes.split(","), opts.data.split(",")):
        rows = load_examples(tokenizer, n, data)
        random.Random(opts.seed).shuffle(rows)
        lengths = [len(r["input_ids"]) for r in rows]
        row: dict[str, Any] = {
            "name": f"{shape}/{data}",
            "shape": shape,
            "device": device,
            "date": time.strftime("%Y-%m-%d"),
            "torch_threads": torch.get_num_threads(),
            "batch_size": opts.batch_size,
            "steps": opts.steps,
            "timed_steps": opts.steps - opts.warmup,
            "rounds": opts.rounds,
            "data": {
                "kind": data,
                "examples": len(rows),
                "tokens_mean": round(sum(lengths) / len(lengths), 1),
                "tokens_min": min(lengths),
                "tokens_max": max(lengths),
                "trained_fraction": round(
                    sum(sum(x != -100 for x in r["labels"]) for r in rows) / sum(lengths), 3
                ),
            },
            "attention": {},
            "runs": {},
        }
        # Engines take turns, round after round, so a change in machine load hits them alike.
        for _ in range(opts.rounds):
            for engine_name in engines:
                (wall, cpu), params, attn = measure(
                    shape, engine_name, model_dir, tokenizer, rows, opts
                )
                row["parameters"] = params
                row["attention"][engine_name] = attn
                run = {"wall": round(wall, 1), "cpu": round(cpu, 1)}
                if gpu:
                    run["peak_gpu_gib"] = release_gpu()
                row["runs"].setdefault(engine_name, []).append(run)
                print(
                    f"{shape} {data:6s} {engine_name:16s} {wall:9.1f} real tokens/s "
                    f"({cpu:9.1f} per CPU second)",
                    flush=True,
                )
        for clock in ("wall", "cpu"):
            key = "tokens_per_second" if clock == "wall" else "tokens_per_cpu_second"
            row[key] = {
                k: round(statistics.median(r[clock] for r in v), 1) for k, v in row["runs"].items()
            }
            medians = row[key]
            if "hf-padded" in medians and "kubetune" in medians:
                ratio = round(medians["kubetune"] / medians["hf-padded"], 2)
                row[f"speedup_{clock}"] = ratio
                print(f"{shape} {data:6s} kubetune / hf-padded = {ratio}x ({clock})", flush=True)
        tps_map = row["tokens_per_second"]
        if gpu and gpu["dense_bf16_peak_tflops"]:
            row["mfu"] = {
                k: round(4 * row["parameters"] * v / (gpu["dense_bf16_peak_tflops"] * 1e12), 4)
                for k, v in tps_map.items()
            }
        results.append(row)

    # Rows of other shapes, data or devices already in the file are kept: a CPU run and a
    # GPU run (or a slow shape run on its own) add up to one table.
    kept: list[dict[str, Any]] = []
    if opts.out.exists():
        previous = json.loads(opts.out.read_text())
        done = {(r["shape"], r["data"]["kind"], r["device"]) for r in results}
        kept = [
            r for r in previous.get("results", [])
            if (r["shape"], r["data"]["kind"], r["device"]) not in done
        ]  # fmt: skip
    report = {
        "benchmark": "trainer_throughput",
        "cpus": os.cpu_count(),
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data_source": "examples/data/daoyan.jsonl",
        "note": "real tokens = tokens of the examples, padding excluded, the same count for "
        "every engine; timed over the steps after warm-up; medians over rounds. "
        "tokens_per_cpu_second divides by the CPU time the process used (one torch thread), "
        "which other work on a shared machine inflates far less than wall-clock time "
        "(tokens_per_second)",
        "results": kept + results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
