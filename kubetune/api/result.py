"""``result.json``: what a finished training run leaves next to its adapter.

The trainer writes it last (its presence means the run finished) into the output folder and,
in a cluster, into the progress ConfigMap under ``result.json``; the operator reads it into
``FineTuneJob.status`` and the server checks an adapter's base model and rank against it.
Imports only pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kubetune.api.types import ApiModel

RESULT_FILE = "result.json"


class DataCounts(ApiModel):
    examples: int = Field(description="Examples in the training file.")
    trained_examples: int = Field(description="Examples trained on (after dropping).")
    truncated: int = Field(
        default=0, description="Examples cut to `maxSeqLength` tokens (still trained on)."
    )
    dropped_too_long: int = Field(
        default=0, description="Examples longer than `maxSeqLength` left out (`truncation: drop`)."
    )
    dropped_no_target: int = Field(
        default=0,
        description="Examples left out because no assistant token is trained on in them "
        "(every assistant message has weight 0, or truncation cut them off).",
    )
    tokens_per_epoch: int = Field(default=0, description="Tokens of the trained examples.")
    target_tokens_per_epoch: int = Field(
        default=0, description="Of those, the assistant tokens the loss is computed on."
    )


class TrainingResult(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["TrainingResult"] = "TrainingResult"
    job: str = Field(description="`namespace/name` of the FineTuneJob.")
    job_uid: str = Field(description="UID of the FineTuneJob (or `local`).")
    base_model: str = Field(description="Base model as configured (hub id or folder).")
    base_model_revision: str | None = Field(default=None, description="Revision of a hub id.")
    method: str = Field(description="`lora` or `qlora`.")
    adapter_rank: int = Field(description="LoRA rank `r` of the adapter.")
    adapter_alpha: int = Field(description="LoRA alpha of the adapter.")
    target_modules: list[str] = Field(description="Adapted modules as configured.")
    chat_template: Literal["model", "fallback"] = Field(
        description="Whether the model's own chat template was used, or kubetune's fallback "
        "(then written next to the adapter as `chat_template.jinja`)."
    )
    dataset_sha256: str = Field(description="SHA-256 of the training file as read.")
    validation_sha256: str | None = Field(
        default=None, description="SHA-256 of the validation file."
    )
    config_sha256: str = Field(
        description="SHA-256 of the resolved trainer config (canonical JSON)."
    )
    data: DataCounts = Field(description="What happened to the examples.")
    epochs: int = Field(description="Epochs trained (after resolving `auto`).")
    batch_size: int = Field(description="Examples per optimizer step (after resolving `auto`).")
    steps: int = Field(description="Optimizer steps done.")
    total_steps: int = Field(description="Optimizer steps planned.")
    trained_tokens: int = Field(description="Real (non-padding) tokens processed in training.")
    final_train_loss: float | None = Field(default=None, description="Last logged training loss.")
    final_valid_loss: float | None = Field(default=None, description="Last validation loss.")
    wall_seconds: float = Field(description="Training wall time over all attempts, in seconds.")
    attempts: int = Field(default=1, description="Runs it took (1 + resumes after preemption).")
    finished_at: str = Field(description="When the run finished (RFC 3339).")

    @classmethod
    def load(cls, path: str | Path) -> TrainingResult:
        """Read ``result.json`` (a folder is taken to contain it)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
