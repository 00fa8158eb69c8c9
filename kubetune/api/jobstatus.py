"""The FineTuneJob's status: what the operator writes and ``kubectl get ftj`` shows.

The spec, what a team writes, is :mod:`kubetune.api.finetunejob`; both become the one CRD
(``make crds``), and every ``Field(description=...)`` here is what ``kubectl explain
ftj.status...`` prints.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from kubetune.api.types import ApiModel


class Phase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


class Condition(ApiModel):
    type: str = Field(
        max_length=316,
        description="Condition type: `Ready`, `ServingReady`, or `Reconciled` (present, False, "
        "only while the operator retries a step that failed for a passing reason).",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time.")
    observed_generation: int | None = Field(default=None, description="Spec generation seen.")


class Progress(ApiModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps in all.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    train_loss: float | None = Field(default=None, description="Latest training loss.")
    valid_loss: float | None = Field(default=None, description="Latest validation loss.")
    tokens_per_second: float | None = Field(default=None, description="Real (non-pad) tokens/s.")
    eta: str | None = Field(default=None, description="Estimated finish time (RFC 3339).")
    summary: str | None = Field(default=None, description="`step/total (pct%)`, for printing.")


class AdapterStatus(ApiModel):
    path: str = Field(description="Where the adapter was written (`pvc://claim/path`).")
    rank: int = Field(description="LoRA rank of the adapter.")
    base_model: str = Field(description="Base model the adapter belongs to.")


class EndpointStatus(ApiModel):
    base_url: str = Field(
        alias="baseURL", description="OpenAI-compatible base URL (`OPENAI_BASE_URL`)."
    )
    model: str = Field(description="Model name clients send (`OPENAI_MODEL`).")
    config_map: str = Field(description="ConfigMap with both, for `envFrom`.")


class Estimate(ApiModel):
    examples: int = Field(description="Examples in the training file.")
    epochs: int = Field(description="Epochs after resolving `auto`.")
    total_tokens: int | None = Field(default=None, description="Tokens per epoch.")
    billed_tokens: int | None = Field(default=None, description="Billed training tokens.")
    cost_usd: float | None = Field(default=None, description="Estimated cost in US dollars.")
    total_steps: int | None = Field(default=None, description="Estimated optimizer steps.")
    gpu_hours: float | None = Field(default=None, description="Estimated GPU hours (local).")
    tokens_exact: bool | None = Field(
        default=None,
        description="Whether the token counts are exact (tiktoken, or the model's tokenizer and "
        "chat template); false: the labelled approximation of about 4 characters per token.",
    )


class RemoteJob(ApiModel):
    id: str | None = Field(default=None, description="OpenAI fine-tuning job id.")
    status: str | None = Field(default=None, description="Status as OpenAI reports it.")
    training_file: str | None = Field(default=None, description="Uploaded training file id.")
    validation_file: str | None = Field(default=None, description="Uploaded validation file id.")
    estimated_finish: str | None = Field(default=None, description="OpenAI's ETA (RFC 3339).")
    last_event_id: str | None = Field(default=None, description="Newest event already applied.")


class FineTuneJobStatus(ApiModel):
    phase: Phase = Field(default=Phase.PENDING, description="Where the job is in its life.")
    message: str | None = Field(
        default=None, max_length=32768, description="What is wrong, or what the job waits for."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    model: str | None = Field(default=None, description="Base model being tuned.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    estimate: Estimate | None = Field(default=None, description="Dataset-based estimate.")
    trained_tokens: int | None = Field(default=None, description="Tokens trained on.")
    cost_usd: float | None = Field(default=None, description="Actual cost (provider `openai`).")
    start_time: str | None = Field(default=None, description="When training was launched.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    adapter: AdapterStatus | None = Field(default=None, description="The adapter written.")
    fine_tuned_model: str | None = Field(default=None, description="Name clients use.")
    endpoint: EndpointStatus | None = Field(default=None, description="Where it is served.")
    remote: RemoteJob | None = Field(
        default=None, description="The OpenAI job (provider `openai`)."
    )
    trainer_job: str | None = Field(default=None, description="Name of the trainer batch Job.")
    observed_generation: int | None = Field(
        default=None, description="Last spec generation handled."
    )
