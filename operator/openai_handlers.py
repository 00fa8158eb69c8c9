"""Glue between the kopf handlers and the OpenAI provider: credentials, datasets, endpoint.

The provider (``openai_provider``) never talks to Kubernetes; this module reads the Secret and
the dataset through ``kube``/``checks`` and hands them over, then creates the endpoint
ConfigMap the provider's status asks for. The API key lives only inside the client object.
"""

from __future__ import annotations

from collections.abc import Callable

import openai

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.operator import checks, kube, manifests
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_provider as provider
from kubetune.operator.openai_status import Event
from kubetune.operator.settings import OperatorSettings


def client_for(spec: ftj.OpenAISpec, namespace: str) -> openai.OpenAI:
    ref = spec.api_key_secret_ref

    def optional(key: str | None) -> str | None:
        return kube.read_secret_key(namespace, ref.name, key) if key else None

    return provider.make_client(
        kube.read_secret_key(namespace, ref.name, ref.key),
        organization=optional(ref.organization_key),
        project=optional(ref.project_key),
        base_url=spec.base_url,
    )


def _reader(src: ftj.DatasetSource, namespace: str, field: str) -> Callable[[], bytes]:
    def read() -> bytes:
        data = checks.fetch_dataset(src, namespace, field)
        if data is None:  # a PVC source; the spec validator refuses it for this provider
            raise checks.InvalidJob(f"{field}.pvc cannot be used with provider `openai`")
        return data

    return read


def reconcile(
    spec: ftj.FineTuneJobSpec,
    owner: manifests.Owner,
    status: ftj.FineTuneJobStatus,
    settings: OperatorSettings,
    generation: int | None,
) -> tuple[ftj.FineTuneJobStatus, list[Event]]:
    """One tick of an OpenAI job. Raises the provider's Permanent/Temporary errors as they are."""
    assert spec.openai is not None
    with client_for(spec.openai, owner.namespace) as client:
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
    return new, result.events


def cleanup(
    spec: ftj.FineTuneJobSpec, owner: manifests.Owner, status: ftj.FineTuneJobStatus
) -> list[Event]:
    """On deletion: cancel the remote job if unfinished, delete uploaded files."""
    assert spec.openai is not None
    try:
        with client_for(spec.openai, owner.namespace) as client:
            return provider.cleanup(client, spec, owner, status)
    except kube.PermanentKubeError as exc:
        # No Secret any more: nothing can be cancelled; say so rather than block deletion.
        return [Event("Warning", "CleanupSkipped", f"cannot clean up the OpenAI job: {exc}")]


__all__ = ["Event", "cleanup", "client_for", "errors", "reconcile"]
