"""The run's guards and bookkeeping: exit-note wording, validation data, packing refusal; and, on
the demo model, that validation runs once at the end and a resumed run's metrics hold every step
once. Output folder ownership is in test_trainer_ownership.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import transformers

from kubetune import demo_model
from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.result import RESULT_FILE, TrainingResult
from kubetune.trainer import checkpoints, dataset, reporting, run

DATASET = demo_model.DEFAULT_DATASET


def config(out: Path, **hp: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": "j", "namespace": "team", "uid": "u1"},
            "model": {"idOrPath": "/m", "display": "m"},
            "dataset": {"path": "/d.jsonl"},
            "outputDir": str(out),
            "hyperparameters": hp,
        }
    )


def test_termination_line_names_the_first_bad_line() -> None:
    error = dataset.DataError(Path("/data/train.jsonl"), ["line 3: bad [not-json]", "line 9: x"])
    assert run.termination_line(error) == (
        "invalid data in train.jsonl: line 3: bad [not-json] (and 1 more)"
    )
    assert run.termination_line(ValueError("a\n  b")) == "a b"


def test_packing_is_turned_off_with_one_line_for_a_model_that_cannot_pack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    packed = config(tmp_path)
    sliding = transformers.MistralConfig(num_hidden_layers=2, sliding_window=8)
    with caplog.at_level(logging.INFO, logger="kubetune.trainer.run"):
        assert run.use_packing(packed, sliding) is False
    assert [r.getMessage() for r in caplog.records] == [
        "packing off: mistral attends through a sliding window of 8 tokens; "
        "training with padded batches"
    ]
    assert run.use_packing(packed, transformers.LlamaConfig(num_hidden_layers=2)) is True
    unpacked = config(tmp_path, packing=False)
    assert run.use_packing(unpacked, transformers.LlamaConfig(num_hidden_layers=2)) is False


# ------------------------------------------------------------------- on the demo model


def chat_line(user: str, answer: str) -> str:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def demo_config(tmp_path: Path, model: Path, **fields: Any) -> TrainerConfig:
    hyperparameters = {
        "epochs": 1, "batchSize": 4, "learningRate": 3e-3, "seed": 7, "checkpointEverySteps": 5,
    }  # fmt: skip
    hyperparameters.update(fields.pop("hyperparameters", {}))
    return TrainerConfig.model_validate(
        {
            "job": {"name": "demo", "uid": "u1"},
            "model": {"idOrPath": str(model), "display": "demo"},
            "dataset": {"path": str(DATASET)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": hyperparameters,
            "outputDir": str(tmp_path / "out"),
            "progress": {"stdout": False},
            **fields,
        }
    )


def test_dropped_validation_lines_are_logged_and_none_left_is_an_invalid_job(
    tmp_path: Path, demo_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(chat_line(f"问{i}", "答") for i in range(4)) + "\n")
    # Longer than maxSeqLength: truncation cuts the answer off, nothing is left to validate on.
    long = chat_line("问" * 200, "答")
    valid = tmp_path / "valid.jsonl"
    valid.write_text(f"{chat_line('问', '答')}\n{long}\n")
    cfg = demo_config(
        tmp_path, demo_model_dir, dataset={"path": str(train)}, validation={"path": str(valid)},
        hyperparameters={"maxSeqLength": 64},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kubetune.trainer.run"):
        prepared = run.prepare(cfg, run.read_data(cfg, tmp_path / "out"))
    assert len(prepared.valid_examples) == 1
    assert "dropped validation examples (line numbers): [2]" in caplog.messages

    valid.write_text(f"{long}\n{long.replace('答', '答!')}\n")
    with pytest.raises(dataset.DataError) as info:
        run.prepare(cfg, run.read_data(cfg, tmp_path / "out"))
    assert run.termination_line(info.value) == (
        "invalid data in valid.jsonl: file: none of its 2 examples is left to validate on "
        "(0 longer than `maxSeqLength`, 2 with no assistant token to train on)"
    )


def write_config(tmp_path: Path, cfg: TrainerConfig) -> str:
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(cfg.to_wire()))
    return str(path)


def test_validation_runs_once_at_the_last_step(tmp_path: Path, demo_model_dir: Path) -> None:
    cfg = demo_config(tmp_path, demo_model_dir, validation={"path": str(DATASET)})
    assert run.main(write_config(tmp_path, cfg)) == 0
    records = reporting.read_metrics(tmp_path / "out" / reporting.METRICS_FILE)
    last = TrainingResult.load(tmp_path / "out").steps
    assert last == 14  # 54 examples, 4 a step; evaluated at 5, 10 and the last step
    at_last = [r for r in records if r.step == last]
    # the step's training record, then its one validation record
    assert len(at_last) == 2 and at_last[0].valid_loss != at_last[1].valid_loss


def test_the_last_step_is_recorded_when_it_is_off_the_logging_grid(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a run of more than 200 steps logs (every total // 200 steps), on 14 steps.
    monkeypatch.setattr(run, "logging_interval", lambda total: 4)
    assert run.main(write_config(tmp_path, demo_config(tmp_path, demo_model_dir))) == 0
    records = reporting.read_metrics(tmp_path / "out" / reporting.METRICS_FILE)
    assert [r.step for r in records] == [1, 4, 8, 12, 14]
    result = TrainingResult.load(tmp_path / "out")
    assert result.steps == 14 and result.final_train_loss == records[-1].train_loss


def test_a_run_killed_after_a_checkpoint_resumes_with_each_step_logged_once(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(DATASET, data)
    cfg = demo_config(tmp_path, demo_model_dir, dataset={"path": str(data)})
    config_path, out = write_config(tmp_path, cfg), tmp_path / "out"
    assert run.main(config_path) == 0
    # As if killed (SIGKILL, OOM) at step 14 before its checkpoint and result were written,
    # mid-way through a metrics line: checkpoint-10 is the newest complete one.
    (out / RESULT_FILE).unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-14")
    with (out / reporting.METRICS_FILE).open("a") as metrics:
        metrics.write('{"step": 15, "total_st')
    assert checkpoints.newest(out / "checkpoints") == out / "checkpoints" / "checkpoint-10"

    assert run.main(config_path) == 0
    steps = [r.step for r in reporting.read_metrics(out / reporting.METRICS_FILE)]
    assert steps == list(range(1, 15))
    assert TrainingResult.load(out).attempts == 2

    # The same job on an edited file is neither resumed nor reported done.
    with data.open("a") as lines:
        lines.write(chat_line("新问题", "新答案") + "\n")
    assert run.main(config_path) == 2


def test_a_run_resumed_from_its_final_checkpoint_reports_the_same_final_loss(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    cfg = demo_config(tmp_path, demo_model_dir)
    config_path, out = write_config(tmp_path, cfg), tmp_path / "out"
    assert run.main(config_path) == 0
    first = TrainingResult.load(out)
    assert first.final_train_loss is not None
    # As if killed after the final checkpoint, before result.json: no step is left to train.
    (out / RESULT_FILE).unlink()
    assert run.main(config_path) == 0
    again = TrainingResult.load(out)
    assert again.attempts == 2 and again.steps == first.steps
    assert again.final_train_loss == first.final_train_loss


def sigterm_once(when: Any) -> Any:
    """A method wrapper that sends this process SIGTERM the first time ``when(trainer)``."""
    sent: list[int] = []

    def wrap(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not sent and when(self):
                sent.append(self.state.global_step)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # the handler runs in this thread, at the next bytecode
            return original(self, *args, **kwargs)

        return method

    wrap.sent = sent  # type: ignore[attr-defined]
    return wrap


def test_sigterm_during_a_validation_pass_stops_it_and_checkpoints(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer import engine

    cfg = demo_config(tmp_path, demo_model_dir, validation={"path": str(DATASET)})
    config_path, out = write_config(tmp_path, cfg), tmp_path / "out"
    batches: list[int] = []
    original = engine.KubetuneTrainer.prediction_step

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(self.state.global_step)
        return original(self, *args, **kwargs)

    wrap = sigterm_once(lambda trainer: True)
    monkeypatch.setattr(engine.KubetuneTrainer, "prediction_step", wrap(counted))
    assert run.main(config_path) == 143
    assert wrap.sent == [5]  # the first validation pass, at the first checkpoint step
    assert batches == [5], "the pass went on after SIGTERM"  # 54 examples: 14 batches in all
    assert checkpoints.newest(out / "checkpoints") == out / "checkpoints" / "checkpoint-5"
    records = reporting.read_metrics(out / reporting.METRICS_FILE)
    assert [r.step for r in records] == [1, 2, 3, 4, 5]  # no validation record, no step 6
    assert all(r.valid_loss is None for r in records)
    assert not (out / RESULT_FILE).exists()

    monkeypatch.undo()
    assert run.main(config_path) == 0
    result = TrainingResult.load(out)
    assert result.steps == 14 and result.final_valid_loss is not None


def test_sigterm_on_the_last_step_skips_the_final_validation_and_the_restart_does_it(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer import engine

    cfg = demo_config(tmp_path, demo_model_dir, validation={"path": str(DATASET)})
    config_path, out = write_config(tmp_path, cfg), tmp_path / "out"
    wrap = sigterm_once(lambda trainer: trainer.state.global_step == 13)  # computing step 14
    monkeypatch.setattr(
        engine.KubetuneTrainer, "training_step", wrap(engine.KubetuneTrainer.training_step)
    )
    assert run.main(config_path) == 143
    assert checkpoints.newest(out / "checkpoints") == out / "checkpoints" / "checkpoint-14"
    records = reporting.read_metrics(out / reporting.METRICS_FILE)
    assert [r.step for r in records if r.step == 14] == [14]  # trained, not validated
    last_train_loss = records[-1].train_loss
    assert not (out / RESULT_FILE).exists()

    monkeypatch.undo()
    assert run.main(config_path) == 0
    result = TrainingResult.load(out)
    assert result.attempts == 2 and result.steps == 14
    assert result.final_train_loss == last_train_loss and result.final_valid_loss is not None
