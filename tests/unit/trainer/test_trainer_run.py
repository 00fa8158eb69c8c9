"""The run's guards: output folder ownership, finished-job detection, exit-note wording."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.result import RESULT_FILE, DataCounts, TrainingResult
from kubetune.trainer import dataset, run


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
    assert run.claim_output(cfg, tmp_path / "out", run.config_sha256(cfg)) is False
    owner = json.loads((tmp_path / "out" / run.JOB_FILE).read_text())
    assert owner == {"job": "team/j", "uid": "u1", "config_sha256": run.config_sha256(cfg)}
    # the same job again (a resumed pod) is welcome
    assert run.claim_output(cfg, tmp_path / "out", run.config_sha256(cfg)) is False


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


def test_a_finished_job_is_recognised(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sha = run.config_sha256(cfg)
    run.claim_output(cfg, tmp_path, sha)
    (tmp_path / RESULT_FILE).write_text(result_for(cfg).model_dump_json(by_alias=True))
    assert run.claim_output(cfg, tmp_path, sha) is True
    assert TrainingResult.load(tmp_path).config_sha256 == sha


def test_termination_line_names_the_first_bad_line() -> None:
    error = dataset.DataError(Path("/data/train.jsonl"), ["line 3: bad [not-json]", "line 9: x"])
    assert run.termination_line(error) == (
        "invalid data in train.jsonl: line 3: bad [not-json] (and 1 more)"
    )
    assert run.termination_line(ValueError("a\n  b")) == "a b"
