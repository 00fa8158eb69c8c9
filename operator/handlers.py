"""kopf handlers for FineTuneJob and ModelServer: thin glue between watch events, the
providers and status.

One timer per FineTuneJob reconciles it level-triggered: parse the spec, validate the dataset
(once, before anything is created), hand over to the provider, write the status it returns and
post an Event when the phase changes. Children are read from watch indices
(:mod:`kubetune.operator.watch_indices`: no GETs per tick), so hundreds of jobs cost little.
kopf keeps its own bookkeeping in annotations, because the status schema is structural and
would prune a ``status.kopf`` field.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.api import modelserver as ms
from kubetune.api.types import ApiModel
from kubetune.operator import (
    adapter_reports,
    checks,
    kube,
    local_provider,
    manifests,
    metrics,
    model_server,
    openai_errors,
    openai_handlers,
    watch_indices,
)
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import Event
from kubetune.server import launcher

log = logging.getLogger(__name__)
SETTINGS = OperatorSettings.from_env()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # phase changes are posted explicitly below
    settings.peering.standalone = True
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    # The indices (watch_indices) filter by label in the operator, after the API server has
    # sent every Pod, Job, ConfigMap and Deployment of the cluster: on a shared cluster, most of
    # it. The same selector on the watch itself makes the API server send only kubetune's
    # children.
    managed = ",".join(f"{k}={v}" for k, v in watch_indices.MANAGED.items())
    for resource in watch_indices.CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = managed


# ----------------------------------------------------------------------------- metrics


def _metrics_on(**_: Any) -> bool:
    return metrics.served()


@kopf.on.event(ftj.GROUP, ftj.VERSION, ftj.PLURAL, when=_metrics_on)
async def count_jobs(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Feeds the Prometheus metrics (``--metrics``) from every watch event of a FineTuneJob.
    Async: it only counts, so it runs in kopf's loop instead of a worker thread."""
    metrics.JOBS.observe(type, body, datetime.datetime.now(datetime.UTC))


@kopf.on.event(ftj.GROUP, ftj.VERSION, ms.PLURAL, when=_metrics_on)
async def count_servers(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Feeds the ModelServer gauges from every watch event of a ModelServer."""
    metrics.SERVERS.observe(type, body)


# ----------------------------------------------------------------------------- status


def _status_patch(old: dict[str, Any], new: ApiModel) -> dict[str, Any]:
    """A merge patch from the stored status to ``new``; removed fields become null."""
    wire = new.to_wire()
    patch: dict[str, Any] = {k: v for k, v in wire.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in wire})
    return patch


RECONCILED = "Reconciled"
"""Condition present (False) only while the operator retries a failed step, with the error."""


def _fail(
    status: jobstatus.FineTuneJobStatus,
    message: str,
    generation: int | None,
    reason: str = "Invalid",
) -> jobstatus.FineTuneJobStatus:
    """``status`` as Failed; ``reason`` (CamelCase) goes to the Ready condition."""
    new = status.model_copy(deep=True)
    new.phase = jobstatus.Phase.FAILED
    new.message = message
    new.completion_time = new.completion_time or st.now()
    new.conditions = st.set_condition(new.conditions, "Ready", False, reason, message, generation)
    return new


def _failure_reason(exc: Exception) -> str:
    """The Ready condition's reason for a permanent error: the provider's own, when it has one."""
    if isinstance(exc, openai_errors.ProviderError):
        return exc.reason
    if isinstance(exc, kube.NameTaken):
        return "NameTaken"
    return "Invalid"


def _validated(status: jobstatus.FineTuneJobStatus) -> bool:
    """Whether an OpenAI job's dataset was checked and uploaded already (no need to read it)."""
    remote = status.remote
    return status.estimate is not None and remote is not None and bool(remote.training_file)


def _stopping(stopped: kopf.DaemonStopped | None, meta: kopf.Meta) -> Callable[[], str | None]:
    """Why this tick must not start paid work any more (read live, at the moment it asks)."""

    def why() -> str | None:
        if meta.get("deletionTimestamp"):
            return "the FineTuneJob is being deleted"
        if stopped is not None and stopped.is_set():
            return "the operator is stopping this FineTuneJob's timer"
        return None

    return why


def _validate(
    spec: ftj.FineTuneJobSpec,
    namespace: str,
    status: jobstatus.FineTuneJobStatus,
    created: str | None = None,
) -> jobstatus.FineTuneJobStatus:
    """Checks the datasets and writes the estimate; raises checks.InvalidJob on bad data."""
    new = status.model_copy(deep=True)
    new.phase = jobstatus.Phase.VALIDATING
    new.model = spec.openai.model if spec.openai else (spec.model.display if spec.model else None)
    train = checks.check_dataset(spec.dataset, namespace, "spec.dataset", spec, created=created)
    if spec.validation is not None:
        checks.check_dataset(spec.validation, namespace, "spec.validation", spec, created=created)
    if train is not None:
        new.estimate = checks.estimate(spec, train.report, SETTINGS)
    return new


# ----------------------------------------------------------------------------- reconcile


@kopf.timer(ftj.GROUP, ftj.VERSION, ftj.PLURAL, interval=SETTINGS.reconcile_interval, idle=None)
def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    meta: kopf.Meta,
    patch: kopf.Patch,
    stopped: kopf.DaemonStopped | None = None,
    retry: int = 0,
    **kwargs: Any,
) -> None:
    indices: watch_indices.Indices = kwargs  # kopf passes each index by its name
    namespace = namespace or "default"
    stored = {k: v for k, v in dict(status).items() if k != "kopf"}
    old = jobstatus.FineTuneJobStatus.model_validate(stored)
    generation = meta.get("generation")
    if old.phase in (jobstatus.Phase.FAILED, jobstatus.Phase.CANCELLED):
        return
    owner = manifests.Owner(name=name, namespace=namespace, uid=uid)
    key = (namespace, name)
    events: list[Event] = []
    try:
        parsed = checks.parse_spec(dict(spec))
        openai = parsed.provider == ftj.Provider.OPENAI
        if openai and old.phase == jobstatus.Phase.SUCCEEDED:
            if openai_handlers.endpoint_published(old):
                return  # nothing left to follow; the endpoint ConfigMap exists
            new, events = openai_handlers.publish_endpoint(owner, old, generation)
            _write(body, patch, stored, old, new, events)
            return
        if (
            old.start_time is None
            and old.phase in (jobstatus.Phase.PENDING, jobstatus.Phase.VALIDATING)
            and not (openai and _validated(old))
        ):
            # Validation gets a tick of its own, so the estimate is in status (and the
            # Validating event posted) before anything is uploaded or scheduled.
            new = _validate(parsed, namespace, old, meta.get("creationTimestamp"))
            if old.phase == jobstatus.Phase.PENDING:
                _write(body, patch, stored, old, new, events)
                return
        else:
            new = old
        if openai:
            new, events = openai_handlers.reconcile(
                parsed, owner, new, SETTINGS, generation, stopping=_stopping(stopped, meta)
            )
        else:
            children = watch_indices.children(indices, key, uid, parsed.serve.server)
            new = local_provider.reconcile(parsed, owner, new, children, SETTINGS, generation)
    except (
        checks.InvalidJob,
        kube.PermanentKubeError,
        openai_errors.PermanentProviderError,
    ) as exc:
        new = _fail(old, str(exc), generation, _failure_reason(exc))
    except (kube.TemporaryKubeError, openai_errors.TemporaryProviderError) as exc:
        api = "openai" if isinstance(exc, openai_errors.TemporaryProviderError) else "kubernetes"
        metrics.RETRIES.labels(ftj.KIND, api).inc()
        # Shown in status (timers apply the patch on every attempt), then retried after delay.
        retrying = old.model_copy(deep=True)
        retrying.conditions = st.set_condition(
            old.conditions, RECONCILED, False, "Retrying", str(exc), generation
        )
        _write(body, patch, stored, old, retrying, [])
        delay = exc.delay
        if isinstance(exc, openai_errors.TemporaryProviderError):
            delay = openai_errors.retry_delay(exc, retry)  # a lasting outage backs off
        raise kopf.TemporaryError(str(exc), delay=delay) from None
    new.conditions = [c for c in new.conditions if c.type != RECONCILED]
    _write(body, patch, stored, old, new, events)


def _write(
    body: kopf.Body,
    patch: kopf.Patch,
    stored: dict[str, Any],
    old: jobstatus.FineTuneJobStatus,
    new: jobstatus.FineTuneJobStatus,
    events: list[Event],
) -> None:
    """Patches the status and posts the provider's events plus one per phase change."""
    changes = _status_patch(stored, new)
    if changes:
        patch.status.update(changes)
    for ev in events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
    if new.phase != old.phase:
        kind = "Warning" if new.phase == jobstatus.Phase.FAILED else "Normal"
        kopf.event(body, type=kind, reason=str(new.phase), message=new.message or str(new.phase))
        meta = body.get("metadata") or {}
        log.info(
            "FineTuneJob %s/%s: %s -> %s: %s",
            meta.get("namespace"),
            meta.get("name"),
            old.phase,
            new.phase,
            new.message or "",
        )


@kopf.timer(ftj.GROUP, ftj.VERSION, ms.PLURAL, interval=SETTINGS.reconcile_interval, idle=None)
def reconcile_model_server(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    meta: kopf.Meta,
    patch: kopf.Patch,
    **kwargs: Any,
) -> None:
    """One timer per ModelServer: its adapters are those of the jobs that name it (index)."""
    indices: watch_indices.Indices = kwargs
    namespace = namespace or "default"
    stored = {k: v for k, v in dict(status).items() if k != "kopf"}
    old = ms.ModelServerStatus.model_validate(stored)
    generation = meta.get("generation")
    owner = manifests.Owner(name=name, namespace=namespace, uid=uid, kind=ms.KIND)
    key = (namespace, name)
    try:
        parsed = ms.ModelServerSpec.model_validate(dict(spec))
    except ValidationError as exc:
        problem = launcher.validation_problem(exc, "spec")
        new = old.model_copy(deep=True)
        new.conditions = st.set_condition(
            old.conditions, "Ready", False, "Invalid", problem, generation
        )
        patch.status.update(_status_patch(stored, new))
        return
    pods = list(indices["model_server_pods"].get(key, []))
    try:
        new = model_server.reconcile(
            parsed,
            owner,
            indices["served_jobs"].get(key, []),
            watch_indices.one(indices["model_server_deployments"], key, uid),
            pods,
            old,
            SETTINGS,
            generation,
            adapter_reports.read(pods) if parsed.live else None,
        )
    except kube.TemporaryKubeError as exc:
        metrics.RETRIES.labels(ms.KIND, "kubernetes").inc()
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    changes = _status_patch(stored, new)
    if changes:
        patch.status.update(changes)
    for ev in model_server.events(old, new, parsed.live):
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)


def _drops_output(spec: kopf.Spec, **_: Any) -> bool:
    return (
        spec.get("provider", "local") == "local"
        and (spec.get("output") or {}).get("keepOnDelete") is False
    )


CLEANUP_PATIENCE = datetime.timedelta(hours=1)
"""How long a deletion retries its cleanup (an API that stays unreachable) before letting go:
a finalizer that never finishes would keep the FineTuneJob, and its namespace, Terminating."""


def _parse_for_cleanup(body: kopf.Body, spec: kopf.Spec) -> ftj.FineTuneJobSpec | None:
    """The spec, or None (with a Warning) when the stored one no longer parses."""
    try:
        return checks.parse_spec(dict(spec))
    except checks.InvalidJob as exc:
        kopf.warn(body, reason="CleanupSkipped", message=f"the stored spec is invalid: {exc}")
        return None


def _retry_or_let_go(
    body: kopf.Body,
    exc: kube.TemporaryKubeError | openai_errors.TemporaryProviderError,
    runtime: datetime.timedelta,
    left_behind: str,
) -> None:
    """Retries the cleanup later; after CLEANUP_PATIENCE, says what is left and lets go."""
    if runtime < CLEANUP_PATIENCE:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    kopf.warn(
        body, reason="CleanupSkipped", message=f"gave up after {runtime}: {exc}; {left_behind}"
    )


@kopf.on.delete(ftj.GROUP, ftj.VERSION, ftj.PLURAL, when=_drops_output)
def delete_output(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    uid: str,
    runtime: datetime.timedelta,
    **kwargs: Any,
) -> None:
    """Children go with the owner references; the adapter folder goes only when asked.

    The folder is emptied only once no trainer can write to it: the trainer writes a checkpoint
    when it is stopped, and the garbage collector stops it only after this finalizer is done. So
    the trainer Job is deleted first, in the foreground (its pods get their grace period), and the
    cleanup starts once it is gone. Deleting, not suspending: Kueue would unsuspend an admitted
    queued Job, and would admit a still-queued one while the folder is being emptied.
    """
    parsed = _parse_for_cleanup(body, spec)
    if parsed is None:
        return
    owner = manifests.Owner(name=name, namespace=namespace or "default", uid=uid)
    job = watch_indices.children(kwargs, (owner.namespace, name), uid).job
    try:
        if job is not None:
            if not job["metadata"].get("deletionTimestamp"):
                trainer = manifests.trainer_name(owner)
                kube.delete("batch/v1", "Job", owner.namespace, trainer, foreground=True)
            raise kube.TemporaryKubeError(
                "waiting for the trainer Job and its pods to go", delay=3.0
            )
        kube.create_or_adopt(manifests.cleanup_job(parsed, owner, SETTINGS))
    except kube.TemporaryKubeError as exc:
        _retry_or_let_go(body, exc, runtime, "the output folder was not removed")
    except kube.PermanentKubeError as exc:
        # Typically the namespace is being deleted (no new Jobs allowed there); blocking the
        # finalizer would keep the namespace Terminating forever, so give up loudly instead.
        kopf.warn(body, reason="CleanupSkipped", message=f"output folder not removed: {exc}")


def _is_openai(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("provider") == "openai"


@kopf.on.delete(ftj.GROUP, ftj.VERSION, ftj.PLURAL, when=_is_openai)
def delete_remote(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    runtime: datetime.timedelta,
    **_: Any,
) -> None:
    """A finalizer: cancel the paid remote job if it is still running, delete the uploads."""
    parsed = _parse_for_cleanup(body, spec)
    if parsed is None:
        return
    owner = manifests.Owner(name=name, namespace=namespace or "default", uid=uid)
    old = jobstatus.FineTuneJobStatus.model_validate(
        {k: v for k, v in dict(status).items() if k != "kopf"}
    )
    try:
        events = openai_handlers.cleanup(parsed, owner, old, SETTINGS)
    except (kube.TemporaryKubeError, openai_errors.TemporaryProviderError) as exc:
        remote = old.remote.id if old.remote else None
        left = f"remote job {remote} may still run: cancel it and delete its files at OpenAI"
        _retry_or_let_go(body, exc, runtime, left)
        return
    except openai_errors.PermanentProviderError as exc:
        raise kopf.PermanentError(str(exc)) from None
    for ev in events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
