"""Reconciles one ModelServer: the adapters it serves, its server objects, its status.

Its members are the FineTuneJobs of its namespace that name it in ``spec.serve.server`` (read
from the operator's index of FineTuneJobs, no GETs). ``plan`` decides, purely, which members'
adapters go into the server: each ``provider: local`` job that succeeded with serving on,
trained on the server's base model, with a rank the server accepts. The others that could
never be served are refused, with the reason; the job shows it in its ServingReady condition.
A job still training is neither: its adapter is added when it succeeds.

With ``adapterUpdates: Restart`` (the default), changing the adapter set changes the serve
config, which rolls the server's pods (each new pod loads every adapter at start).
``status.adapters`` lists the adapters of the config that was applied; the ``Ready`` condition
is True only once every replica runs that config, so a job whose name is in ``adapters`` of a
Ready server is served.

With ``Live``, a new adapter set changes only the config file; the adapter-sync sidecar of each
pod loads it into the running vLLM and reports what it serves (read by the timer through
:mod:`~kubetune.operator.adapter_reports`). ``status.adapters`` is then what every ready
replica reports serving, and ``Ready`` is False with reason ``LoadingAdapters`` while a
change is on its way (the adapters listed are served meanwhile). A replica that reports an
older set gets its pod annotated, so that the kubelet rewrites the file at once
(:mod:`~kubetune.operator.kubelet_nudge`). What a replica cannot load is refused, like a job
trained on another base model.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.api import modelserver as ms
from kubetune.api.serveconfig import MAX_ADAPTERS
from kubetune.operator import (
    kube,
    kubelet_nudge,
    kueue,
    local_provider,
    manifests,
    model_server_manifests,
    serving_manifests,
)
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings
from kubetune.server import vllm_args
from kubetune.sync_report import Report


@dataclass(frozen=True)
class Member:
    """What the ModelServer needs to know of one FineTuneJob that names it."""

    name: str
    uid: str
    spec: ftj.FineTuneJobSpec | None
    """None when the stored spec does not parse (the job itself reports why)."""
    phase: str
    rank: int | None
    """The adapter's rank, from the job's status once the trainer reported it."""
    created: str = ""
    """``metadata.creationTimestamp``: when the server is full, the earlier jobs keep their
    places."""


def member(body: dict[str, Any]) -> Member:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    try:
        spec: ftj.FineTuneJobSpec | None = ftj.FineTuneJobSpec.model_validate(body.get("spec"))
    except ValidationError:
        spec = None
    return Member(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        spec=spec,
        phase=str(status.get("phase") or jobstatus.Phase.PENDING),
        rank=(status.get("adapter") or {}).get("rank"),
        created=str(meta.get("creationTimestamp") or ""),
    )


def same_model(a: ftj.ModelRef, b: ftj.ModelRef) -> bool:
    """Whether two references name the same weights (a trailing `/` on a folder aside)."""
    claim = (a.pvc.claim_name if a.pvc else None, b.pvc.claim_name if b.pvc else None)
    return (
        claim[0] == claim[1]
        and a.revision == b.revision
        and serving_manifests.base_model_path(a) == serving_manifests.base_model_path(b)
    )


@dataclass(frozen=True)
class Plan:
    adapters: dict[str, serving_manifests.AdapterMount]
    refused: list[ms.RefusedAdapter]


def plan(
    spec: ms.ModelServerSpec,
    namespace: str,
    members: Iterable[Member],
    settings: OperatorSettings,
) -> Plan:
    """Which members' adapters the server serves, and which it refuses (and why)."""
    adapters: dict[str, serving_manifests.AdapterMount] = {}
    refused: list[ms.RefusedAdapter] = []
    limit = vllm_args.round_lora_rank(spec.max_lora_rank)
    # Oldest first, so that a server that is full keeps what it serves when a job comes.
    for m in sorted(members, key=lambda m: (m.created, m.name)):
        job = m.spec
        if job is None or job.model is None or not job.serve.enabled:
            continue  # a spec that does not parse, or an `openai` job (its spec forbids it)
        why: str | None = None
        if not same_model(job.model, spec.model):
            why = (
                f"trained on {job.model.display}; this server serves {spec.model.display} "
                "(an adapter works only on the base model it was trained on)"
            )
        elif (rank := m.rank or job.lora.r) > limit:
            why = (
                f"adapter rank {rank} is above the server's `maxLoraRank` "
                f"{spec.max_lora_rank} (vLLM rounds it to {limit})"
            )
        if why is not None:
            refused.append(ms.RefusedAdapter(name=m.name, message=why))
            continue
        if m.phase != jobstatus.Phase.SUCCEEDED:
            continue
        if len(adapters) == MAX_ADAPTERS:
            why = (
                f"the server serves {MAX_ADAPTERS} adapters already, the most one server "
                "takes: name another ModelServer (on the same base model) in `spec.serve.server`"
            )
            refused.append(ms.RefusedAdapter(name=m.name, message=why))
            continue
        owner = manifests.Owner(name=m.name, namespace=namespace, uid=m.uid)
        adapters[m.name] = serving_manifests.AdapterMount(
            claim=manifests.output_claim(job, settings),
            subpath=manifests.output_subpath(job, owner),
            path=f"{serving_manifests.ADAPTERS_DIR}/{m.name}",
        )
    return Plan(
        adapters=dict(sorted(adapters.items())), refused=sorted(refused, key=lambda r: r.name)
    )


def rolled_out(deploy: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether every replica runs the Deployment's current template (and no older one)."""
    if deploy is None:
        return False, "serving Deployment not created yet"
    want = (deploy.get("spec") or {}).get("replicas", 1)
    status = deploy.get("status") or {}
    generation = (deploy.get("metadata") or {}).get("generation")
    current = status.get("observedGeneration") == generation
    updated = status.get("updatedReplicas") or 0
    ready = status.get("readyReplicas") or 0
    total = status.get("replicas") or 0
    done = current and updated >= want and ready >= want and total == want
    if done:
        return True, f"{ready}/{want} replicas ready"
    return False, f"{ready}/{want} replicas ready, {updated}/{want} with the current adapters"


def live_serving(
    wanted: list[str],
    digest: str,
    state: st.ServingState,
    reports: dict[str, Report | str],
    old: list[str],
) -> tuple[list[str], st.ServingState, list[ms.RefusedAdapter]]:
    """For a ``Live`` server: the adapters every ready replica serves, the Ready state, and the
    adapters a replica refused to load. ``reports`` are those of the ready pods (by name);
    ``digest`` is :meth:`ServeConfig.adapter_digest` of the config just applied.

    A replica that cannot be asked counts neither way for ``adapters``: when none can be, the
    last confirmed set (``old``) stands, less the adapters no longer wanted. Ready needs every
    ready replica to report the applied digest, synced.
    """
    read = {pod: r for pod, r in reports.items() if isinstance(r, Report)}
    if not reports:
        served: list[str] = []
    elif not read:
        served = [a for a in old if a in wanted]
    else:
        common = set.intersection(*(set(r.served) for r in read.values()))
        served = [a for a in wanted if a in common]
    refused: dict[str, str] = {}
    for report in read.values():
        for name, why in report.refused.items():
            if name in wanted:
                refused.setdefault(name, f"the server cannot load it: {why}")
    behind = {
        pod: (r if isinstance(r, str) else _lag(r, digest))
        for pod, r in sorted(reports.items())
        if isinstance(r, str) or r.digest != digest or not r.synced
    }
    if state.ready and behind:
        done = len(reports) - len(behind)
        why = "; ".join(f"{pod}: {text}" for pod, text in behind.items())
        state = st.ServingState(
            False,
            ms.LOADING_ADAPTERS,
            f"{done}/{len(reports)} replicas serve the current adapters; {why}",
        )
    return served, state, [ms.RefusedAdapter(name=n, message=m) for n, m in refused.items()]


def _lag(report: Report, digest: str) -> str:
    """Why a replica's report is not the applied adapter set, served."""
    if report.error:
        return report.error
    if report.digest != digest:
        return "has not read the new adapter set yet (the kubelet is updating its file)"
    pending = ", ".join(f"{n} ({why})" for n, why in sorted(report.pending.items()))
    return f"loading {pending}" if pending else "not in sync yet"


def reconcile(
    spec: ms.ModelServerSpec,
    owner: manifests.Owner,
    members: Iterable[Member],
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    old: ms.ModelServerStatus,
    settings: OperatorSettings,
    generation: int | None,
    reports: dict[str, Report | str] | None = None,
    now: datetime.datetime | None = None,
) -> ms.ModelServerStatus:
    """Applies the server for the current members; returns the new status. ``reports`` are the
    ready pods' adapter-sync reports (a ``Live`` server); a replica that reports an older
    adapter set gets its pod annotated (:mod:`~kubetune.operator.kubelet_nudge`).

    Raises kube.TemporaryKubeError to be retried; a refusal by the API server (a name taken,
    a quota, a policy) is the Ready condition's ``ServingRefused``.
    """
    new = old.model_copy(deep=True)
    new.observed_generation = generation
    chosen = plan(spec, owner.namespace, members, settings)
    new.refused = chosen.refused
    mounts, config = model_server_manifests.model_server_layout(spec, chosen.adapters)
    objects = model_server_manifests.model_server_objects(
        owner=owner, spec=spec, mounts=mounts, config=config, settings=settings
    )
    served = config.base_name
    shown = spec.model.display
    new.model = shown if served == shown else f"{shown} (served as {served})"
    wanted = local_provider.stamped(objects)
    digest = wanted[-1]["metadata"]["annotations"][local_provider.APPLIED_HASH]
    try:
        local_provider.ensure_serving(wanted, owner, deployment)
    except kube.PermanentKubeError as exc:
        new.conditions = st.set_condition(
            new.conditions, "Ready", False, "ServingRefused", str(exc), generation
        )
        return new
    new.adapters = sorted(chosen.adapters)
    new.base_url = local_provider.endpoint_url(owner)
    state = st.serving_state(deployment, pods)
    done, counted = rolled_out(deployment)
    if local_provider.applied_hash(deployment) != digest:
        # Just applied: the Deployment in the index predates it.
        state = st.ServingState(False, "RollingOut", "a new server config is being applied")
    elif state.reason == "ScaledToZero":
        state = st.ServingState(False, state.reason, "serving is scaled to zero (`replicas: 0`)")
    elif state.ready and not done:
        state = st.ServingState(False, "RollingOut", counted)
    elif state.reason == "DeploymentNotReady" and (held := kueue.held_pods(pods)):
        why = local_provider.serving_queue_wait(owner.namespace, held)
        state = st.ServingState(False, "ServingQueued", f"{state.message}; {why}")
    if spec.live:
        adapter_set = config.adapter_digest()
        new.adapters, state, refused = live_serving(
            sorted(chosen.adapters), adapter_set, state, reports or {}, old.adapters
        )
        new.refused = [*new.refused, *refused]
        now = now or datetime.datetime.now(datetime.UTC)
        kubelet_nudge.nudge(
            owner.namespace, kubelet_nudge.due(pods, reports or {}, adapter_set, now)
        )
    if len(new.refused) > ms.MAX_LISTED:  # the CRD would reject the whole status
        count = len(new.refused)
        new.refused = sorted(new.refused, key=lambda r: r.name)[: ms.MAX_LISTED]
        more = f"{count} jobs refused, the first {ms.MAX_LISTED} by name in status.refused"
        state = st.ServingState(state.ready, state.reason, f"{state.message}; {more}")
    new.conditions = st.set_condition(
        new.conditions, "Ready", state.ready, state.reason, state.message, generation
    )
    return new


def events(
    old: ms.ModelServerStatus, new: ms.ModelServerStatus, live: bool = False
) -> list[st.Event]:
    """What changed between two statuses, as Events on the ModelServer: adapters added and
    removed (``live``: as every replica confirmed it), jobs newly refused."""
    out: list[st.Event] = []
    added = [a for a in new.adapters if a not in old.adapters]
    removed = [a for a in old.adapters if a not in new.adapters]
    if added or removed:
        parts = [f"added {', '.join(added)}"] if added else []
        parts += [f"removed {', '.join(removed)}"] if removed else []
        then = (
            "as every ready replica reports"
            if live
            else "the replicas restart with the new adapter set"
        )
        text = "; ".join(parts) + "; " + then
        out.append(st.Event("Normal", "AdaptersChanged", text))
    before = {r.name: r.message for r in old.refused}
    for r in new.refused:
        if before.get(r.name) != r.message:
            out.append(st.Event("Warning", "AdapterRefused", f"{r.name}: {r.message}"))
    return out
