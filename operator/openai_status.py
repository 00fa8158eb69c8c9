"""What an OpenAI fine-tuning job and its events mean for ``FineTuneJob.status``. Pure: no I/O.

``openai_provider`` fetches the job (``FineTuningJob``) and its new events and hands them to
:func:`apply`, which decides the phase, message, conditions, progress, cost and endpoint:

    validating_files → Validating    queued → Queued    running → Running
    succeeded → Succeeded            failed → Failed    cancelled → Cancelled
    anything else (``paused``, a status added later) → the phase stays, condition
    ``RemoteStatusRecognized=False`` says what OpenAI reported

Progress comes from the newest ``metrics`` event (``data``: ``step``, ``total_steps``,
``train_loss``, ``valid_loss``/``full_valid_loss``); cost is ``trained_tokens`` × the price per
1M tokens of the longest matching model prefix in the chart's price table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from kubetune.api import jobstatus, openai_spec
from kubetune.operator import manifests
from kubetune.operator import openai_errors as errors
from kubetune.operator import status as st
from kubetune.operator.settings import DEFAULT_OPENAI_BASE_URL
from kubetune.operator.status import Event

PHASES: dict[str, jobstatus.Phase] = {
    "validating_files": jobstatus.Phase.VALIDATING,
    "queued": jobstatus.Phase.QUEUED,
    "running": jobstatus.Phase.RUNNING,
    "succeeded": jobstatus.Phase.SUCCEEDED,
    "failed": jobstatus.Phase.FAILED,
    "cancelled": jobstatus.Phase.CANCELLED,
}
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
UNKNOWN_STATUS_CONDITION = "RemoteStatusRecognized"

MAX_POSTED_EVENTS = 10
"""OpenAI messages posted as Kubernetes Events per tick, newest kept."""


def iso(ts: int | float | None) -> str | None:
    """A Unix timestamp from the API as RFC 3339, like every time in status."""
    if ts is None:
        return None
    return st.rfc3339(datetime.fromtimestamp(ts, UTC))


def price_per_million(model: str, prices: Mapping[str, float]) -> float | None:
    """The price of the longest model prefix in the table (``gpt-4o-mini`` beats ``gpt-4o``)."""
    matches = [p for p in prices if model.startswith(p)]
    return prices[max(matches, key=len)] if matches else None


def status_patch(
    old: jobstatus.FineTuneJobStatus, new: jobstatus.FineTuneJobStatus
) -> dict[str, Any]:
    """Merge patch (camelCase) from ``old`` to ``new``; removed fields become null."""
    before, after = old.to_wire(), new.to_wire()
    patch: dict[str, Any] = {k: v for k, v in after.items() if before.get(k) != v}
    patch.update({k: None for k in before if k not in after})
    return patch


def _epochs(job: FineTuningJob) -> int | None:
    candidates: list[Any] = [job.hyperparameters.n_epochs if job.hyperparameters else None]
    if job.method is not None:
        for sub in (job.method.supervised, job.method.dpo):
            hp = getattr(sub, "hyperparameters", None) if sub is not None else None
            candidates.append(getattr(hp, "n_epochs", None))
    return next((c for c in candidates if isinstance(c, int)), None)


def _progress(
    old: jobstatus.Progress | None, events: Iterable[FineTuningJobEvent], job: FineTuningJob
) -> jobstatus.Progress | None:
    progress = old.model_copy() if old is not None else None
    for ev in events:
        data = ev.data
        if ev.type != "metrics" or not isinstance(data, dict) or "step" not in data:
            continue
        progress = progress or jobstatus.Progress()
        progress.step = int(data["step"])
        if data.get("total_steps") is not None:
            progress.total_steps = int(data["total_steps"])
        if data.get("train_loss") is not None:
            progress.train_loss = round(float(data["train_loss"]), 4)
        valid = data.get("full_valid_loss", data.get("valid_loss"))
        if valid is not None:
            progress.valid_loss = round(float(valid), 4)
    if progress is None:
        return None
    epochs = _epochs(job)
    if progress.total_steps:
        pct = 100 * progress.step // progress.total_steps
        progress.summary = f"{progress.step}/{progress.total_steps} ({pct}%)"
        if epochs:
            progress.epoch = round(epochs * progress.step / progress.total_steps, 3)
    progress.eta = iso(job.estimated_finish) if job.status not in TERMINAL else None
    return progress


def _failure(job: FineTuningJob, secrets: tuple[str, ...]) -> tuple[str, str]:
    err = job.error
    if err is None:
        return "RemoteJobFailed", "the OpenAI job failed without an error object"
    text = f"the OpenAI job failed: {err.code}: {err.message}"
    if err.param:
        text += f" (param: {err.param})"
    return "RemoteJobFailed", errors.redact(text, secrets)


def apply(
    new: jobstatus.FineTuneJobStatus,
    job: FineTuningJob,
    events: list[FineTuningJobEvent],
    *,
    oa: openai_spec.OpenAISpec,
    owner: manifests.Owner,
    prices: Mapping[str, float],
    generation: int | None,
    secrets: tuple[str, ...],
    out: list[Event],
) -> None:
    """Writes ``job`` and its ``events`` (oldest first) into ``new``; Events go to ``out``."""
    remote = new.remote or jobstatus.RemoteJob()
    remote.id, remote.status = job.id, str(job.status)
    remote.training_file = job.training_file or remote.training_file
    remote.validation_file = job.validation_file or remote.validation_file
    remote.estimated_finish = iso(job.estimated_finish)
    if events:
        remote.last_event_id = events[-1].id
    new.remote = remote
    new.model = oa.model
    new.start_time = new.start_time or iso(job.created_at)
    new.progress = _progress(new.progress, events, job)
    if job.trained_tokens is not None:
        new.trained_tokens = job.trained_tokens

    phase = PHASES.get(str(job.status))
    others = [c for c in new.conditions if c.type != UNKNOWN_STATUS_CONDITION]
    if phase is None:
        text = (f"OpenAI reports status {job.status!r}, which kubetune does not know; "
                f"keeping phase {new.phase}")  # fmt: skip
        known = [c for c in new.conditions if c.type == UNKNOWN_STATUS_CONDITION]
        if not known or known[0].message != text:
            out.append(Event("Warning", "UnknownRemoteStatus", text))
        new.conditions = st.set_condition(
            new.conditions, UNKNOWN_STATUS_CONDITION, False, "UnknownRemoteStatus", text, generation
        )
        new.message = text
        return
    new.conditions = others
    new.phase = phase
    reason, ready = str(phase), False
    if phase == jobstatus.Phase.VALIDATING:
        new.message = "OpenAI is validating the files"
    elif phase == jobstatus.Phase.QUEUED:
        new.message = "queued at OpenAI"
    elif phase == jobstatus.Phase.RUNNING:
        p = new.progress
        new.message = "training at OpenAI" + (f": step {p.summary}" if p and p.summary else "")
    elif phase == jobstatus.Phase.SUCCEEDED:
        _succeeded(new, job, oa, owner, prices, out)
        reason, ready = "Succeeded", True
    elif phase == jobstatus.Phase.FAILED:
        reason, new.message = _failure(job, secrets)
    else:
        reason, new.message = "Cancelled", "the OpenAI job was cancelled"
    if phase.finished:
        new.completion_time = new.completion_time or iso(job.finished_at) or st.now()
    new.conditions = st.set_condition(
        new.conditions, "Ready", ready, reason, new.message or "", generation
    )


def _succeeded(
    new: jobstatus.FineTuneJobStatus,
    job: FineTuningJob,
    oa: openai_spec.OpenAISpec,
    owner: manifests.Owner,
    prices: Mapping[str, float],
    out: list[Event],
) -> None:
    model = job.fine_tuned_model or ""
    new.fine_tuned_model = model or None
    new.message = f"fine-tuned model {model} is ready"
    price = price_per_million(oa.model, prices)
    if job.trained_tokens is not None and price is not None:
        new.cost_usd = round(job.trained_tokens * price / 1_000_000, 4)
    elif price is None:
        out.append(Event("Warning", "NoPrice", f"no price for model {oa.model!r} in the price "
                         "table (chart value openai.prices); costUsd is not set"))  # fmt: skip
    if model:
        new.endpoint = jobstatus.EndpointStatus(
            base_url=oa.base_url or DEFAULT_OPENAI_BASE_URL,
            model=model,
            config_map=manifests.endpoint_name(owner),
        )


def posted(events: list[FineTuningJobEvent], secrets: tuple[str, ...]) -> list[Event]:
    """OpenAI's own messages (not metrics) as Kubernetes Events, the newest few."""
    posted = [
        Event(
            "Warning" if ev.level in ("warn", "error") else "Normal",
            "OpenAI",
            errors.redact(ev.message, secrets)[:1024],
        )
        for ev in events
        if ev.type != "metrics" and ev.message
    ]
    return posted[-MAX_POSTED_EVENTS:]
