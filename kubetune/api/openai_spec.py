"""The ``openai`` section of a FineTuneJob's spec (``provider: openai``): the base model, where
the API key is read from, OpenAI's hyperparameters, and the API the key may be sent to.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.types import (
    AUTO,
    ApiModel,
    BatchSizeOrAuto,
    ConfigKey,
    DNSName,
    EpochsOrAuto,
    FloatOrAuto,
)


class OpenAIKeyRef(ApiModel):
    name: DNSName = Field(
        description="Secret holding the OpenAI credentials. It must carry the label "
        "`kubetune.io/credentials: openai`: the operator reads no other Secret."
    )
    key: ConfigKey = Field(default="api-key", description="Key of the API key in the Secret.")
    organization_key: ConfigKey | None = Field(
        default=None, description="Key of the organization id in the Secret, if any."
    )
    project_key: ConfigKey | None = Field(
        default=None, description="Key of the project id in the Secret, if any."
    )


class OpenAIHyperparameters(ApiModel):
    n_epochs: EpochsOrAuto = Field(default=AUTO, description='Epochs, or "auto".')
    batch_size: BatchSizeOrAuto = Field(default=AUTO, description='Batch size, or "auto".')
    learning_rate_multiplier: FloatOrAuto = Field(
        default=AUTO, description='Learning-rate multiplier as a string such as "0.5", or "auto".'
    )
    beta: FloatOrAuto | None = Field(
        default=None, description='DPO only: the beta, as a string, or "auto".'
    )


class OpenAISpec(ApiModel):
    model: str = Field(
        max_length=256, description="Base model to tune, e.g. `gpt-4o-mini-2024-07-18`."
    )
    api_key_secret_ref: OpenAIKeyRef = Field(description="Where the API key is read from.")
    suffix: str | None = Field(
        default=None, max_length=64, description="Up to 64 characters added to the `ft:` name."
    )
    method: Literal["supervised", "dpo"] = Field(default="supervised", description="Tuning method.")
    hyperparameters: OpenAIHyperparameters = Field(
        default_factory=OpenAIHyperparameters, description="OpenAI hyperparameters."
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Seed of the remote job."
    )
    base_url: str | None = Field(
        default=None,
        alias="baseURL",
        max_length=2048,
        pattern=r"^https?://",
        description="API base URL, for OpenAI-compatible providers (default "
        "https://api.openai.com/v1). It must be in the operator's allowlist "
        "(chart value `openai.allowedBaseURLs`): the key is sent only there.",
    )
    keep_files: bool = Field(
        default=False, description="Keep the uploaded files when the FineTuneJob is deleted."
    )
