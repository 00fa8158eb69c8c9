"""Pure status logic: what a trainer Job, its pods and a serving Deployment mean for the phase.

The handlers read children from the API server and hand their dicts to these functions; the
functions decide ``phase``, ``message`` and conditions. No I/O, no kopf.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from kubetune.api.jobstatus import Condition, Phase
from kubetune.operator import manifests
from kubetune.server import launcher

if TYPE_CHECKING:
    from kubetune.operator.kueue import Workload


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event for the handler to post on the object it reconciled."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def rfc3339(when: datetime) -> str:
    """A time as the API server writes one (RFC 3339, UTC, whole seconds)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as the API server writes one (a time without a zone is UTC); raises
    ValueError for anything else."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def read_time(value: Any) -> datetime | None:
    """An RFC 3339 time read from an object (an annotation, a status field): None when it is
    missing or unreadable."""
    if not value:
        return None
    try:
        return parse_time(str(value))
    except ValueError:
        return None


def now() -> str:
    return rfc3339(datetime.now(UTC))


@dataclass(frozen=True)
class Observation:
    phase: Phase
    message: str
    reason: str = ""


def conditions_by_type(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An object's ``status.conditions`` keyed by type."""
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = cs.get("lastState") or {}
        term = state.get("terminated") or last.get("terminated")
        if term:
            return dict(term)
    return None


def _newest(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def failure_message(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) for a failed trainer Job: deadline, OOMKilled, exit code, last line."""
    cond = conditions_by_type(job).get("Failed") or {}
    reason = cond.get("reason") or "Failed"
    parts = [cond.get("message") or "trainer Job failed"]
    for pod in _newest(pods):
        term = _terminated(pod)
        if not term:
            continue
        code = term.get("exitCode")
        why = term.get("reason") or "Error"
        if why == "OOMKilled":
            reason = "OOMKilled"
        parts.append(f"last trainer pod: {why}, exit code {code}")
        last_line = (term.get("message") or "").strip().splitlines()
        if last_line:
            parts.append(f"trainer said: {last_line[-1][:500]}")
        break
    return reason, "; ".join(parts)


def pending_reason(pods: list[dict[str, Any]]) -> str | None:
    """The scheduler's message for an unschedulable pod (e.g. ``Insufficient nvidia.com/gpu``)."""
    for pod in _newest(pods):
        sched = conditions_by_type(pod).get("PodScheduled")
        if sched and sched.get("status") == "False":
            return str(sched.get("message") or sched.get("reason") or "pod is not scheduled")
    return None


STARTING = frozenset({"ContainerCreating", "PodInitializing"})
"""The kubelet's waiting reasons of a container on its way up; any other one (a missing Secret
or ConfigMap key, an image it cannot pull) holds the pod until someone changes something."""

NOT_STARTING = "PodNotStarting"


def container_waiting(pods: list[dict[str, Any]]) -> str | None:
    """Why a pod's container does not start, in the kubelet's words (newest pod first, pods
    that ended left out): ``CreateContainerConfigError: secret "hf-token" not found``,
    ``ImagePullBackOff: ...``; None while every container is starting normally."""
    for pod in _newest(pods):
        status = pod.get("status") or {}
        if status.get("phase") not in ("Pending", "Running"):
            continue
        for cs in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason and reason not in STARTING:
                said = " ".join(str(waiting.get("message") or "").split())[:500]
                where = f"pod {pod['metadata'].get('name', '?')}, container {cs.get('name', '?')}"
                return f"{reason}: {said} ({where})" if said else f"{reason} ({where})"
    return None


SUSPENDED_BEFORE_START = "suspended (spec.suspend): the trainer Job is queued when resumed"


def _suspended(workload: Workload | None) -> Observation:
    """A suspended trainer Job; for a queued one, what its Kueue Workload says."""
    if workload is None:
        return Observation(
            Phase.QUEUED,
            "trainer Job is suspended (spec.suspend, or waiting for its Kueue queue)",
            "Suspended",
        )
    if not workload.active:
        return Observation(
            Phase.QUEUED,
            f"suspended (spec.suspend): Kueue workload {workload.name} is deactivated and "
            "holds no quota",
            "Suspended",
        )
    if workload.admitted:
        return Observation(
            Phase.QUEUED, f"admitted by Kueue (workload {workload.name}); starting", "Admitted"
        )
    return Observation(
        Phase.QUEUED,
        f"waiting in the Kueue queue (workload {workload.name}): {workload.waiting}",
        "InQueue",
    )


def observe_trainer(
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    workload: Workload | None = None,
) -> Observation:
    """Maps a trainer Job and its pods (and, if queued, its Kueue Workload) to a phase."""
    if job is None:
        return Observation(Phase.PENDING, "creating the trainer Job")
    conds = conditions_by_type(job)
    if conds.get("Complete", {}).get("status") == "True":
        return Observation(Phase.SUCCEEDED, "training finished", "Completed")
    if conds.get("Failed", {}).get("status") == "True":
        reason, message = failure_message(job, pods)
        return Observation(Phase.FAILED, message, reason)
    if (job.get("spec") or {}).get("suspend"):
        return _suspended(workload)
    active = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    if any((p.get("status") or {}).get("phase") == "Running" for p in active):
        return Observation(Phase.RUNNING, "training", "Running")
    unschedulable = pending_reason(active)
    if unschedulable:
        return Observation(
            Phase.QUEUED, f"trainer pod cannot be scheduled yet: {unschedulable}", "Unschedulable"
        )
    stuck = container_waiting(active)
    if stuck:
        return Observation(Phase.QUEUED, f"trainer pod cannot start: {stuck}", NOT_STARTING)
    if active:
        return Observation(Phase.QUEUED, "trainer pod is starting", "PodPending")
    return Observation(Phase.QUEUED, "waiting for the trainer pod", "JobCreated")


CREATION_PATIENCE = timedelta(seconds=10)
"""How old a trainer Job without pods must be before the operator asks its Events why."""


def age(created: str | datetime | None) -> timedelta | None:
    """Time since ``created``, an object's ``metadata.creationTimestamp`` (RFC 3339 text as the
    API server writes it); None when it is unknown."""
    if not created:
        return None
    if isinstance(created, str):
        return datetime.now(UTC) - parse_time(created)
    when = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    return datetime.now(UTC) - when


def creation_refusal(events: list[dict[str, Any]]) -> str | None:
    """The newest ``FailedCreate`` message among a Job's Events: what the API server said
    when the Job controller tried to create its pod (a full ResourceQuota, a Pod Security or
    admission policy, a missing PriorityClass or ServiceAccount)."""
    failed = [e for e in events if e.get("reason") == "FailedCreate" and e.get("message")]
    if not failed:
        return None

    def when(event: dict[str, Any]) -> str:
        meta = event.get("metadata") or {}
        return str(
            event.get("lastTimestamp") or event.get("eventTime") or meta.get("creationTimestamp")
        )

    return str(max(failed, key=when)["message"])


def pod_creation_refused(message: str) -> Observation:
    return Observation(
        Phase.QUEUED, f"the trainer pod cannot be created: {message}", "PodCreationRefused"
    )


def finished_at(job: dict[str, Any]) -> str:
    """When the Job finished, by its own status (the time the operator saw it otherwise)."""
    done = (job.get("status") or {}).get("completionTime")
    if done:
        return str(done)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond.get("lastTransitionTime") or now())
    return now()


def deployment_ready(deploy: dict[str, Any] | None) -> tuple[bool, str]:
    if deploy is None:
        return False, "serving Deployment not created yet"
    want = (deploy.get("spec") or {}).get("replicas", 1)
    ready = (deploy.get("status") or {}).get("readyReplicas") or 0
    if want and ready >= want:
        return True, f"{ready}/{want} replicas ready"
    return False, f"{ready}/{want} replicas ready"


@dataclass(frozen=True)
class ServingState:
    """What a server Deployment and its pods mean for the ServingReady condition."""

    ready: bool
    reason: str
    message: str


def _current_pods(deploy: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods made from the Deployment's current serve config (not an older one's)."""
    template = ((deploy.get("spec") or {}).get("template") or {}).get("metadata") or {}
    want = (template.get("annotations") or {}).get(manifests.CONFIG_HASH_ANNOTATION)
    if want is None:
        return pods
    return [
        p
        for p in pods
        if (p["metadata"].get("annotations") or {}).get(manifests.CONFIG_HASH_ANNOTATION) == want
    ]


def launcher_refusal(pods: list[dict[str, Any]]) -> str | None:
    """Why the launcher refused to start vLLM in a server container (newest pod first), from
    its termination message: an adapter or config problem that restarts cannot fix."""
    for pod in _newest(pods):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated") or {}
                if term.get("exitCode") != launcher.EXIT_REFUSED:
                    continue
                lines = [ln for ln in (term.get("message") or "").strip().splitlines() if ln]
                said = lines[-1].removeprefix(launcher.REFUSAL_PREFIX) if lines else ""
                name = pod["metadata"].get("name", "?")
                where = f"pod {name}, exit code {launcher.EXIT_REFUSED}"
                return f"{said[:1000]} ({where})" if said else f"no message ({where})"
    return None


def serving_state(deploy: dict[str, Any] | None, pods: list[dict[str, Any]]) -> ServingState:
    """The server's readiness, and what stands in its way when it is not ready.

    In order: zero replicas asked for (``ScaledToZero``); the launcher refused to start
    (``LaunchRefused``, with its message: e.g. an adapter rank too high or another base
    model); a pod's container cannot start (``PodNotStarting``, in the kubelet's words: a
    missing Secret, an image it cannot pull, a crash loop); the Deployment cannot create pods
    (``ReplicaFailure``: a quota or an admission policy, in the API server's words); else not
    ready yet, counted in replicas.
    """
    if deploy is None:
        return ServingState(False, "DeploymentNotReady", "serving Deployment not created yet")
    ready, counted = deployment_ready(deploy)
    if ready:
        return ServingState(True, "DeploymentReady", counted)
    if (deploy.get("spec") or {}).get("replicas", 1) == 0:
        return ServingState(
            False, "ScaledToZero", "serving is scaled to zero (`spec.serve.replicas: 0`)"
        )
    current = _current_pods(deploy, pods)
    refusal = launcher_refusal(current)
    if refusal is not None:
        return ServingState(False, "LaunchRefused", f"the server refuses to start: {refusal}")
    stuck = container_waiting(current)
    if stuck is not None:
        return ServingState(False, NOT_STARTING, f"{counted}; a server pod cannot start: {stuck}")
    failure = conditions_by_type(deploy).get("ReplicaFailure") or {}
    if failure.get("status") == "True":
        why = failure.get("message") or failure.get("reason") or "pods cannot be created"
        return ServingState(
            False, "ReplicaFailure", f"{counted}; the server's pods cannot be created: {why}"
        )
    return ServingState(False, "DeploymentNotReady", counted)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None = None,
) -> list[Condition]:
    """Returns the list with one condition set; its transition time moves only on a change."""
    value = "Unknown" if status is None else ("True" if status else "False")
    out: list[Condition] = []
    found = False
    for c in conditions:
        if c.type != type_:
            out.append(c)
            continue
        found = True
        changed = c.status != value
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now() if changed else c.last_transition_time,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now(),
                observed_generation=generation,
            )
        )
    return out
