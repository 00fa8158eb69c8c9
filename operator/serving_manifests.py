"""Pure builders for serving a finished ``provider: local`` FineTuneJob behind vLLM.

``serving_objects(...)`` returns, as plain dicts in creation order:

1. ConfigMap ``<name>-server-config``: the :class:`~kubetune.api.serveconfig.ServeConfig` that
   ``python -m kubetune.server`` reads (base model, the job's adapter served as ``<name>``);
2. Deployment ``<name>-server``: the launcher, which checks the adapter and execs vLLM;
3. Service ``<name>-server`` (ClusterIP, port 8000): what ``<name>-endpoint`` points apps at.

Signature (keyword-only)::

    serving_objects(*, owner, serve, base_model, adapter_claim, adapter_subpath, lora_rank,
                    settings, queue=None, runtime_lora_updating=False) -> list[dict]

``owner`` is the FineTuneJob (its owner reference and ``kubetune.io/finetunejob`` label go on
every object); ``serve`` is ``spec.serve``; ``base_model`` is ``spec.model``;
``adapter_claim``/``adapter_subpath`` locate the job's output folder (the trainer's
``/kubetune/output``), which the server mounts read-only at the same path; the trainer writes
the adapter files straight into it. ``lora_rank`` (``spec.lora.r``) becomes the server's rank
cap (``maxLoraRank``), which the launcher rounds up to a rank vLLM supports (1, 8, 16, 32, ...):
an adapter above that rounded rank is refused (``r: 10`` accepts an adapter of rank up to 16).

The pod mounts the base model exactly where the trainer did (``/kubetune/model`` for a PVC
model; hub ids go through the shared HF_HOME cache), so the ``base_model_name_or_path`` the
trainer recorded matches what the server serves and the launcher's base-model check passes.
Engine ``vllm-cpu`` requests no GPUs (``resources.gpus`` applies to the GPU engine).

``queue`` (``spec.serving_queue``) puts the server under Kueue: the Deployment and its pod
template carry ``kueue.x-k8s.io/queue-name``, so Kueue's pod integration holds each replica
(a scheduling gate) until the queue's quota admits it, and adds the admitting flavor's node
labels, as it does for the trainer Job.

A ModelServer gets the same three objects, built from the same pieces, from
:mod:`kubetune.operator.model_server_manifests`; ``deployment(adapter_sync=True)`` adds the
adapter-sync sidecar of a server that loads adapter-set changes at run time.

Nothing here talks to Kubernetes or imports kopf; ``tests/unit/server/test_serving_manifests``
checks the output.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from kubetune.api import finetunejob as ftj
from kubetune.api.serveconfig import AdapterSource, ServeConfig
from kubetune.api.types import quantity_value
from kubetune.operator import manifests, pod_parts
from kubetune.operator.settings import OperatorSettings
from kubetune.sync_report import SYNC_PORT

SERVER_PORT = 8000
CPU_KV_CACHE_DEFAULT_GIB = 4
COMPONENT = "server"
SHARED_COMPONENT = "modelserver"
ADAPTERS_DIR = "/kubetune/adapters"
"""Where a ModelServer's pods find each job's adapter: ``<ADAPTERS_DIR>/<job name>``."""
CONFIG_FILE = "serve.yaml"
CONFIG_PATH = f"{manifests.CONFIG_DIR}/{CONFIG_FILE}"
ADAPTER_PATH = manifests.OUTPUT_DIR
"""The adapter in the server pod: the trainer writes it straight into the job's output folder
(``adapter_config.json`` last), which the server mounts where the trainer had it."""
API_KEY_ENV = "KUBETUNE_API_KEY"
"""Filled from ``serve.apiKeySecretRef``; the launcher hands it to vLLM as VLLM_API_KEY."""

STARTUP_SECONDS = 1800
"""How long a replica may take to download and load the model before Kubernetes restarts it."""
PROBE_PERIOD = 10


def server_name(owner: manifests.Owner) -> str:
    return f"{owner.name}-{COMPONENT}"


def config_name(owner: manifests.Owner) -> str:
    return f"{owner.name}-{COMPONENT}-config"


def component(owner: manifests.Owner) -> str:
    return COMPONENT if owner.kind == ftj.KIND else SHARED_COMPONENT


def selector_labels(owner: manifests.Owner) -> dict[str, str]:
    """Labels that pick the owner's server pods (stable: a Deployment's selector is immutable)."""
    return {owner.label: owner.name, manifests.LABEL_COMPONENT: component(owner)}


@dataclass(frozen=True)
class AdapterMount:
    """A job's output folder (``subpath`` of ``claim``), mounted read-only at ``path``."""

    claim: str
    subpath: str
    path: str


def _labels(owner: manifests.Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        manifests.LABEL_MANAGED_BY: "kubetune",
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": server_name(owner),
        "app.kubernetes.io/part-of": "kubetune",
    }


def _metadata(owner: manifests.Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": _labels(owner),
        "ownerReferences": [owner.reference()],
    }


# ------------------------------------------------------------------------------ config


def base_model_path(base_model: ftj.ModelRef) -> str:
    """The base model as the trainer named it: the hub id, or its folder under MODEL_DIR."""
    if base_model.id is not None:
        return base_model.id
    assert base_model.pvc is not None  # ModelRef guarantees exactly one
    return f"{manifests.MODEL_DIR}/{base_model.pvc.path}".rstrip("/")


BASE_NAME_SUFFIX = "-base"
"""Added to the base model's served name when it would equal the adapter's (the job's) name."""

MAX_FOLDER_NAME = 200
"""A PVC folder name is cut to this many characters (served names may have 256)."""


def base_served_name(base_model: ftj.ModelRef, *adapter_names: str) -> str:
    """What clients send for the untuned base: the hub id, or the model folder's name.

    Always a valid served name (:data:`~kubetune.api.serveconfig.ServedName`) that differs
    from every one of ``adapter_names``: a folder name has each run of characters a served name
    cannot hold (spaces, ``=``, ``,``, ...) replaced by ``-`` and leading ``-._`` dropped
    (``Llama 3 8B`` is served as ``Llama-3-8B``); a folder name with nothing left is replaced
    by the claim's name; a name equal to an adapter's gets :data:`BASE_NAME_SUFFIX` (again,
    until it differs).
    """
    if base_model.id is not None:
        name = base_model.id
    else:
        assert base_model.pvc is not None
        folder = base_model.pvc.path.rstrip("/").rsplit("/", 1)[-1]
        name = re.sub(r"[^-._A-Za-z0-9]+", "-", folder).lstrip("-._")[:MAX_FOLDER_NAME]
        name = name or base_model.pvc.claim_name
    while name in adapter_names:
        name += BASE_NAME_SUFFIX
    return name


def launcher_config(
    *,
    serve: ftj.ServerSettings,
    base_model: ftj.ModelRef,
    adapters: dict[str, str],
    max_lora_rank: int,
    max_loras: int | None = None,
    runtime_lora_updating: bool = False,
    adapter_sync: bool = False,
) -> ServeConfig:
    """The launcher's config, with in-pod paths: ``adapters`` maps served names to folders."""
    cpu = serve.engine == "vllm-cpu"
    return ServeConfig(
        model=base_model_path(base_model),
        revision=base_model.revision,
        served_model_name=base_served_name(base_model, *adapters),
        adapters=[AdapterSource(name=name, path=path) for name, path in adapters.items()],
        engine=serve.engine,
        host="0.0.0.0",
        port=SERVER_PORT,
        max_model_len=serve.max_model_length,
        tensor_parallel_size=1 if cpu else max(1, serve.resources.gpus),
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        runtime_lora_updating=runtime_lora_updating or adapter_sync,
        adapter_sync=adapter_sync,
        api_key_env=API_KEY_ENV if serve.api_key_secret_ref else None,
    )


def serve_config(
    *,
    owner: manifests.Owner,
    serve: ftj.ServerSettings,
    base_model: ftj.ModelRef,
    lora_rank: int,
    runtime_lora_updating: bool = False,
) -> ServeConfig:
    """A job's own server: its one adapter, served under the job's name."""
    return launcher_config(
        serve=serve,
        base_model=base_model,
        adapters={owner.name: ADAPTER_PATH},
        max_lora_rank=lora_rank,
        runtime_lora_updating=runtime_lora_updating,
    )


def config_configmap(config: ServeConfig, owner: manifests.Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_name(owner)),
        "data": {CONFIG_FILE: config.dump_yaml()},
    }


# ------------------------------------------------------------------------------ pod


def server_image(serve: ftj.ServerSettings, settings: OperatorSettings) -> str:
    """Each engine is a different vLLM build, hence a different image."""
    return settings.server_cpu_image if serve.engine == "vllm-cpu" else settings.server_image


def engine_resources(serve: ftj.ServerSettings) -> ftj.Resources:
    """``serve.resources``, less the GPUs when the engine is ``vllm-cpu`` (it cannot use them)."""
    if serve.engine == "vllm-cpu":
        return serve.resources.model_copy(update={"gpus": 0})
    return serve.resources


def cpu_kv_cache_gib(res: ftj.Resources) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` (GiB) of a ``vllm-cpu`` server. Left to itself, vLLM-CPU
    reserves 92% of the node's memory, whatever the pod's limit (and fails to start on a node
    that is not almost idle): a quarter of the pod's memory, at least 1 GiB, leaving the rest
    for the weights; 4 GiB when the pod has no memory limit."""
    if res.memory is None:
        return CPU_KV_CACHE_DEFAULT_GIB
    return max(1, int(quantity_value(res.memory) / 4 / 2**30))


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _env(
    serve: ftj.ServerSettings,
    res: ftj.Resources,
    base_model: ftj.ModelRef,
    settings: OperatorSettings,
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{manifests.CACHE_DIR}/huggingface"},
        # vLLM's torch.compile cache: on the cache volume, a restarted pod skips recompiling.
        {"name": "VLLM_CACHE_ROOT", "value": f"{manifests.CACHE_DIR}/vllm"},
        # The root filesystem is read-only; vLLM, torch and triton cache under $HOME.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONSAFEPATH", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]
    if serve.engine == "vllm-cpu":
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(cpu_kv_cache_gib(res))})
    return env + pod_parts.hub_env(base_model, settings) + _api_key_env(serve)


def _api_key_env(serve: ftj.ServerSettings) -> list[dict[str, Any]]:
    """``API_KEY_ENV`` from ``serve.apiKeySecretRef`` (a reference: the key never shows in the
    pod spec), or nothing when the server takes no key."""
    ref = serve.api_key_secret_ref
    if ref is None:
        return []
    return [
        {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    ]


def deployment(
    *,
    owner: manifests.Owner,
    serve: ftj.ServerSettings,
    base_model: ftj.ModelRef,
    adapters: list[AdapterMount],
    config: ServeConfig,
    settings: OperatorSettings,
    queue: str | None = None,
    adapter_sync: bool = False,
) -> dict[str, Any]:
    """vLLM behind the launcher: probes, GPUs, /dev/shm, cache, read-only adapters, non-root;
    with ``adapter_sync``, the sidecar that loads adapter-set changes into the running vLLM
    (the pods' config hash then leaves the adapters out: a new set does not roll them)."""
    res = pod_parts.effective_resources(engine_resources(serve), settings, "server")
    claims = list(dict.fromkeys(a.claim for a in adapters))
    volume = {c: "adapter" if i == 0 else f"adapter-{i}" for i, c in enumerate(claims)}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(owner)}},
        *(
            {"name": volume[c], "persistentVolumeClaim": {"claimName": c, "readOnly": True}}
            for c in claims
        ),
        pod_parts.cache_volume(settings),
        pod_parts.shm_volume(res),
        {"name": "tmp", "emptyDir": {}},
    ]
    config_and_adapters: list[dict[str, Any]] = [
        {"name": "config", "mountPath": manifests.CONFIG_DIR, "readOnly": True},
        *(
            {
                "name": volume[a.claim],
                "mountPath": a.path,
                "subPath": a.subpath,
                "readOnly": True,
            }
            for a in adapters
        ),
    ]
    tmp = {"name": "tmp", "mountPath": "/tmp"}
    mounts: list[dict[str, Any]] = [
        *config_and_adapters,
        {"name": "cache", "mountPath": manifests.CACHE_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
        tmp,
    ]
    if base_model.pvc is not None:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": base_model.pvc.claim_name, "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": manifests.MODEL_DIR, "readOnly": True})

    rolled_by = config.model_copy(update={"adapters": []}) if adapter_sync else config
    containers = [
        {
            "name": "vllm",
            "image": server_image(serve, settings),
            "command": ["python", "-m", "kubetune.server", "--config", CONFIG_PATH],
            "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
            "env": _env(serve, res, base_model, settings),
            "resources": pod_parts.resource_requirements(res),
            "volumeMounts": mounts,
            "securityContext": pod_parts.container_security_context(),
            # Model download and loading: /health answers only once the engine is up.
            "startupProbe": _probe("/health", PROBE_PERIOD, STARTUP_SECONDS // PROBE_PERIOD),
            "readinessProbe": _probe("/health", 5, 3),
            "livenessProbe": _probe("/health", PROBE_PERIOD, 6),
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
    ]
    if adapter_sync:
        containers.append(sync_container(serve, settings, [*config_and_adapters, tmp]))
    pod_spec: dict[str, Any] = {
        "securityContext": pod_parts.pod_security_context(settings),
        "automountServiceAccountToken": False,
        "containers": containers,
        "volumes": volumes,
        "tolerations": pod_parts.tolerations(res),
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    # On a full GPU pool a surge pod would wait forever for a GPU: replace in place instead.
    strategy = (
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
        if res.gpus
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    # Kueue's Deployment webhook would copy the label to the pod template; set here, the pods
    # are queued with the pod integration alone as well.
    queued = {manifests.KUEUE_QUEUE_LABEL: queue} if queue else {}
    metadata = _metadata(owner, server_name(owner))
    metadata["labels"].update(queued)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": serve.replicas,
            "selector": {"matchLabels": selector_labels(owner)},
            "strategy": strategy,
            "template": {
                "metadata": {
                    "labels": {**_labels(owner), **queued},
                    # `resources.podAnnotations` (a service mesh, the autoscaler), as on the
                    # trainer's pods; a changed config rolls the pods (a ConfigMap edit alone
                    # would not), and that hash is ours whatever the spec says.
                    "annotations": {
                        **res.pod_annotations,
                        manifests.CONFIG_HASH_ANNOTATION: hashlib.sha256(
                            rolled_by.dump_yaml().encode()
                        ).hexdigest()[:16],
                    },
                },
                "spec": pod_spec,
            },
        },
    }


SYNC_RESOURCES = {"cpu": "50m", "memory": "128Mi"}
"""The sidecar is a Python loop with httpx: a few tens of MiB, idle between rounds."""


def sync_container(
    serve: ftj.ServerSettings, settings: OperatorSettings, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The sidecar of a server that loads adapters at run time: same image, the same config
    file (which the kubelet updates in place) and adapter folders read-only, the API key to
    call vLLM on localhost; no GPU, no probes (it must never take the server out of its
    Service), restarted by the kubelet if it exits."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONSAFEPATH", "value": "1"},
        *_api_key_env(serve),
    ]
    return {
        "name": "adapter-sync",
        "image": server_image(serve, settings),
        "command": ["python", "-m", "kubetune.server.adapter_sync", "--config", CONFIG_PATH],
        "ports": [{"name": "sync", "containerPort": SYNC_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": dict(SYNC_RESOURCES), "limits": dict(SYNC_RESOURCES)},
        "volumeMounts": mounts,
        "securityContext": pod_parts.container_security_context(),
    }


def service(owner: manifests.Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, server_name(owner)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner),
            "ports": [
                {"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def serving_objects(
    *,
    owner: manifests.Owner,
    serve: ftj.ServerSettings,
    base_model: ftj.ModelRef,
    adapter_claim: str,
    adapter_subpath: str,
    lora_rank: int,
    settings: OperatorSettings,
    queue: str | None = None,
    runtime_lora_updating: bool = False,
) -> list[dict[str, Any]]:
    """ConfigMap, Deployment and Service that serve the job's adapter (see the module doc)."""
    config = serve_config(
        owner=owner,
        serve=serve,
        base_model=base_model,
        lora_rank=lora_rank,
        runtime_lora_updating=runtime_lora_updating,
    )
    return [
        config_configmap(config, owner),
        deployment(
            owner=owner,
            serve=serve,
            base_model=base_model,
            adapters=[AdapterMount(adapter_claim, adapter_subpath, ADAPTER_PATH)],
            config=config,
            settings=settings,
            queue=queue,
        ),
        service(owner),
    ]
