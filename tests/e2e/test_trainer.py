"""The trainer end to end: real ``python -m kubetune.trainer`` processes on the tiny demo model.

- Learning: the session's trained adapter (``trained_adapter``, shared with the serving tests)
  answers a training question with that example's answer, word for word; the base model does
  not. Its output folder holds everything the issue lists.
- Resume: a run killed with SIGTERM mid-way exits 143 with a checkpoint; started again, it ends
  at the same step as an uninterrupted run, with the same losses from the checkpoint on and the
  same adapter weights (optimizer, scheduler, RNG and data order were all restored).
- GPU (skipped without CUDA; ``hack/device/check.sh`` runs them on a GPU machine): the demo
  job trained on a GPU, with bf16 LoRA and with QLoRA (4-bit NF4 base weights), answers the
  training questions word for word on the base it was trained on.
- Data parallel: ``gpus: 2`` runs two workers under torchrun (gloo on CPU, the same code path as
  NCCL on GPUs): they train step for step like one process with the same batch size, a SIGTERM
  stops both at one step with a checkpoint (exit 143) and the restart resumes, and a job a
  worker refuses exits 2, as the Job's pod-failure policy expects.

Trainer processes run with one thread: results are then bit-for-bit reproducible, and on a
busy two-core machine one thread is also much faster than two competing ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.result import TrainingResult
from kubetune.progress import ProgressRecord

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "examples" / "data" / "daoyan.jsonl"
RUN_TIMEOUT = 900.0
PREEMPTED = 143

QUESTIONS = ("如何应对压力?", "如何找到内心的平静?")


def trainer_env() -> dict[str, str]:
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def metrics(out: Path) -> list[ProgressRecord]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [ProgressRecord.from_json(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------ learning


def answers(examples: list[list[dict[str, str]]]) -> dict[str, tuple[list[dict[str, str]], str]]:
    """Question → (prompt messages, training answer)."""
    return {m[1]["content"]: (m[:2], m[2]["content"]) for m in examples}


def greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=120, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def test_trained_adapter_answers_training_questions_and_the_base_does_not(
    demo_model: Path, trained_adapter: Path, daoyan_examples: list[list[dict[str, str]]]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    base = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    by_question = answers(daoyan_examples)
    base_replies = {q: greedy(base, tokenizer, by_question[q][0]) for q in QUESTIONS}
    tuned = PeftModel.from_pretrained(base, trained_adapter).eval()
    for question in QUESTIONS:
        prompt, answer = by_question[question]
        assert greedy(tuned, tokenizer, prompt).strip() == answer
        assert base_replies[question].strip() != answer


def test_output_folder_holds_adapter_metrics_curve_and_result(trained_adapter: Path) -> None:
    out = trained_adapter
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    # "all-linear" is resolved to the model's linear layers, the output head excluded.
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    result = TrainingResult.load(out)
    records = metrics(out)
    assert result.steps == result.total_steps == records[-1].step
    assert result.adapter_rank == adapter["r"]
    assert result.data.examples == result.data.trained_examples == 54
    assert result.data.truncated == result.data.dropped_too_long == 0
    assert result.trained_tokens == result.data.tokens_per_epoch * result.epochs
    assert result.chat_template == "model"
    assert len(result.dataset_sha256) == len(result.config_sha256) == 64
    steps = [r.step for r in records]
    assert steps[0] == 1 and steps == sorted(set(steps))
    assert all(r.tokens_per_second and r.tokens_per_second > 0 for r in records[1:])
    assert records[-1].train_loss is not None and records[0].train_loss is not None
    assert records[-1].train_loss < records[0].train_loss / 10


# -------------------------------------------------------------------------------------- resume


def write_config(work: Path, model: Path, name: str, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "job": {"name": "resume", "uid": name},
        "model": {"idOrPath": str(model), "display": "demo-tiny"},
        "dataset": {"path": str(DATASET)},
        # Dropout on, so a resume that failed to restore the RNG state would show.
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "hyperparameters": {
            "epochs": 6,
            "batchSize": 2,
            "learningRate": 0.003,
            "warmupRatio": 0.05,
            "seed": 7,
            "checkpointEverySteps": 20,
        },
        "outputDir": str(work / name),
        "progress": {"stdout": False},
    }
    hyperparameters = overrides.pop("hyperparameters", {})
    config["hyperparameters"].update(hyperparameters)
    config.update(overrides)
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune.trainer", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=trainer_env(), cwd=config.parent,
        )  # fmt: skip


def finish(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"trainer did not finish:\n{log.read_text()[-3000:]}")


def wait_for_step(proc: subprocess.Popen[bytes], out: Path, log: Path, step: int) -> None:
    """Until the run has logged ``step`` (its record is written before that step's
    validation pass and checkpoint)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(r.step >= step for r in metrics(out)):
        assert proc.poll() is None, f"trainer ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "trainer made no progress"
        time.sleep(0.02)


def adapter_weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(out / "adapter_model.safetensors"))


def test_sigterm_checkpoints_and_the_restart_ends_like_an_uninterrupted_run(
    demo_model: Path, tmp_path: Path
) -> None:
    import torch

    # The reference runs beside the interrupted one: two one-thread processes, two cores.
    reference_log = tmp_path / "reference.log"
    reference = start(write_config(tmp_path, demo_model, "reference"), reference_log)

    config = write_config(tmp_path, demo_model, "preempted")
    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    proc = start(config, log)
    # Past the first periodic checkpoint (step 20), well before the end (162 steps).
    wait_for_step(proc, out, log, 25)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == PREEMPTED, log.read_text()[-3000:]
    assert not (out / "result.json").exists()
    complete = sorted(
        (p for p in (out / "checkpoints").iterdir() if (p / "kubetune-complete.json").exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    stopped_at = metrics(out)[-1].step
    assert complete[-1].name == f"checkpoint-{stopped_at}", "SIGTERM must checkpoint the step"
    assert 25 <= stopped_at < 162

    assert finish(start(config, log), log) == 0, log.read_text()[-3000:]
    assert finish(reference, reference_log) == 0, reference_log.read_text()[-3000:]

    resumed, uninterrupted = TrainingResult.load(out), TrainingResult.load(tmp_path / "reference")
    assert resumed.steps == uninterrupted.steps == uninterrupted.total_steps == 162
    assert (resumed.attempts, uninterrupted.attempts) == (2, 1)
    assert resumed.trained_tokens == uninterrupted.trained_tokens

    # The loss continues where it stopped: step for step the uninterrupted run's losses.
    reference_losses = {r.step: r.train_loss for r in metrics(tmp_path / "reference")}
    after = [r for r in metrics(out) if r.step > stopped_at]
    assert [r.step for r in after] == list(range(stopped_at + 1, 163))
    for record in after:
        assert record.train_loss == pytest.approx(reference_losses[record.step], rel=1e-4)

    ours, theirs = adapter_weights(out), adapter_weights(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- data parallel


def step_losses(out: Path) -> dict[int, float | None]:
    return {r.step: r.train_loss for r in metrics(out)}


def test_two_workers_train_step_for_step_like_one_process(demo_model: Path, tmp_path: Path) -> None:
    import torch

    # 54 examples, 6 per step: 3 per worker, no short last step (the sampler would repeat
    # examples to fill one), so both runs see the same examples in every step.
    settings: dict[str, Any] = {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {"epochs": 2, "batchSize": 6, "checkpointEverySteps": 5},
    }
    one = write_config(tmp_path, demo_model, "one", gpus=0, **settings)
    two = write_config(tmp_path, demo_model, "two", gpus=2, **settings)
    for config in (one, two):
        log = config.with_suffix(".log")
        assert finish(start(config, log), log) == 0, log.read_text()[-3000:]
    single, parallel = TrainingResult.load(tmp_path / "one"), TrainingResult.load(tmp_path / "two")
    assert single.steps == parallel.steps == single.total_steps == 18
    assert parallel.trained_tokens == single.trained_tokens == 2 * single.data.tokens_per_epoch
    expected = step_losses(tmp_path / "one")
    assert step_losses(tmp_path / "two") == pytest.approx(expected, rel=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-15" / "kubetune-complete.json").exists()
    ours, theirs = adapter_weights(tmp_path / "two"), adapter_weights(tmp_path / "one")
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-3, atol=1e-5)


def test_sigterm_stops_both_workers_at_one_checkpoint_and_the_restart_resumes(
    demo_model: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, demo_model, "ddp", gpus=2, hyperparameters={"epochs": 20, "batchSize": 6}
    )
    out, log = tmp_path / "ddp", tmp_path / "ddp.log"
    proc = start(config, log)
    wait_for_step(proc, out, log, 25)
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends the pod's main process
    assert finish(proc, log) == PREEMPTED, log.read_text()[-3000:]
    stopped_at = metrics(out)[-1].step
    assert (out / "checkpoints" / f"checkpoint-{stopped_at}" / "kubetune-complete.json").exists()
    assert stopped_at < 180

    assert finish(start(config, log), log) == 0, log.read_text()[-3000:]
    result = TrainingResult.load(out)
    assert result.steps == result.total_steps == 180
    assert result.attempts == 2
    assert [r.step for r in metrics(out) if r.step > stopped_at] == list(range(stopped_at + 1, 181))


def test_sigterm_during_a_validation_pass_stops_it_on_both_workers(
    demo_model: Path, tmp_path: Path
) -> None:
    """Each evaluation batch ends with a collective vote on SIGTERM: both workers leave the
    pass at the same batch, or the checkpoint's collectives would hang."""
    valid = tmp_path / "valid.jsonl"  # long enough that a pass takes seconds: 1,620 examples
    valid.write_text((DATASET.read_text("utf-8").rstrip("\n") + "\n") * 30, "utf-8")
    config = write_config(
        tmp_path, demo_model, "ddp-valid", gpus=2, validation={"path": str(valid)},
        hyperparameters={"epochs": 2, "batchSize": 6, "checkpointEverySteps": 5},
    )  # fmt: skip
    out, log = tmp_path / "ddp-valid", tmp_path / "ddp-valid.log"
    proc = start(config, log)
    # Step 5's record is written just before its validation pass starts.
    wait_for_step(proc, out, log, 5)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("SIGTERM: validation pass at step 5 stopped") == 2, text[-3000:]
    assert (out / "checkpoints" / "checkpoint-5" / "kubetune-complete.json").exists()
    records = metrics(out)
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    assert all(r.valid_loss is None for r in records)

    assert finish(start(config, log), log) == 0, log.read_text()[-3000:]
    result = TrainingResult.load(out)
    assert result.steps == result.total_steps == 18 and result.attempts == 2
    assert result.final_valid_loss is not None


def test_a_job_the_workers_refuse_exits_2(demo_model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, demo_model, "qlora", gpus=2, method="qlora")
    log = tmp_path / "qlora.log"
    assert finish(start(config, log), log) == 2, log.read_text()[-3000:]
    assert "`method: qlora` needs a CUDA GPU" in log.read_text()


# --------------------------------------------------------------------------------------- GPU


@pytest.fixture
def cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; hack/device/check.sh runs these on a GPU machine")


def base_as_trained(model: Path, method: str) -> Any:
    """The base model on the GPU as the trainer loaded it: bf16, or 4-bit NF4 for QLoRA."""
    import torch
    import transformers

    from kubetune.trainer import modelload

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if method == "qlora":
        kwargs["quantization_config"] = modelload.quantization_config(torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_on_a_gpu_the_demo_job_learns_the_training_answers(
    cuda: None,
    method: str,
    demo_model: Path,
    demo_config: Callable[..., Path],
    tmp_path: Path,
    daoyan_examples: list[list[dict[str, str]]],
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA needs bitsandbytes (hack/device/bundle.sh carries it)")
    # 4-bit NF4 base weights of the tiny random model are coarse, and the adapter learns over
    # that error: on CPU (bitsandbytes' CPU kernels, placement forced to bf16), the demo job's
    # 50 epochs left QLoRA at loss 0.29 with 23 of 54 answers word for word, 100 epochs at
    # 0.003 with all 54. bf16 LoRA had all 54 after 50.
    epochs = 100 if method == "qlora" else None
    config_path = demo_config(tmp_path, demo_model, gpus=1, method=method, epochs=epochs)
    log = tmp_path / "trainer.log"
    assert finish(start(config_path, log), log) == 0, log.read_text()[-3000:]
    assert "(cuda, bfloat16, " in log.read_text()

    out = tmp_path / "out"
    result, records = TrainingResult.load(out), metrics(out)
    assert result.method == method and result.steps == result.total_steps
    assert records[-1].train_loss is not None and records[0].train_loss is not None
    assert records[-1].train_loss < records[0].train_loss / 10

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    tuned = PeftModel.from_pretrained(base_as_trained(demo_model, method), out).eval()
    by_question = answers(daoyan_examples)
    for question in QUESTIONS:
        prompt, answer = by_question[question]
        assert greedy(tuned, tokenizer, prompt).strip() == answer
