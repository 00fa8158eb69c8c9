"""The ModelServer resource (kubetune.io/v1alpha1): one vLLM for a base model, many adapters.

A FineTuneJob gets a server of its own by default: one replica, often one GPU, per tuned model.
A ModelServer is what a shared GPU pool wants instead: one vLLM (multi-LoRA) that serves its
base model and the adapter of every ``provider: local`` FineTuneJob in its namespace that names
it in ``spec.serve.server``, once that job has succeeded. An adapter trained on another base
model, or above ``maxLoraRank``, is refused and named in the status, not served.

Like the FineTuneJob, the CRD (``crds/modelserver.yaml``) is generated from these models by
``make crds``; rules are pydantic validators and the same CEL.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kubetune.api.finetunejob import (
    GROUP,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    SERVE_GPUS_MESSAGE,
    VERSION,
    ModelRef,
    ServerSettings,
)
from kubetune.api.jobstatus import Condition
from kubetune.api.types import ApiModel

KIND = "ModelServer"
PLURAL = "modelservers"
API_VERSION = f"{GROUP}/{VERSION}"

MAX_LORA_RANK = 512
"""The largest rank vLLM serves."""

GPUS_MESSAGE = SERVE_GPUS_MESSAGE.replace("serve.", "")

LOADING_ADAPTERS = "LoadingAdapters"
"""A ``Live`` server's Ready reason while a replica does not serve the current adapter set yet;
the adapters in ``status.adapters`` are served meanwhile."""
MAX_LISTED = 256
"""The most jobs ``status.adapters`` and ``status.refused`` list (the CRD's maxItems)."""


class ModelServerSpec(ServerSettings):
    model: ModelRef = Field(
        description="Base model served, exactly as the FineTuneJobs name it in `spec.model` "
        "(the same `id` and `revision`, or the same claim and path)."
    )
    max_lora_rank: int = Field(
        default=16,
        ge=1,
        le=MAX_LORA_RANK,
        description="Largest adapter rank served (vLLM `--max-lora-rank`, rounded up to a rank "
        "vLLM supports: 1, 8, 16, 32, 64, 128, 256, 320, 512). A job whose adapter is larger "
        "is refused. vLLM reserves memory for this rank in every adapter slot.",
    )
    max_loras: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Adapters in one batch (vLLM `--max-loras`); requests for others wait "
        "until a slot is free. Every adapter stays loaded (in CPU memory).",
    )

    adapter_updates: Literal["Restart", "Live"] = Field(
        default="Restart",
        description="How a change of the adapter set (a job succeeds, is deleted, stops naming "
        "the server) reaches the replicas. `Restart`: the pods roll, each new pod loads every "
        "adapter at start (on a GPU pool with one replica, a gap of one model load). `Live`: "
        "a sidecar in each pod loads and unloads adapters in the running vLLM, no restart; "
        "the pods then mount the namespace's whole folder of each output claim, and any "
        "client that can call the server (with the API key, when one is set) can also load "
        "and unload adapters, which the sidecar undoes within seconds.",
    )

    @property
    def live(self) -> bool:
        return self.adapter_updates == "Live"

    @model_validator(mode="after")
    def _gpu_engine_has_gpus(self) -> ModelServerSpec:
        if self.needs_gpus:
            raise ValueError(GPUS_MESSAGE)
        return self


CEL_RULES: dict[str, list[dict[str, str]]] = {
    "ModelServerSpec": [
        {
            "rule": "self.engine != 'vllm' || !has(self.resources) || self.resources.gpus >= 1",
            "message": GPUS_MESSAGE,
        }
    ]
}

NAME_RULES = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
        "(its children's names add up to 14)",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must start with a letter and hold only lowercase letters, "
        "digits and '-' (no '.'): the server's Service is named after it",
    },
]


class RefusedAdapter(ApiModel):
    name: str = Field(max_length=253, description="The FineTuneJob.")
    message: str = Field(max_length=4096, description="Why its adapter is not served.")


class ModelServerStatus(ApiModel):
    conditions: list[Condition] = Field(
        default_factory=list,
        description="`Ready`: every replica serves the current adapter set (with `Live`, "
        "reason `LoadingAdapters` while a change is being loaded).",
    )
    model: str | None = Field(
        default=None,
        description="Base model served, and the name clients send for it when that differs "
        "(a folder's name).",
    )
    adapters: list[str] = Field(
        default_factory=list,
        max_length=MAX_LISTED,
        description="FineTuneJobs whose adapters are served, by name (also the model name "
        "clients send): with `adapterUpdates: Restart`, those in the config the replicas run "
        "(served once `Ready` is True); with `Live`, those every ready replica reports "
        "serving.",
    )
    refused: list[RefusedAdapter] = Field(
        default_factory=list,
        max_length=MAX_LISTED,
        description="FineTuneJobs that name this server but whose adapters it will not serve "
        f"(the first {MAX_LISTED} by name; the `Ready` message gives the count when there "
        "are more).",
    )
    base_url: str | None = Field(
        default=None, alias="baseURL", description="OpenAI-compatible base URL of the server."
    )
    observed_generation: int | None = Field(
        default=None, description="Last spec generation handled."
    )


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".status.model"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    },
    {"name": "Adapters", "type": "string", "jsonPath": ".status.adapters"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.baseURL"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Updates", "type": "string", "jsonPath": ".spec.adapterUpdates", "priority": 1},
]
