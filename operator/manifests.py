"""Pure builders for the children of a ``provider: local`` FineTuneJob.

Every function takes the validated spec plus identity and settings, and returns plain dicts
ready for the API server. Nothing here talks to Kubernetes or imports kopf: the handlers
create what these return (``kube.create_or_adopt``), and ``tests/unit/operator`` checks them.
Names are deterministic (derived from the FineTuneJob's name), so a restarted operator finds
the children it made instead of making new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kubetune.api import finetunejob as ftj
from kubetune.api.jobconfig import (
    BaseModelSource,
    ConfigMapSink,
    DataFile,
    JobIdentity,
    ProgressSink,
    TrainerConfig,
)
from kubetune.operator import pod_parts
from kubetune.operator.settings import OperatorSettings

LABEL_JOB = "kubetune.io/finetunejob"
LABEL_MODELSERVER = "kubetune.io/modelserver"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_HASH_ANNOTATION = "kubetune.io/config-hash"

CONFIG_DIR = "/kubetune/config"
CONFIG_FILE = "trainer.yaml"
DATA_DIR = "/kubetune/data"
DATASET_PVC_DIR = "/kubetune/dataset"
VALIDATION_PVC_DIR = "/kubetune/validation"
MODEL_DIR = "/kubetune/model"
OUTPUT_DIR = "/kubetune/output"
CACHE_DIR = "/kubetune/cache"
TRAINER_GRACE_SECONDS = 120
GRACE_ENV = "KUBETUNE_TERMINATION_GRACE_SECONDS"
"""Read by the trainer (``kubetune.trainer.launch.GRACE_ENV``); the operator does not import it."""


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob (or ModelServer) that owns the children (from its metadata)."""

    name: str
    namespace: str
    uid: str
    kind: str = ftj.KIND

    @property
    def label(self) -> str:
        """The label that ties a child to its owner by name."""
        return LABEL_JOB if self.kind == ftj.KIND else LABEL_MODELSERVER

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": ftj.API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {
                self.label: self.name,
                LABEL_COMPONENT: component,
                LABEL_MANAGED_BY: "kubetune",
                **extra_labels,
            },
            "ownerReferences": [self.reference()],
        }


# ------------------------------------------------------------------------------ names


def trainer_name(owner: Owner) -> str:
    return f"{owner.name}-trainer"


def config_name(owner: Owner) -> str:
    return f"{owner.name}-trainer-config"


def progress_name(owner: Owner) -> str:
    return f"{owner.name}-progress"


def endpoint_name(owner: Owner) -> str:
    return f"{owner.name}-endpoint"


def cleanup_name(owner: Owner) -> str:
    """``-cleanup-`` and 6 characters of the uid: within the 15 that names may add."""
    return f"{owner.name}-cleanup-{owner.uid[:6]}"


def output_subpath(spec: ftj.FineTuneJobSpec, owner: Owner) -> str:
    """The job's own folder on the output claim: nothing else is mounted into the trainer."""
    base = spec.output.pvc.path.strip("/") if spec.output.pvc else ""
    folder = f"{owner.namespace}/{owner.name}-{owner.uid[:8]}"
    return f"{base}/{folder}" if base else folder


def output_claim(spec: ftj.FineTuneJobSpec, settings: OperatorSettings) -> str:
    return spec.output.pvc.claim_name if spec.output.pvc else settings.output_claim


# ------------------------------------------------------------------------------ config


def _data_file(src: ftj.DatasetSource, file_name: str, pvc_dir: str) -> DataFile:
    if src.url is not None:
        return DataFile(url=src.url)
    if src.pvc is not None:
        return DataFile(path=f"{pvc_dir}/{src.pvc.path}")
    return DataFile(path=f"{DATA_DIR}/{file_name}")


def trainer_config(spec: ftj.FineTuneJobSpec, owner: Owner) -> TrainerConfig:
    """Resolves the spec into the document the trainer reads, with in-pod paths."""
    assert spec.model is not None  # guaranteed for provider local by the spec validator
    model_path = spec.model.id if spec.model.id else f"{MODEL_DIR}/{spec.model.pvc.path}"  # type: ignore[union-attr]
    return TrainerConfig(
        job=JobIdentity(namespace=owner.namespace, name=owner.name, uid=owner.uid),
        model=BaseModelSource(
            id_or_path=model_path, revision=spec.model.revision, display=spec.model.display
        ),
        dataset=_data_file(spec.dataset, "train.jsonl", DATASET_PVC_DIR),
        validation=None
        if spec.validation is None
        else _data_file(spec.validation, "validation.jsonl", VALIDATION_PVC_DIR),
        method=ftj.Method(spec.method),
        lora=spec.lora,
        hyperparameters=spec.hyperparameters,
        output_dir=OUTPUT_DIR,
        progress=ProgressSink(
            config_map=ConfigMapSink(namespace=owner.namespace, name=progress_name(owner))
        ),
        gpus=spec.resources.gpus,
    )


def config_hash(config: TrainerConfig) -> str:
    return hashlib.sha256(config.dump_yaml().encode()).hexdigest()[:16]


def trainer_configmap(config: TrainerConfig, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(config_name(owner), "trainer"),
        "data": {CONFIG_FILE: config.dump_yaml()},
    }


def progress_configmap(owner: Owner) -> dict[str, Any]:
    """Empty at first; the trainer patches the latest progress record into it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(progress_name(owner), "progress"),
        "data": {},
    }


# ------------------------------------------------------------------------------ RBAC


def trainer_rbac(owner: Owner) -> list[dict[str, Any]]:
    """A ServiceAccount that may patch its own progress ConfigMap, and nothing else."""
    name = trainer_name(owner)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": owner.metadata(name, "trainer"),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": owner.metadata(name, "trainer"),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [progress_name(owner)],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": owner.metadata(name, "trainer"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


# ------------------------------------------------------------------------------ trainer Job


def _dataset_volumes(
    spec: ftj.FineTuneJobSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    cm_name: str | None = None
    for src, file_name, pvc_dir, vol in (
        (spec.dataset, "train.jsonl", DATASET_PVC_DIR, "dataset"),
        (spec.validation, "validation.jsonl", VALIDATION_PVC_DIR, "validation"),
    ):
        if src is None:
            continue
        if src.pvc is not None:
            volumes.append(
                {
                    "name": vol,
                    "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": True},
                }
            )
            mounts.append({"name": vol, "mountPath": pvc_dir, "readOnly": True})
        elif src.config_map is not None:
            if cm_name not in (None, src.config_map.name):
                # Two ConfigMaps: mount the second one on its own.
                volumes.append(
                    {
                        "name": vol,
                        "configMap": {
                            "name": src.config_map.name,
                            "items": [{"key": src.config_map.key, "path": file_name}],
                        },
                    }
                )
                mounts.append(
                    {
                        "name": vol,
                        "mountPath": f"{DATA_DIR}/{file_name}",
                        "subPath": file_name,
                        "readOnly": True,
                    }
                )
                continue
            cm_name = src.config_map.name
            items.append({"key": src.config_map.key, "path": file_name})
    if cm_name is not None:
        volumes.append({"name": "data", "configMap": {"name": cm_name, "items": items}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return volumes, mounts


def trainer_job(
    spec: ftj.FineTuneJobSpec,
    owner: Owner,
    settings: OperatorSettings,
    config: TrainerConfig,
) -> dict[str, Any]:
    """The batch/v1 Job that runs ``python -m kubetune.trainer`` once (with resumable retries)."""
    name = trainer_name(owner)
    res = pod_parts.effective_resources(spec.resources, settings, "trainer")
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(owner)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": output_claim(spec, settings)}},
        pod_parts.cache_volume(settings),
        pod_parts.shm_volume(res),
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_DIR, "subPath": output_subpath(spec, owner)},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    data_volumes, data_mounts = _dataset_volumes(spec)
    volumes += data_volumes
    mounts += data_mounts
    if spec.model is not None and spec.model.pvc is not None:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": spec.model.pvc.claim_name, "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})

    labels = {LABEL_JOB: owner.name, LABEL_COMPONENT: "trainer", LABEL_MANAGED_BY: "kubetune"}
    extra = {KUEUE_QUEUE_LABEL: spec.queue} if spec.queue else {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": trainer_name(owner),
        "securityContext": pod_parts.pod_security_context(settings),
        "containers": [
            {
                "name": "trainer",
                "image": settings.trainer_image,
                "command": [
                    "python",
                    "-m",
                    "kubetune.trainer",
                    "--config",
                    f"{CONFIG_DIR}/{CONFIG_FILE}",
                ],
                "env": [
                    {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
                    # The root filesystem is read-only; matplotlib, torch and triton write
                    # their caches under $HOME (the image user's home, otherwise).
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "PYTHONSAFEPATH", "value": "1"},
                    # Multi-GPU pods give their workers this long, less a margin, to
                    # checkpoint after SIGTERM (kubetune.trainer.launch.shutdown_timeout).
                    {"name": GRACE_ENV, "value": str(TRAINER_GRACE_SECONDS)},
                    *pod_parts.hub_env(spec.model, settings),
                ],
                "resources": pod_parts.resource_requirements(res),
                "volumeMounts": mounts,
                "securityContext": pod_parts.container_security_context(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
        "tolerations": pod_parts.tolerations(res),
        # Checkpointing on SIGTERM needs a moment; preemption grants this much.
        "terminationGracePeriodSeconds": TRAINER_GRACE_SECONDS,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **owner.metadata(name, "trainer", **extra),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config)},
        },
        "spec": {
            "backoffLimit": spec.backoff_limit,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            # Kueue admits a queued Job by unsuspending it; created running, it would start
            # before the queue has a say.
            "suspend": spec.suspend or spec.queue is not None,
            "podFailurePolicy": {
                "rules": [
                    # Exit code 2: the trainer refused its input (bad data or config).
                    # Retrying cannot help, so the Job fails at once.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": [2],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels, "annotations": dict(spec.resources.pod_annotations)},
                "spec": pod_spec,
            },
        },
    }


def endpoint_configmap(owner: Owner, base_url: str, model: str) -> dict[str, Any]:
    """What apps ``envFrom``: the OpenAI-compatible base URL and model name. No API key."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(endpoint_name(owner), "endpoint"),
        "data": {"OPENAI_BASE_URL": base_url, "OPENAI_MODEL": model},
    }


def cleanup_job(
    spec: ftj.FineTuneJobSpec, owner: Owner, settings: OperatorSettings
) -> dict[str, Any]:
    """A Job that empties a deleted FineTuneJob's output folder (`output.keepOnDelete: false`).

    It is not owned by the FineTuneJob (which is going away) and removes itself when done.
    It mounts only that job's folder, so it cannot touch another job's adapters.
    """
    name = cleanup_name(owner)
    script = (
        "import pathlib, shutil\n"
        f"for p in pathlib.Path({OUTPUT_DIR!r}).iterdir():\n"
        "    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()\n"
    )
    meta = owner.metadata(name, "cleanup")
    del meta["ownerReferences"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": {LABEL_JOB: owner.name, LABEL_COMPONENT: "cleanup"}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_parts.pod_security_context(settings),
                    "containers": [
                        {
                            "name": "cleanup",
                            "image": settings.trainer_image,
                            "command": ["python", "-c", script],
                            "volumeMounts": [
                                {
                                    "name": "output",
                                    "mountPath": OUTPUT_DIR,
                                    "subPath": output_subpath(spec, owner),
                                }
                            ],
                            "securityContext": pod_parts.container_security_context(),
                        }
                    ],
                    "volumes": [
                        {
                            "name": "output",
                            "persistentVolumeClaim": {"claimName": output_claim(spec, settings)},
                        }
                    ],
                },
            },
        },
    }
