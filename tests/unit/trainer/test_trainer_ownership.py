"""Output folder ownership: the job, its config and its data claim the folder, and a finished
result counts only for the same config and data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.result import RESULT_FILE, DataCounts, TrainingResult
from kubetune.trainer import ownership


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
        dataset_sha256="0" * 64, config_sha256=ownership.config_sha256(cfg),
        data=DataCounts(examples=1, trained_examples=1), epochs=1, batch_size=1, steps=1,
        total_steps=1, trained_tokens=10, wall_seconds=1.0, finished_at="2026-01-01T00:00:00Z",
    )  # fmt: skip


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a, b = config(tmp_path, seed=1), config(tmp_path, seed=1)
    assert ownership.config_sha256(a) == ownership.config_sha256(b)
    assert ownership.config_sha256(a) != ownership.config_sha256(config(tmp_path, seed=2))


def test_first_run_claims_the_folder(tmp_path: Path) -> None:
    cfg = config(tmp_path / "out")
    ownership.claim_output(cfg, tmp_path / "out", ownership.config_sha256(cfg))
    owner = json.loads((tmp_path / "out" / ownership.JOB_FILE).read_text())
    assert owner == {"job": "team/j", "uid": "u1", "config_sha256": ownership.config_sha256(cfg)}
    # the same job again (a resumed pod) is welcome
    ownership.claim_output(cfg, tmp_path / "out", ownership.config_sha256(cfg))


def test_another_jobs_folder_is_refused(tmp_path: Path) -> None:
    mine = config(tmp_path, uid="u1")
    ownership.claim_output(mine, tmp_path, ownership.config_sha256(mine))
    other = config(tmp_path, uid="u2")
    with pytest.raises(ownership.OutputConflict, match="belongs to job team/j \\(uid u1\\)"):
        ownership.claim_output(other, tmp_path, ownership.config_sha256(other))


def test_a_changed_config_does_not_resume_an_old_run(tmp_path: Path) -> None:
    first = config(tmp_path, learningRate=1e-4)
    ownership.claim_output(first, tmp_path, ownership.config_sha256(first))
    changed = config(tmp_path, learningRate=2e-4)
    with pytest.raises(ownership.OutputConflict, match="different config"):
        ownership.claim_output(changed, tmp_path, ownership.config_sha256(changed))


DATA = ownership.DataDigests(dataset_sha256="0" * 64, validation_sha256=None)


def test_a_finished_job_is_recognised(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sha = ownership.config_sha256(cfg)
    ownership.claim_output(cfg, tmp_path, sha)
    assert ownership.already_finished(tmp_path, sha, DATA) is False
    (tmp_path / RESULT_FILE).write_text(result_for(cfg).model_dump_json(by_alias=True))
    assert ownership.already_finished(tmp_path, sha, DATA) is True
    other = config(tmp_path, seed=9)  # another config's result is not this one's
    assert ownership.already_finished(tmp_path, ownership.config_sha256(other), DATA) is False


def test_the_data_is_recorded_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ownership.claim_output(cfg, tmp_path, ownership.config_sha256(cfg))
    ownership.claim_data(tmp_path, DATA)
    owner = json.loads((tmp_path / ownership.JOB_FILE).read_text())
    assert (owner["dataset_sha256"], owner["validation_sha256"]) == ("0" * 64, None)
    ownership.claim_data(tmp_path, DATA)  # the same data again: a resume
    edited = ownership.DataDigests(dataset_sha256="1" * 64, validation_sha256=None)
    with pytest.raises(ownership.OutputConflict, match="different data: the training file changed"):
        ownership.claim_data(tmp_path, edited)
    added = ownership.DataDigests(dataset_sha256="0" * 64, validation_sha256="2" * 64)
    with pytest.raises(ownership.OutputConflict, match="the validation file changed"):
        ownership.claim_data(tmp_path, added)


def test_a_finished_result_of_other_data_is_not_reported_done(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sha = ownership.config_sha256(cfg)
    ownership.claim_output(cfg, tmp_path, sha)  # an owner record without digests (older trainer)
    (tmp_path / RESULT_FILE).write_text(result_for(cfg).model_dump_json(by_alias=True))
    edited = ownership.DataDigests(dataset_sha256="1" * 64, validation_sha256=None)
    ownership.claim_data(tmp_path, edited)
    with pytest.raises(
        ownership.OutputConflict, match="the training file changed since it was trained"
    ):
        ownership.already_finished(tmp_path, sha, edited)
