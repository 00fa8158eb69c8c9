"""Runs a ``provider: openai`` FineTuneJob on OpenAI's fine-tuning API, one reconcile at a time.

The handler calls :func:`step` on every tick with a client (``openai_client.make_client``), the
parsed spec, the owner and the stored status; it gets back the new status, Kubernetes Events to
post and whether the job is finished. On deletion it calls :func:`cleanup`. This module never talks
to the Kubernetes API server: the handler reads the Secret and the dataset and passes them in.

Never a second paid job
-----------------------
``step`` is level-triggered and keeps no state of its own. Each call looks before it acts:

1. ``status.remote.id`` set → retrieve that job. Otherwise list the jobs whose metadata carries
   this FineTuneJob's UID (``fine_tuning.jobs.list(metadata={"kubetune.io/uid": uid})``, checked
   again on our side in case a compatible server ignores the filter) and adopt what it finds.
2. Only when no job exists: find the uploaded files by their deterministic names
   (``kubetune-<uid>-<role>-<sha256 prefix>.jsonl``, so an edited dataset is a new file), upload
   what is missing, wait (tick by tick, ids recorded in ``status.remote``) until OpenAI has
   processed them (:mod:`openai_files`), then create the job with that metadata.
3. Uploads and create are sent once (client retries off for them): OpenAI has no idempotency
   key, so a retry after a lost answer would store a second file or start a second paid job.
   The error goes to the handler as temporary; the next tick finds the file by its name, or
   the job by step 1.

So if the operator dies anywhere (after an upload, after create, before the status patch) the
next tick adopts what exists instead of creating it again. What this relies on: the list
endpoint shows a job as soon as create has answered, and one operator works on a FineTuneJob
at a time. kopf runs standalone (no peering), so nothing in kopf ensures the latter: the
chart does, with one replica and the ``Recreate`` strategy (the old pod is gone before the new
one starts). Within one operator, a tick and the deletion cleanup of the same FineTuneJob
never overlap (``openai_handlers`` holds a lock per UID), and ``step`` checks ``stopping``
right before uploading and before creating, so a job being deleted gets no new paid job.

Following
---------
Each tick retrieves the job and reads its events newest first, back to
``status.remote.lastEventId``; :mod:`openai_status` turns them into phase, progress, cost and
endpoint (the handler creates the endpoint ConfigMap from ``status.endpoint``). ``suspend``
cancels an unfinished job (it ends Cancelled); :func:`cleanup` on deletion cancels and deletes
the uploaded files unless ``keepFiles``.

Once a remote job exists, only its terminal status ends the FineTuneJob. An auth, not-found
or quota error while following is temporary with a long delay, any other refusal (400, 422 on
retrieve, events or cancel) temporary and backing off (:func:`openai_errors.while_following`):
the remote job runs on, so the FineTuneJob waits instead of failing. Before that, they fail it.

Errors leave as :mod:`openai_errors` classes; the API key never appears in anything returned
or raised (see that module).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import openai
from openai.types.fine_tuning import (
    DpoHyperparametersParam,
    FineTuningJob,
    FineTuningJobEvent,
    job_create_params,
)

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus, openai_spec
from kubetune.operator import manifests
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_files as uploads
from kubetune.operator import openai_status as ostatus
from kubetune.operator import status as st
from kubetune.operator.openai_status import TERMINAL
from kubetune.operator.status import Event

log = logging.getLogger(__name__)

META_UID = "kubetune.io/uid"
META_NAMESPACE = "kubetune.io/namespace"
META_NAME = "kubetune.io/name"
EVENT_PAGE_SIZE = 100
MAX_EVENT_PAGES = 10
"""Events are read newest first; older ones past 1,000 are not needed for the status."""


@dataclass(frozen=True)
class StepResult:
    status: jobstatus.FineTuneJobStatus
    """The whole new status."""

    patch: dict[str, Any]
    """Merge patch (camelCase) from the status passed in to ``status``; removed fields are null."""

    events: list[Event] = field(default_factory=list)
    """Events to post, oldest first."""

    finished: bool = False
    """The remote job is over (Succeeded, Failed or Cancelled): stop polling."""


# ----------------------------------------------------------------------------- helpers


def _openai_spec(spec: ftj.FineTuneJobSpec) -> openai_spec.OpenAISpec:
    if spec.openai is None:
        raise errors.PermanentProviderError(
            "`openai` is required when `provider` is `openai`", reason="InvalidSpec"
        )
    return spec.openai


# ----------------------------------------------------------------------------- lookups


def jobs_of(client: openai.OpenAI, uid: str) -> list[FineTuningJob]:
    """Every remote job created for this FineTuneJob UID, newest first."""
    with errors.translated("listing fine-tuning jobs", errors.client_secrets(client)):
        page = client.fine_tuning.jobs.list(metadata={META_UID: uid}, limit=100)
        found = [j for j in page if (j.metadata or {}).get(META_UID) == uid]
    return sorted(found, key=lambda j: j.created_at, reverse=True)


def _find_job(client: openai.OpenAI, uid: str, events: list[Event]) -> FineTuningJob | None:
    """The job made for ``uid`` that no status recorded (a lost answer, a crash), if any."""
    found = jobs_of(client, uid)
    if not found:
        return None
    if len(found) > 1:
        ids = ", ".join(j.id for j in found)
        text = f"OpenAI has {len(found)} jobs for this FineTuneJob ({ids}); following one"
        events.append(Event("Warning", "DuplicateRemoteJobs", text))
    live = [j for j in found if j.status not in TERMINAL]
    job = (live or found)[0]
    log.info("adopting OpenAI job %s found by its metadata (uid %s)", job.id, uid)
    return job


def _number_or_auto(value: str) -> float | Literal["auto"]:
    return "auto" if value == "auto" else float(value)


def create_params(oa: openai_spec.OpenAISpec) -> job_create_params.Method:
    """The ``method`` object of the create request, from the spec's method and hyperparameters."""
    hp = oa.hyperparameters
    epochs: int | Literal["auto"] = hp.n_epochs
    batch: int | Literal["auto"] = hp.batch_size
    lr = _number_or_auto(hp.learning_rate_multiplier)
    if oa.method == "dpo":
        dpo: DpoHyperparametersParam = {
            "n_epochs": epochs,
            "batch_size": batch,
            "learning_rate_multiplier": lr,
        }
        if hp.beta is not None:
            dpo["beta"] = _number_or_auto(hp.beta)
        return {"type": "dpo", "dpo": {"hyperparameters": dpo}}
    return {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": batch,
                "learning_rate_multiplier": lr,
            }
        },
    }


def _create_job(
    client: openai.OpenAI,
    oa: openai_spec.OpenAISpec,
    owner: manifests.Owner,
    remote: jobstatus.RemoteJob,
) -> FineTuningJob:
    assert remote.training_file is not None
    metadata = {META_UID: owner.uid, META_NAMESPACE: owner.namespace, META_NAME: owner.name}
    once = client.with_options(max_retries=0)  # a retried create could make a second paid job
    with errors.translated("creating the fine-tuning job", errors.client_secrets(client)):
        job = once.fine_tuning.jobs.create(
            model=oa.model,
            training_file=remote.training_file,
            validation_file=remote.validation_file or openai.omit,
            method=create_params(oa),
            suffix=oa.suffix or openai.omit,
            seed=oa.seed if oa.seed is not None else openai.omit,
            metadata=metadata,
        )
    log.info("created OpenAI job %s for %s/%s", job.id, owner.namespace, owner.name)
    return job


def new_events(
    client: openai.OpenAI, job_id: str, last_event_id: str | None
) -> list[FineTuningJobEvent]:
    """The job's events after ``last_event_id``, oldest first (the API lists newest first)."""
    out: list[FineTuningJobEvent] = []
    with errors.translated(f"reading the events of job {job_id}", errors.client_secrets(client)):
        page = client.fine_tuning.jobs.list_events(job_id, limit=EVENT_PAGE_SIZE)
        for n, current in enumerate(page.iter_pages()):
            for ev in current.data:
                if ev.id == last_event_id:
                    return out[::-1]
                out.append(ev)
            if n + 1 >= MAX_EVENT_PAGES:
                break
    return out[::-1]


def _cancel(client: openai.OpenAI, job_id: str) -> FineTuningJob | None:
    """Cancels the job; None when it no longer exists. A job that ended meanwhile is kept."""
    try:
        with errors.translated(f"cancelling job {job_id}", errors.client_secrets(client)):
            return client.fine_tuning.jobs.cancel(job_id)
    except errors.NotFoundProviderError:
        return None
    except errors.PermanentProviderError as exc:
        if exc.reason != "BadRequest":  # 400 is "already finished"; look before giving up
            raise
        with errors.translated(f"reading job {job_id}", errors.client_secrets(client)):
            job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        raise


# ----------------------------------------------------------------------------- entry points


def step(
    client: openai.OpenAI,
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    *,
    training: uploads.Dataset,
    validation: uploads.Dataset | None = None,
    prices: Mapping[str, float],
    generation: int | None = None,
    stopping: Callable[[], str | None] | None = None,
) -> StepResult:
    """One reconcile: adopt or create the remote job, then read it into the status.

    ``training`` / ``validation`` are read only when a file must be uploaded (pass a function
    to fetch lazily). ``stopping`` is asked right before uploading and right before creating
    the job; when it names a reason (the FineTuneJob is being deleted), neither is done and the
    status says why. Raises :class:`openai_errors.PermanentProviderError` (mark the job Failed
    with its message) or :class:`openai_errors.TemporaryProviderError` (retry after ``delay``);
    nothing is half-written: the next call finds what this one created.
    """
    oa = _openai_spec(spec)
    new = status.model_copy(deep=True)
    if jobstatus.Phase(new.phase).finished:
        return StepResult(new, {}, [], True)
    remote = new.remote.model_copy() if new.remote is not None else jobstatus.RemoteJob()
    out: list[Event] = []
    if remote.id:
        try:
            with errors.translated(f"reading job {remote.id}", errors.client_secrets(client)):
                recorded = client.fine_tuning.jobs.retrieve(remote.id)
            return _follow(
                client, spec, owner, status, new, remote, recorded, out, prices, generation
            )
        except errors.PermanentProviderError as exc:
            # The remote job runs (and bills) whatever we can read: only its own terminal
            # status ends the FineTuneJob; anything else is waited out.
            raise _while_following(exc, remote.id, owner, oa) from None

    job = _find_job(client, owner.uid, out)
    if job is None:
        if spec.suspend:
            new.phase = jobstatus.Phase.QUEUED
            new.message = "suspended (spec.suspend): nothing is uploaded or created"
            new.conditions = st.set_condition(
                new.conditions, "Ready", False, "Suspended", new.message, generation
            )
            new.observed_generation = generation
            return StepResult(new, ostatus.status_patch(status, new), out, False)
        why = stopping() if stopping is not None else None
        if why is not None:
            return _stopped(status, new, remote, why, out)
        seen = uploads.ensure(client, owner.uid, remote, training, validation)
        waiting = uploads.waiting(client, remote, seen)
        if waiting is not None:
            # Recorded, so the next tick neither reads the dataset nor lists the files again.
            new.remote, new.message, new.observed_generation = remote, waiting, generation
            return StepResult(new, ostatus.status_patch(status, new), out, False)
        why = stopping() if stopping is not None else None
        if why is not None:
            return _stopped(status, new, remote, why, out)
        job = _create_job(client, oa, owner, remote)
        out.append(Event("Normal", "Created", f"created OpenAI fine-tuning job {job.id}"))
    try:
        return _follow(client, spec, owner, status, new, remote, job, out, prices, generation)
    except errors.PermanentProviderError as exc:
        # Found or created just now, not recorded yet: the next tick adopts it by metadata.
        raise _while_following(exc, job.id, owner, oa) from None


def _while_following(
    exc: errors.PermanentProviderError,
    job_id: str,
    owner: manifests.Owner,
    oa: openai_spec.OpenAISpec,
) -> errors.TemporaryProviderError:
    return errors.while_following(exc, job_id, f"{owner.namespace}/{oa.api_key_secret_ref.name}")


def _stopped(
    status: jobstatus.FineTuneJobStatus,
    new: jobstatus.FineTuneJobStatus,
    remote: jobstatus.RemoteJob,
    why: str,
    out: list[Event],
) -> StepResult:
    """Nothing more is uploaded or created; what was already uploaded stays recorded."""
    if remote != jobstatus.RemoteJob():
        new.remote = remote
    new.message = f"{why}: no file is uploaded and no OpenAI job is created"
    return StepResult(new, ostatus.status_patch(status, new), out, False)


def _follow(
    client: openai.OpenAI,
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    new: jobstatus.FineTuneJobStatus,
    remote: jobstatus.RemoteJob,
    job: FineTuningJob,
    out: list[Event],
    prices: Mapping[str, float],
    generation: int | None,
) -> StepResult:
    """Cancels ``job`` if suspended, then reads it and its new events into the status."""
    oa = _openai_spec(spec)
    secrets = errors.client_secrets(client)
    if spec.suspend and job.status not in TERMINAL:
        job = _cancel(client, job.id) or job
        out.append(Event("Normal", "Cancelled", f"spec.suspend: cancelled OpenAI job {job.id}"))

    events = new_events(client, job.id, remote.last_event_id if remote.id == job.id else None)
    new.remote = remote
    ostatus.apply(
        new, job, events, oa=oa, owner=owner, prices=prices, generation=generation,
        secrets=secrets, out=out,
    )  # fmt: skip
    out = ostatus.posted(events, secrets) + out
    new.observed_generation = generation
    return StepResult(
        new, ostatus.status_patch(status, new), out, jobstatus.Phase(new.phase).finished
    )


def cleanup(
    client: openai.OpenAI,
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
) -> list[Event]:
    """On deletion: cancel this FineTuneJob's unfinished remote jobs, delete its files.

    Jobs are found by the recorded id and by metadata (a job created just before a crash is
    not in the status); files by the recorded ids and by name. Files stay when
    ``spec.openai.keepFiles`` is set. Gone jobs and files are not errors.
    """
    oa = _openai_spec(spec)
    out: list[Event] = []
    jobs = {j.id: j for j in jobs_of(client, owner.uid)}
    recorded = status.remote.id if status.remote else None
    if recorded and recorded not in jobs:
        try:
            with errors.translated(f"reading job {recorded}", errors.client_secrets(client)):
                jobs[recorded] = client.fine_tuning.jobs.retrieve(recorded)
        except errors.NotFoundProviderError:
            pass
    for job in jobs.values():
        if job.status not in TERMINAL and _cancel(client, job.id) is not None:
            out.append(Event("Normal", "Cancelled", f"cancelled OpenAI job {job.id}"))
    if oa.keep_files:
        return out
    ids = {f.id for f in uploads.files_of(client, owner.uid)}
    if status.remote is not None:
        ids |= {i for i in (status.remote.training_file, status.remote.validation_file) if i}
    for file_id in sorted(ids):
        try:
            with errors.translated(f"deleting file {file_id}", errors.client_secrets(client)):
                client.files.delete(file_id)
            out.append(Event("Normal", "FileDeleted", f"deleted uploaded file {file_id}"))
        except errors.NotFoundProviderError:
            pass
    return out
