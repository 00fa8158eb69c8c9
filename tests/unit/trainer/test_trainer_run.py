"""The run's guards and bookkeeping: output folder ownership (job, config and data), finished-job
detection, exit-note wording, validation data, packing refusal; and, on the demo model, that
validation runs once at the end and a resumed run's metrics hold every step once."""

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
from kubetune.api.result import RESULT_FILE, DataCounts, TrainingResult
from kubetune.trainer import checkpoints, dataset, reporting, run

DATASET = demo_model.DEFAULT_DATASET


def config(out: Path, uid: str = "u1", **hp: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": "j", "namespace": "team", "uid": uid},
            "model": {"idOrPath": "/m", "display": "m"},
            "dataset": {"path": "/d.jsonl"},
            "outputDir": str(out),
            "hyperparameters": hp,
        }
    )


def result_for(cfg: TrainerConfig) -> TrainingResult:
    return TrainingResult(
        job="team/j", job_uid=cfg.job.uid, base_model="/m", method="lora", adapter_rank=16,
        adapter_alpha=32, target_modules=["all-linear"], chat_template="model",
        dataset_sha256="0" * 64, config_sha256=run.config_sha256(cfg),
        data=DataCounts(examples=1, trained_examples=1), epochs=1, batch_size=1, steps=1,
        total_steps=1, trained_tokens=10, wall_seconds=1.0, finished_at="2026-01-01T00:00:00Z",
    )  # fmt: skip


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a, b = config(tmp_path, seed=1), config(tmp_path, seed=1)
    assert run.config_sha256(a) == run.config_sha256(b)
    assert run.config_sha256(a) != run.config_sha256(config(tmp_path, seed=2))


def test_first_run_claims_the_folder(tmp_path: Path) -> None:
    cfg = config(tmp_path / "out")
    run.claim_output(cfg, tmp_path / "out", run.config_sha256(cfg))
    owner = json.loads((tmp_path / "out" / run.JOB_FILE).read_text())
    assert owner == {"job": "team/j", "uid": "u1", "config_sha256": run.config_sha256(cfg)}
    # the same job again (a resumed pod) is welcome
    run.claim_output(cfg, tmp_path / "out", run.config_sha256(cfg))


def test_another_jobs_folder_is_refused(tmp_path: Path) -> None:
    mine = config(tmp_path, uid="u1")
    run.claim_output(mine, tmp_path, run.config_sha256(mine))
    other = config(tmp_path, uid="u2")
    with pytest.raises(run.OutputConflict, match="belongs to job team/j \\(uid u1\\)"):
        run.claim_output(other, tmp_path, run.config_sha256(other))


def test_a_changed_config_does_not_resume_an_old_run(tmp_path: Path) -> None:
    first = config(tmp_path, learningRate=1e-4)
    run.claim_output(first, tmp_path, run.config_sha256(first))
    changed = config(tmp_path, learningRate=2e-4)
    with pytest.raises(run.OutputConflict, match="different config"):
        run.claim_output(changed, tmp_path, run.config_sha256(changed))


DATA = run.DataDigests(dataset_sha256="0" * 64, validation_sha256=None)


def test_a_finished_job_is_recognised(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sha = run.config_sha256(cfg)
    run.claim_output(cfg, tmp_path, sha)
    assert run.already_finished(tmp_path, sha, DATA) is False
    (tmp_path / RESULT_FILE).write_text(result_for(cfg).model_dump_json(by_alias=True))
    assert run.already_finished(tmp_path, sha, DATA) is True
    other = config(tmp_path, seed=9)  # another config's result is not this one's
    assert run.already_finished(tmp_path, run.config_sha256(other), DATA) is False


def test_the_data_is_recorded_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run.claim_output(cfg, tmp_path, run.config_sha256(cfg))
    run.claim_data(tmp_path, DATA)
    owner = json.loads((tmp_path / run.JOB_FILE).read_text())
    assert (owner["dataset_sha256"], owner["validation_sha256"]) == ("0" * 64, None)
    run.claim_data(tmp_path, DATA)  # the same data again: a resume
    edited = run.DataDigests(dataset_sha256="1" * 64, validation_sha256=None)
    with pytest.raises(run.OutputConflict, match="different data: the training file changed"):
        run.claim_data(tmp_path, edited)
    added = run.DataDigests(dataset_sha256="0" * 64, validation_sha256="2" * 64)
    with pytest.raises(run.OutputConflict, match="the validation file changed"):
        run.claim_data(tmp_path, added)


def test_a_finished_result_of_other_data_is_not_reported_done(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sha = run.config_sha256(cfg)
    run.claim_output(cfg, tmp_path, sha)  # an owner record without digests (older trainer)
    (tmp_path / RESULT_FILE).write_text(result_for(cfg).model_dump_json(by_alias=True))
    edited = run.DataDigests(dataset_sha256="1" * 64, validation_sha256=None)
    run.claim_data(tmp_path, edited)
    with pytest.raises(run.OutputConflict, match="the training file changed since it was trained"):
        run.already_finished(tmp_path, sha, edited)


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
