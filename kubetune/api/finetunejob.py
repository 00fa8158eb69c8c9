"""The FineTuneJob resource (kubetune.io/v1alpha1): the one place where its spec's fields, what
a team writes, are described (its status, what the operator writes: :mod:`kubetune.api.jobstatus`).

The CRD in ``crds/`` is generated from these models (``make crds``), so every
``Field(description=...)`` here is what ``kubectl explain ftj.spec...`` prints. Cross-field
rules are declared twice on purpose only in *effect*, never in text: as CEL (``CEL_RULES``
below, enforced by the API server) and as pydantic validators (enforced for files and by the
operator); ``tests/unit/api`` checks both agree on the same bad manifests.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from kubetune.api.openai_spec import OpenAISpec
from kubetune.api.types import (
    AUTO,
    ApiModel,
    BatchSizeOrAuto,
    ConfigKey,
    DNSName,
    EpochsOrAuto,
    Quantity,
)

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"


class Provider(StrEnum):
    LOCAL = "local"
    OPENAI = "openai"


class Method(StrEnum):
    LORA = "lora"
    QLORA = "qlora"


# --------------------------------------------------------------------------- sources


class PVCPath(ApiModel):
    claim_name: DNSName = Field(
        description="Name of a PersistentVolumeClaim in the job's namespace."
    )
    path: str = Field(
        default="",
        max_length=1024,
        pattern=r"^[^\x00]*$",
        description="Path inside the claim (a file for datasets, a folder for models/outputs).",
    )

    @model_validator(mode="after")
    def _relative(self) -> PVCPath:
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError("`path` must be relative to the claim and must not contain `..`")
        return self


class ConfigMapKeyRef(ApiModel):
    name: DNSName = Field(description="ConfigMap name, in the job's namespace.")
    key: ConfigKey = Field(description="Key whose value is the JSONL text.")


class SecretKeyRef(ApiModel):
    name: DNSName = Field(description="Secret name, in the job's namespace.")
    key: ConfigKey = Field(description="Key in the Secret that holds the value.")


class DatasetSource(ApiModel):
    """Exactly one of ``configMap``, ``pvc`` or ``url``."""

    config_map: ConfigMapKeyRef | None = Field(
        default=None, description="A ConfigMap key holding the JSONL (under 1 MiB)."
    )
    pvc: PVCPath | None = Field(default=None, description="A JSONL file on a PVC.")
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="An http(s) URL of the JSONL file, fetched by the operator and the trainer.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSource:
        if sum(x is not None for x in (self.config_map, self.pvc, self.url)) != 1:
            raise ValueError("set exactly one of `configMap`, `pvc` or `url`")
        return self


MODEL_ID_PATTERN = r"^[A-Za-z0-9][-._A-Za-z0-9]*(/[-._A-Za-z0-9]+)?$"
"""A Hugging Face model id, ``name`` or ``org/name`` (a path, such as ``/kubetune/model/x``, is
not one)."""


class ModelRef(ApiModel):
    """The open base model: a Hugging Face id (with optional revision) or a folder on a PVC."""

    id: str | None = Field(
        default=None,
        max_length=256,
        pattern=MODEL_ID_PATTERN,
        description="Hugging Face model id, e.g. `Qwen/Qwen2.5-0.5B-Instruct`; downloaded "
        "into the model cache (HF_HOME).",
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Branch, tag or commit of `id`."
    )
    pvc: PVCPath | None = Field(
        default=None, description="A folder on a PVC holding the model in Hugging Face layout."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face access token, for gated or private "
        "models such as `meta-llama/*`: the trainer and server pods get it as `HF_TOKEN` "
        "from the kubelet; the operator never reads it. Only with `id`.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelRef:
        if (self.id is None) == (self.pvc is None):
            raise ValueError("set exactly one of `id` or `pvc`")
        if self.revision is not None and self.id is None:
            raise ValueError("`revision` applies only to `id`")
        if self.token_secret_ref is not None and self.id is None:
            raise ValueError("`tokenSecretRef` applies only to `id`")
        return self

    @property
    def display(self) -> str:
        if self.id is not None:
            return self.id if self.revision is None else f"{self.id}@{self.revision}"
        assert self.pvc is not None
        return f"pvc://{self.pvc.claim_name}/{self.pvc.path}"


# --------------------------------------------------------------------------- training


class LoraSpec(ApiModel):
    r: int = Field(default=16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=1024, description="LoRA scaling numerator (alpha/r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=32,
        description="Module names to adapt; `all-linear` adapts every linear layer but the "
        "output head.",
    )


class Truncation(StrEnum):
    TRUNCATE = "truncate"
    DROP = "drop"


class Hyperparameters(ApiModel):
    epochs: EpochsOrAuto = Field(
        default=AUTO,
        description='Passes over the data, or "auto": 3; for fewer than 34 examples '
        "100 // examples, for more than 8,333 25,000 // examples; always within 1..25 "
        "(OpenAI's cookbook rule, integer division).",
    )
    batch_size: BatchSizeOrAuto = Field(
        default=AUTO,
        description='Examples per optimizer step, or "auto": about 0.2% of the examples, '
        "clamped to 1..8 per GPU (the trainer packs short examples into each sequence).",
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    max_seq_length: int = Field(
        default=2048, ge=16, le=131072, description="Longest example in tokens; see `truncation`."
    )
    truncation: Truncation = Field(
        default=Truncation.TRUNCATE,
        description="What to do with examples longer than `maxSeqLength`: cut them "
        "(`truncate`) or leave them out (`drop`); either way they are counted in the result.",
    )
    packing: bool = Field(
        default=True,
        description="Pack several examples per sequence without cross-attention between them.",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per step."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=0.5, description="Fraction of steps to warm up."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for data order and init.")
    checkpoint_every_steps: int = Field(
        default=50, ge=1, le=100000, description="Write a resumable checkpoint this often."
    )


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=253, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Match operator.")
    value: str | None = Field(default=None, max_length=253, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute taints.")


class Resources(ApiModel):
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per pod (0 runs on CPU).")
    gpu_resource_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description="Extended resource name of the GPU; unset: the cluster's default from "
        "the chart (`jobDefaults.gpuResourceName`, usually `nvidia.com/gpu`).",
    )
    cpu: Quantity | None = Field(
        default=None, description="CPU request and limit; unset: the chart's default."
    )
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit; unset: the chart's default."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod must match (the GPU pool)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=16, description="Taints the pod tolerates."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "PriorityClass of the pod: the scheduler's preemption order, and with `queue` also "
            "the priority by which Kueue admits and preempts queued jobs."
        ),
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations added to the pods (service mesh, cluster autoscaler, ...).",
    )


class OutputSpec(ApiModel):
    pvc: PVCPath | None = Field(
        default=None,
        description="Where adapters are written. Each job writes under "
        "`<path>/<namespace>/<name>-<uid prefix>/`, so jobs never overwrite each other. "
        "Without it, the chart's default output claim is used.",
    )
    keep_on_delete: bool = Field(
        default=True, description="Keep the adapter files when the FineTuneJob is deleted."
    )


SERVE_SERVER_OPENAI_MESSAGE = (
    "`serve.server` applies only to provider `local`: OpenAI serves the models it tunes"
)
SERVE_GPUS_MESSAGE = (
    "`serve.engine: vllm` needs `serve.resources.gpus` >= 1; use `engine: vllm-cpu` to serve "
    "without GPUs"
)


class ServerSettings(ApiModel):
    """What a vLLM server runs as: a job's own server (`spec.serve`) or a ModelServer."""

    replicas: int = Field(default=1, ge=0, le=64, description="vLLM server replicas.")
    engine: Literal["vllm", "vllm-cpu"] = Field(
        default="vllm", description="`vllm` on GPUs; `vllm-cpu` for CPU-only pools and tests."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-replica resources.")
    max_model_length: int | None = Field(
        default=None, ge=16, le=1048576, description="vLLM `--max-model-len`."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key clients must send."
    )
    queue: DNSName | None = Field(
        default=None,
        description=(
            "Kueue LocalQueue of the server's pods (for a job's own server, default: "
            "`spec.queue`); each replica is admitted against its quota, as the trainer is. "
            "Needs Kueue's `pod` and `deployment` integrations. Changing it replaces the "
            "server's Deployment."
        ),
    )

    @property
    def needs_gpus(self) -> bool:
        return self.engine == "vllm" and self.resources.gpus < 1


class ServeSpec(ServerSettings):
    enabled: bool = Field(default=True, description="Serve the result behind vLLM on success.")
    server: DNSName | None = Field(
        default=None,
        description=(
            "Serve the adapter on this ModelServer (same namespace), one vLLM with the adapters "
            "of every job that names it, instead of a server of the job's own; the fields "
            "above are then the ModelServer's to set and are ignored here."
        ),
    )

    @model_validator(mode="after")
    def _gpu_engine_has_gpus(self) -> ServeSpec:
        if self.enabled and self.server is None and self.needs_gpus:
            raise ValueError(SERVE_GPUS_MESSAGE)
        return self


# --------------------------------------------------------------------------- spec


class FineTuneJobSpec(ApiModel):
    provider: Provider = Field(
        default=Provider.LOCAL,
        description="`local`: LoRA in trainer pods on the GPU pool. `openai`: OpenAI's "
        "fine-tuning API.",
    )
    model: ModelRef | None = Field(default=None, description="Base model (provider `local`).")
    dataset: DatasetSource = Field(description="Training data: OpenAI chat JSONL.")
    validation: DatasetSource | None = Field(default=None, description="Optional validation data.")
    method: Method = Field(
        default=Method.LORA, description="`lora`, or `qlora` (4-bit base weights; GPUs only)."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter shape.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training hyperparameters (provider `local`)."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Trainer pod resources and placement."
    )
    queue: DNSName | None = Field(
        default=None,
        description="Kueue LocalQueue; set as the `kueue.x-k8s.io/queue-name` label on the Job.",
    )
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where the adapter goes.")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="How the result is served.")
    openai: OpenAISpec | None = Field(default=None, description="Settings for provider `openai`.")
    suspend: bool = Field(
        default=False,
        description=(
            "Stop (or do not start) the job. A suspended running job is cancelled (provider "
            "openai) or its trainer pods stopped, to resume from their checkpoint when unset. "
            "A queued job (`queue`) is stopped through its Kueue Workload (`spec.active: false`), "
            "which releases its quota; a queued job suspended before it started is not queued."
        ),
    )
    active_deadline_seconds: int = Field(
        default=86400, ge=60, le=30 * 86400, description="Wall-clock limit of the trainer Job."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Trainer pod retries (each resumes from a checkpoint)."
    )

    @model_validator(mode="after")
    def _provider_fields(self) -> FineTuneJobSpec:
        if self.provider == Provider.OPENAI:
            if self.openai is None:
                raise ValueError("`openai` is required when `provider` is `openai`")
            for src, field in ((self.dataset, "dataset"), (self.validation, "validation")):
                if src is not None and src.pvc is not None:
                    raise ValueError(
                        f"`{field}.pvc` cannot be used with provider `openai`: the file must be "
                        "uploaded, so use `configMap` or `url`"
                    )
            if self.serve.server is not None:
                raise ValueError(SERVE_SERVER_OPENAI_MESSAGE)
        else:
            if self.model is None:
                raise ValueError("`model` is required when `provider` is `local`")
            if self.openai is not None:
                raise ValueError("`openai` applies only to provider `openai`")
        if self.method == Method.QLORA and self.resources.gpus < 1:
            raise ValueError("`method: qlora` needs `resources.gpus` >= 1 (4-bit is CUDA-only)")
        return self

    @property
    def serving_queue(self) -> str | None:
        """The Kueue LocalQueue of the server's pods: `serve.queue`, else the job's `queue`."""
        return self.serve.queue or self.queue


# CEL rules enforced by the API server. Each mirrors a pydantic validator above; the messages
# name the fields the same way. Keys are the JSON-schema paths they attach to.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "spec": [
        {
            "rule": "self.provider != 'openai' || has(self.openai)",
            "message": "`openai` is required when `provider` is `openai`",
        },
        {
            "rule": "self.provider != 'local' || has(self.model)",
            "message": "`model` is required when `provider` is `local`",
        },
        {
            "rule": "self.provider == 'openai' || !has(self.openai)",
            "message": "`openai` applies only to provider `openai`",
        },
        {
            "rule": "self.provider != 'openai' || !has(self.dataset.pvc)",
            "message": "`dataset.pvc` cannot be used with provider `openai`: "
            "use `configMap` or `url`",
        },
        {
            "rule": "self.provider != 'openai' || !has(self.validation) "
            "|| !has(self.validation.pvc)",
            "message": "`validation.pvc` cannot be used with provider `openai`: "
            "use `configMap` or `url`",
        },
        {
            "rule": "self.provider != 'openai' || !has(self.serve) || !has(self.serve.server)",
            "message": SERVE_SERVER_OPENAI_MESSAGE,
        },
        {
            # `resources` left out means its defaults (one GPU): the API server does not
            # default an absent object, so the rule must not read through it.
            "rule": "self.method != 'qlora' || !has(self.resources) || self.resources.gpus >= 1",
            "message": "`method: qlora` needs `resources.gpus` >= 1 (4-bit is CUDA-only)",
        },
    ],
    "ServeSpec": [
        {
            "rule": "!self.enabled || has(self.server) || self.engine != 'vllm' "
            "|| !has(self.resources) || self.resources.gpus >= 1",
            "message": SERVE_GPUS_MESSAGE,
        }
    ],
    "DatasetSource": [
        {
            "rule": "(has(self.configMap) ? 1 : 0) + (has(self.pvc) ? 1 : 0) "
            "+ (has(self.url) ? 1 : 0) == 1",
            "message": "set exactly one of `configMap`, `pvc` or `url`",
        }
    ],
    "ModelRef": [
        {"rule": "has(self.id) != has(self.pvc)", "message": "set exactly one of `id` or `pvc`"},
        {
            "rule": "!has(self.revision) || has(self.id)",
            "message": "`revision` applies only to `id`",
        },
        {
            "rule": "!has(self.tokenSecretRef) || has(self.id)",
            "message": "`tokenSecretRef` applies only to `id`",
        },
    ],
    "PVCPath": [
        {
            "rule": "!self.path.startsWith('/') && !self.path.split('/').exists(p, p == '..')",
            "message": "`path` must be relative to the claim and must not contain `..`",
        }
    ],
}

MAX_NAME_LENGTH = 48
"""Children are named `<name>-trainer-config` and so on, and names of labels stop at 63."""

NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label, as Service names must be: the job's `<name>-server` Service is one. The API
server accepts any DNS subdomain for a custom resource (`qwen2.5-tune`, `7b-lora`), which would
train for hours and then fail to be served."""

NAME_RULES = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
        "(its children's names add up to 15)",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must start with a letter and hold only lowercase letters, "
        "digits and '-' (no '.'): the job's Service is named after it",
    },
]

# Fields that may change after the job has started (status.startTime is set).
MUTABLE_AFTER_START = ("suspend", "serve")


def spec_field_names() -> list[str]:
    """The camelCase names of every spec field, in declaration order."""
    return [f.alias or n for n, f in FineTuneJobSpec.model_fields.items()]


def immutability_rule() -> dict[str, str]:
    """The root-level CEL transition rule that freezes a started job's spec."""
    frozen = [name for name in spec_field_names() if name not in MUTABLE_AFTER_START]
    checks = " && ".join(
        f"(has(self.spec.{n}) == has(oldSelf.spec.{n}) && "
        f"(!has(self.spec.{n}) || self.spec.{n} == oldSelf.spec.{n}))"
        for n in frozen
    )
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || (" + checks + ")",
        "message": "spec is immutable once the job has started (status.startTime is set); "
        "only spec.suspend and spec.serve may change",
        "reason": "FieldValueForbidden",
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Provider", "type": "string", "jsonPath": ".spec.provider"},
    {"name": "Model", "type": "string", "jsonPath": ".status.model"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.trainLoss"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint.baseURL"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Serving",
        "type": "string",
        "priority": 1,  # `kubectl get ftj -o wide`
        "description": "Why the server is or is not ready: the ServingReady condition's reason.",
        "jsonPath": '.status.conditions[?(@.type=="ServingReady")].reason',
    },
]
