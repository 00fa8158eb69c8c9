"""Helpers for cluster tests of FineTuneJobs: manifests, a simulated trainer, waiting on phases.

kwok runs no containers, so a trainer pod never writes progress. ``SimulatedTrainer`` does what
the real trainer does through the API (patch its progress ConfigMap with ProgressRecords and the
final result), so the operator's reading side is tested against the real contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.api import crd
from kubetune.progress import CONFIGMAP_KEY, RESULT_KEY, ProgressRecord
from support.cluster import (
    EXIT_CODE_ANNOTATION,
    MESSAGE_ANNOTATION,
    REASON_ANNOTATION,
    RUN_SECONDS_ANNOTATION,
    Cluster,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
CHAT_LINE = {
    "messages": [
        {"role": "system", "content": "你是一位以老庄口吻作答的道家智者。"},
        {"role": "user", "content": "如何应对压力?"},
        {"role": "assistant", "content": "《道德经》第八章:上善若水。水不争,故无尤。"},
    ]
}


def install_crd(cluster: Cluster) -> None:
    """Both CRDs: FineTuneJob and ModelServer (the operator watches both)."""
    text = "\n---\n".join(crd.render(r) for r in crd.RESOURCES)
    cluster.kubectl("apply", "--server-side", "-f", "-", input=text)
    for r in crd.RESOURCES:
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{r.plural}.kubetune.io", "--timeout=60s"
        )


def dataset_text(n: int = 12) -> str:
    lines = []
    for i in range(n):
        line = json.loads(json.dumps(CHAT_LINE, ensure_ascii=False))
        line["messages"][1]["content"] += f" ({i})"
        lines.append(json.dumps(line, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def output_volume(cluster: Cluster, namespace: str, claim: str = "kubetune-output") -> None:
    """A statically bound PV + PVC, so trainer pods pass the scheduler's volume check."""
    static_volume(cluster, namespace, claim, {"hostPath": {"path": f"/tmp/{namespace}-{claim}"}})


def static_volume(
    cluster: Cluster,
    namespace: str,
    claim: str,
    source: dict[str, Any],
    *,
    access_mode: str = "ReadWriteMany",
    node_affinity: dict[str, Any] | None = None,
) -> None:
    """The PersistentVolume ``<namespace>-<claim>``, bound to the claim ``claim``; ``source`` is
    its volume source (``hostPath``, ``local``, ...) and any other fields of its spec. Returns
    once the claim is Bound."""
    pv_name = f"{namespace}-{claim}"
    pv_spec: dict[str, Any] = {
        "capacity": {"storage": "10Gi"},
        "accessModes": [access_mode],
        "storageClassName": "",
        **source,
        "claimRef": {"namespace": namespace, "name": claim},
    }
    if node_affinity:
        pv_spec["nodeAffinity"] = node_affinity
    cluster.apply(
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
         "spec": pv_spec},
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": [access_mode],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )  # fmt: skip
    # A pod whose claim is not bound yet is unschedulable, and the scheduler may back off
    # for minutes before it looks again: wait for the PV controller first.
    wait_until(
        lambda: (
            (cluster.get("pvc", claim, "-n", namespace) or {}).get("status", {}).get("phase")
            == "Bound"
        ),
        timeout=60,
        description=f"PVC {namespace}/{claim} to be bound",
    )


def dataset_configmap(cluster: Cluster, namespace: str, text: str, name: str = "data") -> None:
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"train.jsonl": text},
        }
    )


def local_job(
    name: str,
    *,
    gpus: int = 1,
    run_seconds: float = 3,
    exit_code: int = 0,
    reason: str | None = None,
    message: str | None = None,
    serve: bool = True,
    **spec: Any,
) -> dict[str, Any]:
    annotations = {RUN_SECONDS_ANNOTATION: str(run_seconds), EXIT_CODE_ANNOTATION: str(exit_code)}
    if reason:
        annotations[REASON_ANNOTATION] = reason
    if message:
        annotations[MESSAGE_ANNOTATION] = message
    body: dict[str, Any] = {
        "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}},
        "resources": {
            "gpus": gpus,
            "nodeSelector": {"kubetune.io/gpu-pool": "a100"} if gpus else {},
            "podAnnotations": annotations,
        },
        "serve": {
            "enabled": serve,
            "engine": "vllm-cpu",
            "resources": {"gpus": 0},
        },
        "backoffLimit": 0,
    }
    body.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def get_ftj(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = cluster.get("finetunejob", name, "-n", namespace)
    assert obj is not None, f"FineTuneJob {namespace}/{name} is gone"
    return dict(obj)


def wait_phase(
    cluster: Cluster, namespace: str, name: str, *phases: str, timeout: float = 60
) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        obj = get_ftj(cluster, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        return wait_until(seen, timeout=timeout, description=f"{name} to reach {phases}")
    except TimeoutError as exc:
        status = (get_ftj(cluster, namespace, name).get("status")) or {}
        raise AssertionError(f"{exc}; status: {json.dumps(status, indent=1)}") from None


def serving_condition(status: dict[str, Any]) -> dict[str, Any]:
    """The ServingReady condition of a job's status; {} while it has none."""
    conditions = status.get("conditions") or []
    return next((c for c in conditions if c["type"] == "ServingReady"), {})


def wait_serving_ready(
    cluster: Cluster, namespace: str, name: str, timeout: float = 60
) -> dict[str, Any]:
    """The job's status once its ServingReady condition is True (its server's Deployment is
    Ready)."""

    def ready() -> dict[str, Any] | None:
        status: dict[str, Any] = get_ftj(cluster, namespace, name).get("status") or {}
        return status if serving_condition(status).get("status") == "True" else None

    return wait_until(ready, timeout=timeout, description=f"{name}: ServingReady=True")


def event_reasons(cluster: Cluster, namespace: str, name: str, *expected: str) -> list[str]:
    """The reasons of the events on ``name``, once all of ``expected`` are among them.

    kopf posts events from a queue, concurrently with the status patch, so a test that has
    just seen a phase may be a moment ahead of its event.
    """

    def reasons() -> list[str] | None:
        items = cluster.get(
            "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
        )
        found = [str(e["reason"]) for e in (items or {}).get("items", [])]
        return found if set(expected) <= set(found) else None

    return wait_until(reasons, timeout=30, description=f"events {expected} on {name}")


class SimulatedTrainer:
    """Writes what ``kubetune.trainer`` writes into its progress ConfigMap."""

    def __init__(self, cluster: Cluster, namespace: str, job: str) -> None:
        self.cluster, self.namespace, self.cm = cluster, namespace, f"{job}-progress"

    def _patch(self, data: dict[str, str]) -> None:
        self.cluster.kubectl(
            "patch",
            "configmap",
            self.cm,
            "-n",
            self.namespace,
            "--type=merge",
            "-p",
            json.dumps({"data": data}),
        )

    def step(self, step: int, total: int, loss: float) -> None:
        record = ProgressRecord(
            step=step,
            total_steps=total,
            epoch=step / total * 3,
            train_loss=loss,
            tokens_per_second=1234.5,
            elapsed_seconds=float(step),
        )
        self._patch({CONFIGMAP_KEY: record.to_json()})

    def finish(self, trained_tokens: int, rank: int = 16) -> None:
        self._patch(
            {RESULT_KEY: json.dumps({"trainedTokens": trained_tokens, "adapterRank": rank})}
        )
