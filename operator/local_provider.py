"""Reconciles one ``provider: local`` FineTuneJob: trainer Job, progress, serving, endpoint.

Level-triggered and idempotent: each call looks at what exists (``Children``, read from the
operator's watch indices), creates what is missing with deterministic names, and returns the
new status. Calling it twice, or after an operator restart, creates nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.api import modelserver as ms
from kubetune.operator import kube, kueue, manifests, serving_manifests
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings
from kubetune.progress import CONFIGMAP_KEY, RESULT_KEY, ProgressRecord
from kubetune.server import launcher

log = logging.getLogger(__name__)


@dataclass
class Children:
    """What the watch indices hold for one FineTuneJob."""

    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    deployment: dict[str, Any] | None = None
    server_pods: list[dict[str, Any]] = field(default_factory=list)
    model_server: dict[str, Any] | None = None
    """The ModelServer that ``spec.serve.server`` names, when it exists."""


def endpoint_url(owner: manifests.Owner) -> str:
    name = serving_manifests.server_name(owner)
    return f"http://{name}.{owner.namespace}.svc:{serving_manifests.SERVER_PORT}/v1"


def ensure_trainer(
    spec: ftj.FineTuneJobSpec, owner: manifests.Owner, settings: OperatorSettings
) -> dict[str, Any]:
    """Creates (or adopts) RBAC, ConfigMaps and the trainer Job, in dependency order.

    The config ConfigMap is applied, not adopted: one left by a tick whose Job creation failed
    may hold a config from a spec edited since (the spec is editable until the Job exists), and
    the Job must start from the config its hash annotation names.
    """
    config = manifests.trainer_config(spec, owner)
    for obj in manifests.trainer_rbac(owner):
        kube.create_or_adopt(obj)
    kube.create_or_adopt(manifests.progress_configmap(owner))
    kube.apply(manifests.trainer_configmap(config, owner))
    return kube.create_or_adopt(manifests.trainer_job(spec, owner, settings, config))


def sync_suspend(
    spec: ftj.FineTuneJobSpec, job: dict[str, Any], owner: manifests.Owner
) -> kueue.Workload | None:
    """`spec.suspend` stops the trainer (pods go; a resume restarts from a checkpoint).

    A Job of its own is suspended and unsuspended directly. A queued Job (``spec.queue``) is
    Kueue's to start: it is stopped and resumed through its Workload, which is returned (for
    the status) whenever it was looked at. Kueue creates the Workload just after the Job; until
    then a suspended queued Job is left as it is. Raises kueue.NotInstalled when nothing can
    ever admit it (a suspend of a running one has been applied to the Job first).
    """
    suspended = bool((job.get("spec") or {}).get("suspend"))
    if spec.queue and (spec.suspend or suspended):
        uid = (job.get("metadata") or {}).get("uid") or ""
        try:
            workload = kueue.find(owner.namespace, uid)
        except kueue.NotInstalled:
            if spec.suspend and not suspended:
                _patch_suspend(spec, owner)
            raise
        if workload is not None:
            if workload.active == spec.suspend:
                workload = kueue.set_active(owner.namespace, workload, not spec.suspend)
            return workload
        if suspended:
            return None
    if suspended == spec.suspend or (spec.queue and suspended):
        return None
    _patch_suspend(spec, owner)
    return None


def _patch_suspend(spec: ftj.FineTuneJobSpec, owner: manifests.Owner) -> None:
    kube.patch_merge(
        "batch/v1",
        "Job",
        owner.namespace,
        manifests.trainer_name(owner),
        {"spec": {"suspend": spec.suspend}},
    )


def read_progress(
    progress_cm: dict[str, Any] | None,
) -> tuple[ProgressRecord | None, dict[str, Any] | None]:
    data = (progress_cm or {}).get("data") or {}
    record = ProgressRecord.from_json(data[CONFIGMAP_KEY]) if CONFIGMAP_KEY in data else None
    result = json.loads(data[RESULT_KEY]) if RESULT_KEY in data else None
    return record, result


APPLIED_HASH = "kubetune.io/applied-hash"
"""On the server Deployment: the hash of the serving objects last applied, all of them."""


def serving_wanted(
    spec: ftj.FineTuneJobSpec, owner: manifests.Owner, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The serving objects and the endpoint ConfigMap, the Deployment last and stamped with
    the hash of them all (so a Deployment carrying that hash means every one was applied)."""
    assert spec.model is not None
    objects = serving_manifests.serving_objects(
        owner=owner,
        serve=spec.serve,
        base_model=spec.model,
        adapter_claim=manifests.output_claim(spec, settings),
        adapter_subpath=manifests.output_subpath(spec, owner),
        lora_rank=spec.lora.r,
        settings=settings,
        queue=spec.serving_queue,
    )
    objects.append(manifests.endpoint_configmap(owner, endpoint_url(owner), owner.name))
    return stamped(objects)


def stamped(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects, the Deployment last, stamped with the hash of them all."""
    objects = sorted(objects, key=lambda obj: obj["kind"] == "Deployment")
    digest = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]
    objects[-1]["metadata"].setdefault("annotations", {})[APPLIED_HASH] = digest
    return objects


def applied_hash(deployment: dict[str, Any] | None) -> str | None:
    """The hash of the objects last applied, from the Deployment that carries it."""
    meta = (deployment or {}).get("metadata") or {}
    return (meta.get("annotations") or {}).get(APPLIED_HASH)


SERVING_RECHECK_SECONDS = 300.0
"""How often the serving objects the Deployment does not stand for (the serve config and
endpoint ConfigMaps, the Service) are read back while nothing changed, so one deleted by hand
comes back: three GETs per job every five minutes instead of a watch of every Service."""

_checked: dict[tuple[str, str], float] = {}
"""(FineTuneJob uid, applied hash) → when its serving objects were last seen whole (monotonic
seconds). In memory only: an operator (re)start reads them back once."""

_clock = time.monotonic


def ensure_serving(
    wanted: list[dict[str, Any]],
    owner: manifests.Owner,
    deployment: dict[str, Any] | None,
) -> None:
    """Applies the serving objects (``serving_wanted``) when they are missing or
    ``spec.serve`` changed.

    The common case, nothing changed, costs no request: the watched Deployment carries the
    hash of what was applied. The objects besides it are not watched; every
    :data:`SERVING_RECHECK_SECONDS` they are read back, and any that is gone is applied again.
    """
    meta = (deployment or {}).get("metadata") or {}
    applied = applied_hash(deployment)
    digest = wanted[-1]["metadata"]["annotations"][APPLIED_HASH]
    if applied == digest:
        key = (owner.uid, digest)
        if _clock() - _checked.get(key, -SERVING_RECHECK_SECONDS) < SERVING_RECHECK_SECONDS:
            return
        for obj in wanted[:-1]:
            if kube.get(obj["apiVersion"], obj["kind"], owner.namespace, obj["metadata"]["name"]):
                continue
            kube.apply(obj)
        _checked[key] = _clock()
        return
    if deployment is not None and _queue(deployment) != _queue(wanted[-1]):
        # Kueue refuses to change the queue of a Deployment whose replicas run: the server is
        # replaced instead, and its new replicas are admitted by the new queue.
        kube.delete("apps/v1", "Deployment", owner.namespace, meta["name"], uid=meta["uid"])
    for obj in wanted:
        kube.apply(obj)
    # Just applied: nothing to read back before the next recheck.
    _checked[(owner.uid, digest)] = _clock()


def _queue(deployment: dict[str, Any]) -> str | None:
    labels = deployment["metadata"].get("labels") or {}
    return labels.get(manifests.KUEUE_QUEUE_LABEL)


def remove_serving(owner: manifests.Owner) -> None:
    """`spec.serve.enabled` turned off after success: take the endpoint and server away."""
    kube.delete("v1", "ConfigMap", owner.namespace, manifests.endpoint_name(owner))
    remove_server(owner)


def remove_server(owner: manifests.Owner) -> None:
    """The job's own server objects (not its endpoint ConfigMap)."""
    name = serving_manifests.server_name(owner)
    kube.delete("apps/v1", "Deployment", owner.namespace, name)
    kube.delete("v1", "Service", owner.namespace, name)
    kube.delete("v1", "ConfigMap", owner.namespace, serving_manifests.config_name(owner))
    for key in [k for k in _checked if k[0] == owner.uid]:
        del _checked[key]


def serving_queue_wait(namespace: str, held: list[dict[str, Any]]) -> str:
    """Why Kueue holds server replicas: the oldest one's Workload, in Kueue's words."""
    pod = held[0]
    labels = pod["metadata"].get("labels") or {}
    queue = labels.get(manifests.KUEUE_QUEUE_LABEL, "?")
    count = f"{len(held)} replica{'s' if len(held) > 1 else ''}"
    try:
        workload = kueue.find(namespace, pod["metadata"]["uid"])
    except kueue.NotInstalled:
        return f"{count} held by Kueue's scheduling gate, but no Kueue Workload API is served"
    if workload is None:
        return f"{count} waiting in the Kueue queue {queue}"
    return f"{count} waiting in the Kueue queue {queue} (workload {workload.name}): " + (
        workload.waiting or "admitted; starting"
    )


def config_problem(exc: ValueError) -> str:
    """A serve config's validation error on one line, each problem with its field."""
    if isinstance(exc, ValidationError):
        return launcher.validation_problem(exc, "serve config")
    return str(exc)


def serve(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    new: jobstatus.FineTuneJobStatus,
    children: Children,
    settings: OperatorSettings,
    generation: int | None,
) -> None:
    """Serving after success, in ``new``: the server follows ``spec.serve``.

    A server the API refuses (a name taken, a quota or a policy that forbids it), or a serve
    config that cannot be built from the spec, is reported in the ServingReady condition
    (reason ServingRefused); the training result stands and the job stays Succeeded.
    """
    if not spec.serve.enabled:
        # Removal is decided by what status says exists, so a removal cut short is finished.
        if children.deployment is not None or new.endpoint is not None:
            remove_serving(owner)
            new.endpoint = None
            new.fine_tuned_model = None
            new.conditions = [c for c in new.conditions if c.type != "ServingReady"]
            new.message = "training finished; serving is off"
        return
    if spec.serve.server is not None:
        serve_shared(spec.serve.server, owner, new, children, generation)
        return
    try:
        wanted = serving_wanted(spec, owner, settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        problem = config_problem(exc)
        new.conditions = st.set_condition(
            new.conditions, "ServingReady", False, "ServingRefused", problem, generation
        )
        new.message = f"training finished; the serve config is invalid: {problem}"
        return
    try:
        ensure_serving(wanted, owner, children.deployment)
    except kube.PermanentKubeError as exc:
        new.conditions = st.set_condition(
            new.conditions, "ServingReady", False, "ServingRefused", str(exc), generation
        )
        new.message = f"training finished; the server could not be created: {exc}"
        return
    state = st.serving_state(children.deployment, children.server_pods)
    ready, reason, why = state.ready, state.reason, state.message
    held = kueue.held_pods(children.server_pods) if reason == "DeploymentNotReady" else []
    if held:
        reason, why = "ServingQueued", f"{why}; {serving_queue_wait(owner.namespace, held)}"
    new.conditions = st.set_condition(
        new.conditions, "ServingReady", ready, reason, why, generation
    )
    new.fine_tuned_model = owner.name
    new.endpoint = jobstatus.EndpointStatus(
        base_url=endpoint_url(owner),
        model=owner.name,
        config_map=manifests.endpoint_name(owner),
    )
    if ready:
        new.message = "serving"
    elif reason in ("ScaledToZero", "LaunchRefused", st.NOT_STARTING, "ReplicaFailure"):
        new.message = f"training finished; {why}"
    else:
        new.message = f"training finished; waiting for vLLM: {why}"


def model_server_url(server: str, namespace: str) -> str:
    owner = manifests.Owner(name=server, namespace=namespace, uid="", kind=ms.KIND)
    return endpoint_url(owner)


def serve_shared(
    server: str,
    owner: manifests.Owner,
    new: jobstatus.FineTuneJobStatus,
    children: Children,
    generation: int | None,
) -> None:
    """``spec.serve.server``: the ModelServer serves the adapter (it picks the job up from its
    own index); the job takes down a server of its own, points its endpoint at the
    ModelServer, and reports in ServingReady what the ModelServer's status says of it."""
    if children.deployment is not None:
        remove_server(owner)
    url = model_server_url(server, owner.namespace)
    if new.endpoint is None or new.endpoint.base_url != url:
        kube.apply(manifests.endpoint_configmap(owner, url, owner.name))
    new.fine_tuned_model = owner.name
    new.endpoint = jobstatus.EndpointStatus(
        base_url=url, model=owner.name, config_map=manifests.endpoint_name(owner)
    )
    ready, reason, why = shared_serving_state(server, owner, children.model_server)
    new.conditions = st.set_condition(
        new.conditions, "ServingReady", ready, reason, why, generation
    )
    new.message = "serving" if ready else f"training finished; {why}"


def shared_serving_state(
    server: str, owner: manifests.Owner, body: dict[str, Any] | None
) -> tuple[bool, str, str]:
    """(ready, reason, message) of the job's ServingReady from its ModelServer's status."""
    if body is None:
        return False, "ModelServerNotFound", f"no ModelServer {server} in {owner.namespace}"
    status = ms.ModelServerStatus.model_validate(body.get("status") or {})
    refused = {r.name: r.message for r in status.refused}
    if owner.name in refused:
        return False, "AdapterRefused", f"ModelServer {server} refuses it: {refused[owner.name]}"
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    if owner.name not in status.adapters:
        why = f"ModelServer {server} has not added the adapter yet"
        if len(status.refused) == ms.MAX_LISTED:  # a full list: this job may be past its end
            why += f" (or refuses it: its status lists {ms.MAX_LISTED} refused jobs at most)"
        return False, "ModelServerPending", why
    if ready is not None and ready.reason == ms.LOADING_ADAPTERS:
        # A `Live` server lists only what every ready replica serves: a change of others'.
        return True, "ModelServerReady", f"served by ModelServer {server} ({ready.message})"
    if ready is None or ready.status != "True":
        why = f"{ready.reason}: {ready.message}" if ready is not None else "no status yet"
        return False, "ModelServerNotReady", f"ModelServer {server} is not ready ({why})"
    return True, "ModelServerReady", f"served by ModelServer {server}: {ready.message}"


def early_refusal(
    server: str,
    owner: manifests.Owner,
    new: jobstatus.FineTuneJobStatus,
    children: Children,
    generation: int | None,
) -> None:
    """While the job trains: a ModelServer that will refuse its adapter (another base model,
    a rank too high) shows in ServingReady at once, not hours later when training ends."""
    _, reason, why = shared_serving_state(server, owner, children.model_server)
    if reason == "AdapterRefused":
        new.conditions = st.set_condition(
            new.conditions, "ServingReady", False, reason, why, generation
        )
    else:  # refused no more (the ModelServer changed), or never
        new.conditions = [
            c
            for c in new.conditions
            if not (c.type == "ServingReady" and c.reason == "AdapterRefused")
        ]


def pod_creation_refusal(job: dict[str, Any] | None) -> str | None:
    """Why the Job controller cannot create the trainer pod, from the Job's Events; None when
    it says nothing (or the operator may not list Events: an older chart's RBAC)."""
    meta = (job or {}).get("metadata") or {}
    if not meta.get("uid"):
        return None
    try:
        events = kube.list_objects(
            "v1",
            "Event",
            str(meta.get("namespace")),
            field_selector=f"involvedObject.uid={meta['uid']},reason=FailedCreate",
        )
    except kube.PermanentKubeError as exc:
        log.info("cannot read the Events of Job %s: %s", meta.get("name"), exc)
        return None
    return st.creation_refusal(events)


def reconcile(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    children: Children,
    settings: OperatorSettings,
    generation: int | None,
) -> jobstatus.FineTuneJobStatus:
    new = status.model_copy(deep=True)
    new.trainer_job = manifests.trainer_name(owner)
    job = children.job
    finished = jobstatus.Phase(new.phase).finished
    # A queued job suspended before it starts gets no Job: Kueue would admit it before the next
    # tick could stop it.
    held = job is None and bool(spec.queue) and spec.suspend
    if job is None and not finished:
        if not held:
            job = ensure_trainer(spec, owner, settings)
        new.start_time = new.start_time or st.now()  # the spec is fixed from here on
    if new.start_time is None and job is not None:
        # The Job was created on a tick whose status patch was lost (the operator stopped,
        # or a later step failed): the spec has been fixed since the Job's creation.
        created = (job.get("metadata") or {}).get("creationTimestamp")
        new.start_time = str(created) if created else st.now()
    workload, no_kueue = None, ""
    if job is not None and not finished:
        try:
            workload = sync_suspend(spec, job, owner)
        except kueue.NotInstalled as exc:
            no_kueue = str(exc)

    record, result = read_progress(children.progress)
    if record is not None:
        new.progress = record.to_status()

    if not finished:
        if held:
            seen = st.Observation(jobstatus.Phase.QUEUED, st.SUSPENDED_BEFORE_START, "Suspended")
        else:
            seen = st.observe_trainer(job, children.pods, workload)
        age = st.age(((job or {}).get("metadata") or {}).get("creationTimestamp"))
        if seen.reason == "JobCreated" and age is not None and age >= st.CREATION_PATIENCE:
            refused = pod_creation_refusal(job)
            if refused:
                seen = st.pod_creation_refused(refused)
        if no_kueue and not spec.suspend and seen.reason == "Suspended":
            seen = st.Observation(jobstatus.Phase.QUEUED, no_kueue, "KueueNotInstalled")
        if seen.phase != jobstatus.Phase.PENDING:
            new.phase = seen.phase
        new.message = seen.message
        new.conditions = st.set_condition(
            new.conditions,
            "Ready",
            seen.phase == jobstatus.Phase.SUCCEEDED,
            seen.reason or "Pending",
            seen.message,
            generation,
        )
        if seen.phase in (jobstatus.Phase.SUCCEEDED, jobstatus.Phase.FAILED):
            new.completion_time = st.finished_at(job) if job else st.now()

    training = not jobstatus.Phase(new.phase).finished
    if training and spec.serve.enabled and spec.serve.server is not None:
        early_refusal(spec.serve.server, owner, new, children, generation)
    if jobstatus.Phase(new.phase) == jobstatus.Phase.SUCCEEDED:
        assert spec.model is not None
        claim = manifests.output_claim(spec, settings)
        new.adapter = jobstatus.AdapterStatus(
            path=f"pvc://{claim}/{manifests.output_subpath(spec, owner)}",
            rank=int((result or {}).get("adapterRank", spec.lora.r)),
            base_model=spec.model.display,
        )
        if result and result.get("trainedTokens") is not None:
            new.trained_tokens = int(result["trainedTokens"])
        serve(spec, owner, new, children, settings, generation)
    new.observed_generation = generation
    return new
