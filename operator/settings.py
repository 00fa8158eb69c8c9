"""Operator settings: what the Helm chart decides for every FineTuneJob in the cluster.

Read once at start-up from environment variables (the chart sets them from its values), so the
handlers and builders receive one frozen object instead of reading the environment themselves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _url_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a JSON list of URLs, got {raw!r}")
    return tuple(value)


@dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Image of the trainer pods (runs ``python -m kubetune.trainer``)."""

    server_image: str = "ghcr.io/kubetune/server:0.1.0"
    """Image of the vLLM server pods of ``serve.engine: vllm`` (runs ``python -m
    kubetune.server``; vLLM's CUDA build)."""

    server_cpu_image: str = "ghcr.io/kubetune/server-cpu:0.1.0"
    """Image of the server pods of ``serve.engine: vllm-cpu`` (vLLM's CPU build)."""

    output_claim: str = "kubetune-output"
    """PVC that adapters are written to when a job names none (``spec.output.pvc``)."""

    model_cache_claim: str | None = None
    """PVC mounted as HF_HOME in trainer and server pods; an emptyDir when unset."""

    hf_endpoint: str | None = None
    """Hugging Face Hub (or mirror) that trainer and server pods download hub models from
    (chart value ``jobDefaults.hfEndpoint``, set as ``HF_ENDPOINT``); unset: huggingface.co."""

    reconcile_interval: float = 10.0
    """Seconds between two looks at a running job (lower in tests)."""

    openai_poll_interval: float = 30.0
    """Seconds between two polls of a remote OpenAI job once it is created (chart value
    ``openai.pollInterval``). Polls happen on reconcile ticks, so the effective interval is
    this rounded to a multiple of ``reconcile_interval`` (and never shorter than one tick)."""

    openai_allowed_base_urls: tuple[str, ...] = (DEFAULT_OPENAI_BASE_URL,)
    """The only API base URLs ``spec.openai.baseURL`` may name (chart value
    ``openai.allowedBaseURLs``); a job without one uses OpenAI's, which must be listed too.
    The operator sends a namespace's API key there, so whoever may create FineTuneJobs must
    not be able to pick the server. Compared without a trailing ``/``, scheme and host
    case-insensitively. Empty: no ``provider: openai`` job runs."""

    gpu_resource_name: str = "nvidia.com/gpu"
    """GPU resource of jobs that name none (chart value ``jobDefaults.gpuResourceName``)."""

    default_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    """cpu/memory of ``trainer`` and ``server`` pods whose spec gives none
    (chart value ``jobDefaults.resources``)."""

    trainer_run_as_user: int = 1000
    """UID of trainer and server containers (non-root)."""

    prices_per_million: dict[str, float] = field(default_factory=lambda: {})
    """OpenAI training price per 1M tokens, by model prefix (chart value ``openai.prices``).
    Empty: the dataset doctor's own table (``kubetune.data``) applies."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        default = cls()
        prices = os.environ.get("KUBETUNE_OPENAI_PRICES")
        resources = os.environ.get("KUBETUNE_DEFAULT_RESOURCES")
        return cls(
            trainer_image=_env("KUBETUNE_TRAINER_IMAGE", default.trainer_image),
            server_image=_env("KUBETUNE_SERVER_IMAGE", default.server_image),
            server_cpu_image=_env("KUBETUNE_SERVER_CPU_IMAGE", default.server_cpu_image),
            output_claim=_env("KUBETUNE_OUTPUT_CLAIM", default.output_claim),
            model_cache_claim=os.environ.get("KUBETUNE_MODEL_CACHE_CLAIM") or None,
            hf_endpoint=os.environ.get("KUBETUNE_HF_ENDPOINT") or None,
            reconcile_interval=float(
                _env("KUBETUNE_RECONCILE_INTERVAL", str(default.reconcile_interval))
            ),
            openai_poll_interval=float(
                _env("KUBETUNE_OPENAI_POLL_INTERVAL", str(default.openai_poll_interval))
            ),
            openai_allowed_base_urls=_url_list(
                "KUBETUNE_OPENAI_ALLOWED_BASE_URLS", default.openai_allowed_base_urls
            ),
            prices_per_million=json.loads(prices) if prices else default.prices_per_million,
            gpu_resource_name=_env("KUBETUNE_GPU_RESOURCE_NAME", default.gpu_resource_name),
            default_resources=json.loads(resources) if resources else {},
        )
