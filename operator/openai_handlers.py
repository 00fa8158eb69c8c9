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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import openai

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.operator import checks, kube, manifests
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_provider as provider
from kubetune.operator.openai_status import TERMINAL, Event
from kubetune.operator.settings import DEFAULT_OPENAI_BASE_URL, OperatorSettings

CREDENTIALS_LABEL = "kubetune.io/credentials"
CREDENTIALS_LABEL_VALUE = "openai"
"""The label a Secret carries to let kubetune send its values to OpenAI."""


# ----------------------------------------------------------------------------- credentials


def _normal_url(url: str) -> str:
    parts = urlsplit(url.strip())
    out = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    return out + (f"?{parts.query}" if parts.query else "")


def allowed_base_url(spec: ftj.OpenAISpec, allowed: Iterable[str]) -> str:
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
    secret: Mapping[str, Any] | None, ref: ftj.OpenAIKeyRef, namespace: str
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
        return base64.b64decode(values[key]).decode("utf-8").strip()

    return Credentials(
        value(ref.key),
        organization=value(ref.organization_key) if ref.organization_key else None,
        project=value(ref.project_key) if ref.project_key else None,
    )


def client_for(spec: ftj.OpenAISpec, namespace: str, settings: OperatorSettings) -> openai.OpenAI:
    """A client with the job's credentials, for an allowed base URL and an opted-in Secret."""
    base_url = allowed_base_url(spec, settings.openai_allowed_base_urls)
    ref = spec.api_key_secret_ref
    creds = credentials(kube.get("v1", "Secret", namespace, ref.name), ref, namespace)
    return provider.make_client(
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
        status: ftj.FineTuneJobStatus,
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

    def polled(self, uid: str, status: ftj.FineTuneJobStatus, now: float) -> None:
        """Records a successful step; a finished or not yet created job is forgotten."""
        remote = status.remote
        with self.lock:
            if remote is not None and remote.id and not ftj.Phase(status.phase).finished:
                self.last[uid] = now
            else:
                self.last.pop(uid, None)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.last.pop(uid, None)


POLLS = PollSchedule()


# ----------------------------------------------------------------------------- reconcile


def _reader(src: ftj.DatasetSource, namespace: str, field: str) -> Callable[[], bytes]:
    def read() -> bytes:
        data = checks.fetch_dataset(src, namespace, field)
        if data is None:  # a PVC source; the spec validator refuses it for this provider
            raise checks.InvalidJob(f"{field}.pvc cannot be used with provider `openai`")
        return data

    return read


def _client_or_wait(
    spec: ftj.OpenAISpec, owner: manifests.Owner, status: ftj.FineTuneJobStatus,
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
    status: ftj.FineTuneJobStatus,
    settings: OperatorSettings,
    generation: int | None,
    *,
    polls: PollSchedule = POLLS,
    now: float | None = None,
) -> tuple[ftj.FineTuneJobStatus, list[Event]]:
    """One tick of an OpenAI job. Raises the provider's Permanent/Temporary errors as they are.

    A followed job polled less than ``settings.openai_poll_interval`` ago is left alone: the
    status comes back unchanged, nothing is read or sent.
    """
    assert spec.openai is not None
    now = time.monotonic() if now is None else now
    if not polls.due(owner.uid, status, generation, now, settings):
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
        )
    new = result.status
    if new.endpoint is not None:
        kube.create_or_adopt(
            manifests.endpoint_configmap(owner, new.endpoint.base_url, new.endpoint.model)
        )
    polls.polled(owner.uid, new, now)
    return new, result.events


def cleanup(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: ftj.FineTuneJobStatus,
    settings: OperatorSettings,
) -> list[Event]:
    """On deletion: cancel the remote job if unfinished, delete uploaded files."""
    assert spec.openai is not None
    POLLS.forget(owner.uid)
    try:
        with client_for(spec.openai, owner.namespace, settings) as client:
            return provider.cleanup(client, spec, owner, status)
    except (kube.PermanentKubeError, errors.RefusedProviderError) as exc:
        # No Secret any more, or one kubetune may not use: nothing can be cancelled; say so
        # rather than block deletion (and a namespace's deletion) forever.
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
    "allowed_base_url",
    "cleanup",
    "client_for",
    "credentials",
    "errors",
    "reconcile",
]
