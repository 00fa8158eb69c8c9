"""Kueue's side of a queued job (``spec.queue``): the Workload that says if it may run.

Kueue admits a queued Job by unsuspending it, and unsuspends again any admitted Job that
something else suspends (checked against Kueue 0.17: the pod is replaced at once). So a queued
job is stopped through its Workload, Kueue's "deactivate": ``spec.active: false`` evicts it
(Kueue suspends the Job, its pods get their grace period) and releases its quota;
``spec.active: true`` puts it back in the queue.

The server's replicas (``spec.serve.queue``, else ``spec.queue``) are queued by Kueue's pod
integration instead: each pod is held by a scheduling gate until its own Workload, labelled with
the pod's uid, is admitted; ``held_pods`` picks those out.

``parse`` and ``held_pods`` are pure; ``find`` and ``set_active`` go through :mod:`kube`.
Without Kueue installed (the kind is not served) nothing admits a queued Job, and ``find`` says
so (NotInstalled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kubetune.operator import kube
from kubetune.operator import status as st

API_VERSIONS = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")
"""Newest first: Kueue 0.15+ serves v1beta2, older releases v1beta1 only."""
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""Kueue labels a Job's Workload with the Job's uid (a queued pod's with the pod's)."""
ADMISSION_GATE = "kueue.x-k8s.io/admission"
"""The scheduling gate Kueue's pod integration puts on a queued pod until it is admitted."""


class NotInstalled(Exception):
    """The cluster serves no Kueue Workload API, so nothing will ever admit a queued Job."""


@dataclass(frozen=True)
class Workload:
    api_version: str
    name: str
    active: bool
    admitted: bool
    waiting: str
    """Why it is not admitted (Kueue's QuotaReserved message), or "" when it is."""


def parse(obj: dict[str, Any], api_version: str) -> Workload:
    conditions = st.conditions_by_type(obj)

    def true(type_: str) -> bool:
        return (conditions.get(type_) or {}).get("status") == "True"

    admitted = true("Admitted")
    reserved = conditions.get("QuotaReserved") or {}
    waiting = "" if admitted else str(reserved.get("message") or "not admitted yet")
    return Workload(
        api_version=api_version,
        name=obj["metadata"]["name"],
        active=(obj.get("spec") or {}).get("active", True) is not False,
        admitted=admitted,
        waiting=waiting,
    )


def held_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods that Kueue's admission gate holds (queued server replicas), oldest first."""
    held = [
        pod
        for pod in pods
        if not (pod["metadata"].get("deletionTimestamp"))
        and any(
            gate.get("name") == ADMISSION_GATE
            for gate in (pod.get("spec") or {}).get("schedulingGates") or []
        )
    ]
    return sorted(held, key=lambda pod: str(pod["metadata"].get("creationTimestamp", "")))


def find(namespace: str, job_uid: str) -> Workload | None:
    """The Workload Kueue made for the Job with ``job_uid``; None when there is none yet.

    Raises NotInstalled when no version of the Workload API is served.
    """
    for api_version in API_VERSIONS:
        try:
            items = kube.list_objects(
                api_version, "Workload", namespace, f"{JOB_UID_LABEL}={job_uid}"
            )
        except kube.NotServed:
            continue
        return parse(items[-1], api_version) if items else None
    raise NotInstalled(
        "spec.queue is set, but this cluster serves no Kueue Workload API "
        f"({' or '.join(API_VERSIONS)}): is Kueue installed? The trainer Job stays suspended "
        "until Kueue admits it"
    )


def set_active(namespace: str, workload: Workload, active: bool) -> Workload:
    kube.patch_merge(
        workload.api_version, "Workload", namespace, workload.name, {"spec": {"active": active}}
    )
    return replace(workload, active=active, admitted=workload.admitted and active)
