"""What every pod kubetune makes gets, trainer or server: non-root security contexts, resources
with the chart's defaults filled in, the GPU taint's toleration, the model cache and /dev/shm
volumes, and how the pod reaches the Hugging Face Hub. Pure builders, like :mod:`.manifests`.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import finetunejob as ftj
from kubetune.operator.settings import OperatorSettings


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    uid = settings.trainer_run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def effective_resources(res: ftj.Resources, settings: OperatorSettings, role: str) -> ftj.Resources:
    """The spec's resources with the cluster defaults filled in (GPU name, cpu, memory)."""
    defaults = settings.default_resources.get(role, {})
    return res.model_copy(
        update={
            "gpu_resource_name": res.gpu_resource_name or settings.gpu_resource_name,
            "cpu": res.cpu or defaults.get("cpu"),
            "memory": res.memory or defaults.get("memory"),
        }
    )


def resource_requirements(res: ftj.Resources) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus:
        amounts[res.gpu_resource_name or "nvidia.com/gpu"] = str(res.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def tolerations(res: ftj.Resources) -> list[dict[str, Any]]:
    """The spec's tolerations, plus one for the GPU taint when GPUs are requested.

    GPU pools are tainted with the GPU resource name (as the ExtendedResourceToleration
    admission plugin assumes); a pod that asks for GPUs should not also have to say so.
    """
    out = [t.to_wire() for t in res.tolerations]
    gpu = res.gpu_resource_name or "nvidia.com/gpu"
    if res.gpus and not any(t.get("key") == gpu for t in out):
        out.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    return out


def cache_volume(settings: OperatorSettings) -> dict[str, Any]:
    if settings.model_cache_claim:
        return {"name": "cache", "persistentVolumeClaim": {"claimName": settings.model_cache_claim}}
    return {"name": "cache", "emptyDir": {}}


def hub_env(model: ftj.ModelRef | None, settings: OperatorSettings) -> list[dict[str, Any]]:
    """How trainer and server pods reach the Hugging Face Hub: the chart's mirror
    (``HF_ENDPOINT``) and the model's access token (``HF_TOKEN``), the latter as a reference
    the kubelet resolves, so the token shows in no pod spec and the operator never reads it."""
    if model is None or model.id is None:
        return []
    # huggingface_hub fetches a registry from the Hub on a process's first request otherwise.
    env: list[dict[str, Any]] = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    ref = model.token_secret_ref
    if ref is not None:
        secret = {"name": ref.name, "key": ref.key}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": secret}})
    return env


def shm_volume(res: ftj.Resources) -> dict[str, Any]:
    # PyTorch data loaders and NCCL use /dev/shm; the container default (64 MiB) is too small.
    return {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": res.memory or "8Gi"}}
