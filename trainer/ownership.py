"""Who owns a job's output folder: the job (name and uid), its config and its data.

A trainer claims the folder before it writes anything there, records the data's digests with
the claim, and refuses a folder of another job, of another config of this job, or of data that
changed since the run started: resuming such a run would mix two trainings. A finished result is
recognised as this run's only for the same config and the same data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.result import RESULT_FILE, TrainingResult

JOB_FILE = "trainer-job.json"
"""Which job owns the output folder; a different job is refused."""


class OutputConflict(RuntimeError):
    """The output folder belongs to another job or to another config of this job."""


def config_sha256(config: TrainerConfig) -> str:
    canonical = json.dumps(config.to_wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def claim_output(config: TrainerConfig, output_dir: Path, sha: str, *, write: bool = True) -> None:
    """Take ownership of ``output_dir`` for this job and config, before anything is written there.

    Only the main process writes (``write``); every process reads the same answer.
    """
    owner_path = output_dir / JOB_FILE
    mine = {"job": f"{config.job.namespace}/{config.job.name}", "uid": config.job.uid}
    if owner_path.exists():
        owner = json.loads(owner_path.read_text(encoding="utf-8"))
        if (owner.get("job"), owner.get("uid")) != (mine["job"], mine["uid"]):
            raise OutputConflict(
                f"{output_dir} belongs to job {owner.get('job')} (uid {owner.get('uid')}); "
                "refusing to overwrite another job's outputs"
            )
        if owner.get("config_sha256") != sha:
            raise OutputConflict(
                f"{output_dir} holds a run of this job with a different config; "
                "resuming it with this one would mix two trainings"
            )
    elif write:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(owner_path, {**mine, "config_sha256": sha})


@dataclass(frozen=True)
class DataDigests:
    """SHA-256 of the files as read: the config names them, only this says what they hold."""

    dataset_sha256: str
    validation_sha256: str | None

    def changed_from(self, dataset_sha256: Any, validation_sha256: Any) -> str | None:
        """Which file differs from the recorded digests, if any."""
        if dataset_sha256 != self.dataset_sha256:
            return "the training file"
        if validation_sha256 != self.validation_sha256:
            return "the validation file"
        return None


def claim_data(output_dir: Path, data: DataDigests, *, write: bool = True) -> None:
    """Record the data's digests with the folder's owner, or refuse data that changed since:
    a resumed run would replay another dataset's sample order from the checkpoint."""
    owner_path = output_dir / JOB_FILE
    if not owner_path.exists():  # a worker that read before the main process wrote
        return
    owner = json.loads(owner_path.read_text(encoding="utf-8"))
    if "dataset_sha256" not in owner:
        if write:
            _write_json(owner_path, {**owner, **asdict(data)})
        return
    changed = data.changed_from(owner["dataset_sha256"], owner.get("validation_sha256"))
    if changed is not None:
        raise OutputConflict(
            f"{output_dir} holds a run of this job on different data: {changed} changed since "
            "it started; resuming it would mix two trainings (use a new output folder)"
        )


def already_finished(output_dir: Path, sha: str, data: DataDigests) -> bool:
    """True if ``result.json`` is this config's, trained on this data; refused if the data
    changed (it would be reported done for data it never saw)."""
    result_path = output_dir / RESULT_FILE
    if not result_path.exists():
        return False
    try:
        result = TrainingResult.load(result_path)
    except ValueError:
        return False
    if result.config_sha256 != sha:
        return False
    changed = data.changed_from(result.dataset_sha256, result.validation_sha256)
    if changed is not None:
        raise OutputConflict(
            f"{output_dir} holds this job's finished result, but {changed} changed since it "
            "was trained; it is not the result of this data (use a new output folder)"
        )
    return True
