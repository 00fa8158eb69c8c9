"""Glue between the kopf handlers and the OpenAI provider: credentials, datasets, polls, endpoint.

The provider (``openai_provider``) never talks to Kubernetes; this module reads the Secret and
the dataset through ``kube``/``checks`` and hands them over, then creates the endpoint
ConfigMap the provider's status asks for. The API key lives only inside the client object.

Whose key, sent where
---------------------
The operator may read any Secret by name, so a user who may create FineTuneJobs but not read
Secrets must not be able to make it send one to a server of their choosing (a confused
deputy). Both ends are therefore fixed by people who hold that power already:

- the Secret opts in with the label ``kubetune.io/credentials: openai`` (whoever may label a
  Secret may read it), else the job fails naming the Secret and the label;
- the base URL (``spec.openai.baseURL``, or OpenAI's) must be in the operator's allowlist
  (``OperatorSettings.openai_allowed_base_urls``, chart value ``openai.allowedBaseURLs``).

The URL is checked before the Secret is read, and the label before any of its values is used.

Secret values are checked before use: a key (or organization, project) with a line break,
whitespace or control character inside fails the job naming the Secret and its key, never the
value (the HTTP library would refuse it on every request as a "connection error", and its
debug log would print it).

A tick and the deletion's cleanup
---------------------------------
kopf runs the deletion handler while a timer tick may still be running. A tick that had found
no remote job and was uploading could otherwise create the paid job after the cleanup had
looked for it, and nothing would ever cancel it. So each FineTuneJob UID has a lock
(:data:`TICKS`): a tick holds it throughout; :func:`cleanup` raises a short temporary error
while a tick holds it (kopf retries the deletion), and a tick that finds the cleanup holding
it does nothing. A tick also asks, right before uploading and before creating, whether the
FineTuneJob is being deleted (``stopping``), and then does neither.

Endpoint
--------
A succeeded job's ``<name>-endpoint`` ConfigMap is written after the success is recorded; if
it cannot be (a name taken by someone else's object, an API server error), condition
``ServingReady`` is False with the reason, and later ticks try again (:func:`publish_endpoint`).

Polls
-----
kopf ticks every ``reconcile_interval``; a job being followed at OpenAI is polled only every
``openai_poll_interval`` (:class:`PollSchedule`, in memory: a restarted operator polls at
once). A spec change (``suspend``) or a job not created yet is handled on the next tick.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import openai

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus, openai_spec
from kubetune.operator import checks, kube, manifests, openai_client
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_provider as provider
from kubetune.operator import status as st
from kubetune.operator.openai_status import TERMINAL
from kubetune.operator.settings import DEFAULT_OPENAI_BASE_URL, OperatorSettings
from kubetune.operator.status import Event

CREDENTIALS_LABEL = "kubetune.io/credentials"
CREDENTIALS_LABEL_VALUE = "openai"
"""The label a Secret carries to let kubetune send its values to OpenAI."""


# ----------------------------------------------------------------------------- credentials


def _normal_url(url: str) -> str:
    parts = urlsplit(url.strip())
    out = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    return out + (f"?{parts.query}" if parts.query else "")


def allowed_base_url(spec: openai_spec.OpenAISpec, allowed: Iterable[str]) -> str:
    """The base URL to call; raises RefusedProviderError when the allowlist lacks it."""
    url = spec.base_url or DEFAULT_OPENAI_BASE_URL
    allowed = tuple(allowed)
    if _normal_url(url) in {_normal_url(a) for a in allowed}:
        return url
    named = f"spec.openai.baseURL {url!r}" if spec.base_url else (
        f"the default base URL {url!r} (spec.openai.baseURL is unset)"
    )  # fmt: skip
    listed = ", ".join(allowed) or "empty"
    raise errors.RefusedProviderError(
        f"{named} is not in the operator's allowlist of OpenAI base URLs ({listed}); the API "
        "key is sent only to those. Use one of them, or ask the cluster admin to add it "
        "(chart value openai.allowedBaseURLs)",
        reason="BaseURLNotAllowed",
    )


@dataclass(frozen=True)
class Credentials:
    api_key: str = field(repr=False)
    organization: str | None = field(default=None, repr=False)
    project: str | None = field(default=None, repr=False)


def credentials(
    secret: Mapping[str, Any] | None, ref: openai_spec.OpenAIKeyRef, namespace: str
) -> Credentials:
    """The key (and organization/project) from ``secret``, if it opts in with the label.

    Raises RefusedProviderError for a Secret without the label (nothing of it is used), and
    kube.PermanentKubeError for a missing Secret or key. Values are never put in a message.
    """
    where = f"Secret {namespace}/{ref.name}"
    if secret is None:
        raise kube.PermanentKubeError(f"{where} not found")
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(CREDENTIALS_LABEL) != CREDENTIALS_LABEL_VALUE:
        label = f"{CREDENTIALS_LABEL}={CREDENTIALS_LABEL_VALUE}"
        raise errors.RefusedProviderError(
            f"{where} (spec.openai.apiKeySecretRef) is not marked for kubetune: add the label "
            f"{label} to use it for OpenAI (kubectl -n {namespace} label secret {ref.name} "
            f"{label}); kubetune sends only such Secrets' values to OpenAI",
            reason="SecretNotAllowed",
        )
    values = secret.get("data") or {}

    def value(key: str) -> str:
        if key not in values:
            raise kube.PermanentKubeError(f"{where} has no key {key!r}")
        try:
            text = base64.b64decode(values[key]).decode("utf-8").strip()
        except UnicodeDecodeError:
            text = "\ufffd"
        problem = openai_client.header_problem(text)
        if problem is not None:
            raise errors.AuthProviderError(
                f"the value of key {key!r} in {where} (spec.openai.apiKeySecretRef) contains "
                f"{problem}, which cannot be sent to OpenAI; store it again without it",
                reason="InvalidKey",
            )
        return text

    return Credentials(
        value(ref.key),
        organization=value(ref.organization_key) if ref.organization_key else None,
        project=value(ref.project_key) if ref.project_key else None,
    )


def client_for(
    spec: openai_spec.OpenAISpec, namespace: str, settings: OperatorSettings
) -> openai.OpenAI:
    """A client with the job's credentials, for an allowed base URL and an opted-in Secret."""
    base_url = allowed_base_url(spec, settings.openai_allowed_base_urls)
    ref = spec.api_key_secret_ref
    creds = credentials(kube.get("v1", "Secret", namespace, ref.name), ref, namespace)
    return openai_client.make_client(
        creds.api_key,
        organization=creds.organization,
        project=creds.project,
        base_url=base_url,
    )


# ----------------------------------------------------------------------------- polls


@dataclass
class PollSchedule:
    """When each followed remote job was last polled, by FineTuneJob UID (in memory)."""

    last: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def due(
        self,
        uid: str,
        status: jobstatus.FineTuneJobStatus,
        generation: int | None,
        now: float,
        settings: OperatorSettings,
    ) -> bool:
        """Whether this tick should call OpenAI.

        Only a followed job (``status.remote.id`` set, not finished, spec unchanged since the
        last step) waits; half a tick of slack keeps a 30 s interval on 10 s ticks at 30 s.
        """
        remote = status.remote
        following = bool(remote and remote.id and remote.status not in TERMINAL)
        if not following or status.observed_generation != generation:
            return True
        with self.lock:
            last = self.last.get(uid)
        slack = settings.reconcile_interval / 2
        return last is None or now - last >= settings.openai_poll_interval - slack

    def polled(self, uid: str, status: jobstatus.FineTuneJobStatus, now: float) -> None:
        """Records a successful step; a finished or not yet created job is forgotten."""
        remote = status.remote
        with self.lock:
            if remote is not None and remote.id and not jobstatus.Phase(status.phase).finished:
                self.last[uid] = now
            else:
                self.last.pop(uid, None)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.last.pop(uid, None)


POLLS = PollSchedule()


# ----------------------------------------------------------------------------- ticks


@dataclass
class TickLocks:
    """One lock per FineTuneJob UID, held by a tick or by the cleanup (in memory).

    Only one operator runs (the chart's single replica), so this is all the exclusion needed.
    """

    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def hold(self, uid: str) -> Iterator[bool]:
        """Takes ``uid``'s lock without waiting; yields whether it got it."""
        with self.guard:
            lock = self.locks.setdefault(uid, threading.Lock())
        got = lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                lock.release()

    def forget(self, uid: str) -> None:
        """Drops ``uid``'s lock once the FineTuneJob is gone (a tick still holding it keeps it)."""
        with self.guard:
            self.locks.pop(uid, None)


TICKS = TickLocks()

TICK_IN_PROGRESS_DELAY = 5.0
"""Seconds before a deletion looks again while a tick of the same FineTuneJob is running."""

SERVING = "ServingReady"
"""The condition that says whether the endpoint ConfigMap is written (as for local jobs)."""


# ----------------------------------------------------------------------------- reconcile


def _reader(
    src: ftj.DatasetSource, namespace: str, field: str
) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    @contextmanager
    def read() -> Iterator[IO[bytes]]:
        with checks.open_dataset(src, namespace, field) as f:
            if f is None:  # a PVC source; the spec validator refuses it for this provider
                raise checks.InvalidJob(f"{field}.pvc cannot be used with provider `openai`")
            yield f

    return read


def _client_or_wait(
    spec: openai_spec.OpenAISpec, owner: manifests.Owner, status: jobstatus.FineTuneJobStatus,
    settings: OperatorSettings,
) -> openai.OpenAI:  # fmt: skip
    """client_for; once a remote job exists, a credentials problem is a long wait, not Failed."""
    try:
        return client_for(spec, owner.namespace, settings)
    except (errors.PermanentProviderError, kube.PermanentKubeError) as exc:
        remote_id = status.remote.id if status.remote is not None else None
        if not remote_id:
            raise
        if isinstance(exc, kube.PermanentKubeError):
            exc = errors.AuthProviderError(str(exc), reason="MissingSecret")
        secret = f"{owner.namespace}/{spec.api_key_secret_ref.name}"
        raise errors.while_following(exc, remote_id, secret) from None


def reconcile(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    settings: OperatorSettings,
    generation: int | None,
    *,
    polls: PollSchedule = POLLS,
    now: float | None = None,
    stopping: Callable[[], str | None] | None = None,
    ticks: TickLocks = TICKS,
) -> tuple[jobstatus.FineTuneJobStatus, list[Event]]:
    """One tick of an OpenAI job. Raises the provider's Permanent/Temporary errors as they are.

    A followed job polled less than ``settings.openai_poll_interval`` ago is left alone: the
    status comes back unchanged, nothing is read or sent; so is a job whose cleanup is running.
    ``stopping`` says why nothing more may be uploaded or created (see ``provider.step``).
    """
    assert spec.openai is not None
    now = time.monotonic() if now is None else now
    with ticks.hold(owner.uid) as got:
        if not got or not polls.due(owner.uid, status, generation, now, settings):
            return status, []
        with _client_or_wait(spec.openai, owner, status, settings) as client:
            result = provider.step(
                client,
                spec,
                owner,
                status,
                training=_reader(spec.dataset, owner.namespace, "spec.dataset"),
                validation=None
                if spec.validation is None
                else _reader(spec.validation, owner.namespace, "spec.validation"),
                prices=settings.prices_per_million or data.OPENAI_PRICES_PER_MILLION,
                generation=generation,
                stopping=stopping,
            )
        new, events = result.status, list(result.events)
        if new.endpoint is not None:
            new, more = publish_endpoint(owner, new, generation)
            events += more
        polls.polled(owner.uid, new, now)
        return new, events


def endpoint_published(status: jobstatus.FineTuneJobStatus) -> bool:
    """Whether nothing is left to do for a succeeded job: its endpoint ConfigMap is written.

    A job that succeeded before the condition existed counts as unpublished (writing the
    ConfigMap again adopts it).
    """
    if status.endpoint is None:
        return True
    return any(c.type == SERVING and c.status == "True" for c in status.conditions)


def publish_endpoint(
    owner: manifests.Owner, status: jobstatus.FineTuneJobStatus, generation: int | None
) -> tuple[jobstatus.FineTuneJobStatus, list[Event]]:
    """Writes the endpoint ConfigMap of ``status.endpoint``; a failure is a condition.

    The job's result (fine-tuned model, cost, tokens) is kept whatever happens here: the
    condition ``ServingReady`` is False with the reason (``EndpointRefused`` when the API
    server refuses it, as for a name taken by someone else's object; ``EndpointRetrying`` for
    a passing error) and the next tick tries again.
    """
    assert status.endpoint is not None
    new = status.model_copy(deep=True)
    endpoint = status.endpoint
    cm = manifests.endpoint_configmap(owner, endpoint.base_url, endpoint.model)
    name = f"{owner.namespace}/{manifests.endpoint_name(owner)}"
    try:
        kube.create_or_adopt(cm)
    except (kube.PermanentKubeError, kube.TemporaryKubeError) as exc:
        permanent = isinstance(exc, kube.PermanentKubeError)
        reason = "EndpointRefused" if permanent else "EndpointRetrying"
        text = f"the endpoint ConfigMap {name} could not be written: {exc}; retrying"
        was = next((c for c in status.conditions if c.type == SERVING), None)
        events = []
        if was is None or was.reason != reason:
            events.append(Event("Warning", reason, text))
        new.conditions = st.set_condition(new.conditions, SERVING, False, reason, text, generation)
        new.message = f"fine-tuned model {endpoint.model} is ready; {text}"
        return new, events
    text = f"ConfigMap {name} holds OPENAI_BASE_URL and OPENAI_MODEL"
    new.conditions = st.set_condition(
        new.conditions, SERVING, True, "EndpointPublished", text, generation
    )
    new.message = f"fine-tuned model {endpoint.model} is ready"
    return new, []


def cleanup(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    settings: OperatorSettings,
    *,
    ticks: TickLocks = TICKS,
) -> list[Event]:
    """On deletion: cancel the remote job if unfinished, delete uploaded files.

    Raises TemporaryProviderError while a tick of the same FineTuneJob runs: it may be about
    to create the remote job this cleanup would not see (see the module docstring).
    """
    assert spec.openai is not None
    with ticks.hold(owner.uid) as got:
        if not got:
            raise errors.TemporaryProviderError(
                "a reconcile of this FineTuneJob is still running (it may be uploading or "
                "creating the OpenAI job); cleaning up once it has ended",
                reason="TickInProgress",
                delay=TICK_IN_PROGRESS_DELAY,
            )
        POLLS.forget(owner.uid)
        events = _cleanup(spec.openai, spec, owner, status, settings)
    ticks.forget(owner.uid)
    return events


def _cleanup(
    oa: openai_spec.OpenAISpec,
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: jobstatus.FineTuneJobStatus,
    settings: OperatorSettings,
) -> list[Event]:
    try:
        with client_for(oa, owner.namespace, settings) as client:
            return provider.cleanup(client, spec, owner, status)
    except (kube.PermanentKubeError, errors.RefusedProviderError, errors.AuthProviderError) as exc:
        # No Secret any more, one kubetune may not use, or a key that cannot be sent: nothing
        # can be cancelled; say so rather than block deletion (and a namespace's) forever.
        if isinstance(exc, errors.AuthProviderError) and exc.reason != "InvalidKey":
            raise  # OpenAI refused the key: as before, the handler reports it
        remote = status.remote.id if status.remote is not None else None
        text = f"cannot clean up the OpenAI job: {exc}"
        if remote:
            text += f"; OpenAI job {remote} may still be running: cancel it in OpenAI's dashboard"
        return [Event("Warning", "CleanupSkipped", text)]


__all__ = [
    "CREDENTIALS_LABEL",
    "CREDENTIALS_LABEL_VALUE",
    "Event",
    "PollSchedule",
    "TickLocks",
    "allowed_base_url",
    "cleanup",
    "client_for",
    "credentials",
    "endpoint_published",
    "errors",
    "publish_endpoint",
    "reconcile",
]
