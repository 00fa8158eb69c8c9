"""The Validating step shared by both providers: the spec, then the dataset, before any child.

A bad spec or dataset is a permanent failure: the message names the field path or the JSONL
line, and no pod, upload or remote job is created. The API server's schema and CEL rules catch
most spec errors at ``kubectl apply``; this catches the rest (and objects written before a CRD
upgrade). Dataset text comes from a ConfigMap (through ``kube``) or an http(s) URL; datasets on
a PVC cannot be read from here and are checked by the trainer with the same validator.

A dataset ConfigMap that does not exist yet is waited for (a temporary error, shown in the
``Reconciled`` condition) until :data:`CONFIGMAP_GRACE` after the job's creation, then fails
naming it: ``kubectl apply -f dir/`` may create the job before its ConfigMap. Callers that do
not pass the creation time get no deadline (the wait goes on, its message says why). A
ConfigMap without the key is a permanent error at once. A URL is
streamed to a temporary file under ``/tmp`` (an emptyDir in the chart) and validated from
there, so the operator's memory does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpx
from pydantic import ValidationError

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.data import tokens
from kubetune.operator import dataset_url, kube
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings

MAX_DATASET_BYTES = 512 * 1024 * 1024
"""Largest dataset fetched from a URL (the chart's /tmp emptyDir holds 1Gi by default)."""
MAX_LISTED_PROBLEMS = 5
CONFIGMAP_GRACE = datetime.timedelta(minutes=5)
"""How long after its creation a job waits for a dataset ConfigMap that does not exist yet."""
CONFIGMAP_RETRY_SECONDS = 10.0


class InvalidJob(Exception):
    """The FineTuneJob cannot run as written; the message says which field or line."""


def parse_spec(raw: dict[str, Any]) -> ftj.FineTuneJobSpec:
    try:
        return ftj.FineTuneJobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False)[:MAX_LISTED_PROBLEMS]:
            path = ".".join(str(p) for p in ("spec", *err["loc"]))
            problems.append(f"{path}: {err['msg']}")
        raise InvalidJob("invalid spec: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class DatasetCheck:
    report: data.Report


class DatasetNotYet(kube.TemporaryKubeError):
    """The dataset's ConfigMap does not exist yet; the job waits for it (see the module doc)."""


Created = str | datetime.datetime | None
"""The job's ``metadata.creationTimestamp`` (RFC 3339 text as the API server writes it)."""


def _configmap_text(ref: ftj.ConfigMapKeyRef, namespace: str, field: str, created: Created) -> str:
    cm = kube.get("v1", "ConfigMap", namespace, ref.name)
    if cm is None:
        missing = f"{field}.configMap: ConfigMap {ref.name!r} not found in namespace {namespace!r}"
        age = st.age(created)
        minutes = int(CONFIGMAP_GRACE.total_seconds() // 60)
        if age is not None and age >= CONFIGMAP_GRACE:
            raise InvalidJob(f"{missing} (waited {minutes} minutes from the job's creation)")
        until = "" if age is None else f", up to {minutes} minutes after the job's creation"
        raise DatasetNotYet(f"{missing}; waiting for it{until}", delay=CONFIGMAP_RETRY_SECONDS)
    value = (cm.get("data") or {}).get(ref.key)
    if value is None:
        raise InvalidJob(f"{field}.configMap: ConfigMap {ref.name!r} has no key {ref.key!r}")
    return str(value)


@contextlib.contextmanager
def _url_errors(field: str, url: str) -> Iterator[None]:
    """Maps a download's errors: refused or too large, and 401/403/404, fail the job; other
    HTTP answers and network trouble are retried."""
    try:
        yield
    except (dataset_url.Refused, dataset_url.TooLarge) as exc:
        raise InvalidJob(f"{field}.url: {exc}") from None
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if code in (404, 401, 403):
            raise InvalidJob(f"{field}.url: HTTP {code} from {url}") from None
        raise kube.TemporaryKubeError(f"{field}.url: HTTP {code}", delay=30) from None
    except httpx.HTTPError as exc:
        raise kube.TemporaryKubeError(f"{field}.url: {type(exc).__name__}", delay=30) from None


@contextlib.contextmanager
def open_dataset(
    src: ftj.DatasetSource,
    namespace: str,
    field: str,
    transport: httpx.BaseTransport | None = None,
    *,
    created: Created = None,
) -> Iterator[IO[bytes] | None]:
    """The dataset as a binary file at its start, or None for a PVC source (the trainer checks
    those). The one reader of datasets in the operator: validation and the OpenAI upload.

    A ConfigMap's text (at most 1 MiB) is held in memory. A URL's body is streamed to a
    temporary file under ``/tmp`` (an emptyDir in the chart), removed when the block ends
    whatever happens, so memory does not grow with the dataset. ``created`` (the job's
    creation time) bounds the wait for a missing ConfigMap (see the module doc).
    """
    if src.config_map is not None:
        yield io.BytesIO(_configmap_text(src.config_map, namespace, field, created).encode())
    elif src.url is not None:
        with tempfile.TemporaryFile(prefix="kubetune-dataset-", suffix=".jsonl") as f:
            with _url_errors(field, src.url):
                dataset_url.download(src.url, f, MAX_DATASET_BYTES, transport)
            f.seek(0)
            yield f
    else:
        yield None


def describe_problems(report: data.Report, field: str) -> str:
    listed = [
        f"line {p.line}: {p.message} [{p.code}]" if p.line else f"{p.message} [{p.code}]"
        for p in report.errors[:MAX_LISTED_PROBLEMS]
    ]
    total = report.n_errors  # all of them: ``errors`` lists at most 1,000 per code
    more = total - len(listed)
    tail = f"; and {more:,} more (run `kubetune validate` on the file)" if more > 0 else ""
    return f"{field} has {total:,} error(s): " + "; ".join(listed) + tail


@functools.lru_cache(maxsize=32)
def _openai_counter(model: str) -> data.TokenCounter:
    # Finding the tiktoken encoding may try a download; once per model is enough.
    return data.openai_counter(model)


def token_counter(spec: ftj.FineTuneJobSpec) -> data.TokenCounter:
    """tiktoken for OpenAI models; for open models a labelled approximation, because the
    operator loads no model tokenizers (the trainer reports exact counts in its result)."""
    if spec.openai is not None:
        return _openai_counter(spec.openai.model)
    return tokens.OpenAIChatCounter(
        tokens.approx_lengths,
        name="approximation (~4 chars/token, 1 per CJK char); exact counts come from the trainer",
        exact=False,
        limit=None,
    )


def check_dataset(
    src: ftj.DatasetSource,
    namespace: str,
    field: str,
    spec: ftj.FineTuneJobSpec,
    *,
    created: Created = None,
    transport: httpx.BaseTransport | None = None,
) -> DatasetCheck | None:
    """Validates one dataset with the shared validator; raises InvalidJob on errors.

    None for a PVC source. The dataset is read as a stream (:func:`open_dataset`), so memory
    does not depend on its size.
    """
    provider: data.Provider = "openai" if spec.provider == ftj.Provider.OPENAI else "local"
    counter = token_counter(spec)
    method: data.Method = (
        "dpo" if spec.openai is not None and spec.openai.method == "dpo" else "supervised"
    )
    with open_dataset(src, namespace, field, transport, created=created) as f:
        if f is None:
            return None
        report = data.validate_lines(
            f, provider=provider, counter=counter, method=method, source=field
        )
    if not report.ok:
        raise InvalidJob(describe_problems(report, field))
    return DatasetCheck(report=report)


def estimate(
    spec: ftj.FineTuneJobSpec, report: data.Report, settings: OperatorSettings
) -> jobstatus.Estimate | None:
    """The numbers written to ``status.estimate`` before anything runs."""
    if report.stats is None:
        return None
    if spec.openai is not None:
        oa = data.estimate_openai(
            report,
            spec.openai.model,
            spec.openai.hyperparameters.n_epochs,
            prices=settings.prices_per_million or None,
        )
        return jobstatus.Estimate(
            examples=oa.n_examples,
            epochs=oa.n_epochs,
            total_tokens=oa.billed_tokens_per_epoch,
            billed_tokens=oa.billed_tokens,
            cost_usd=oa.cost_usd,
            tokens_exact=oa.exact,
        )
    hp = spec.hyperparameters
    local = data.estimate_local(
        report,
        n_epochs=hp.epochs,
        batch_size=hp.batch_size,
        max_seq_length=hp.max_seq_length,
        packing=hp.packing,
    )
    return jobstatus.Estimate(
        examples=local.n_examples,
        epochs=local.n_epochs,
        total_tokens=local.tokens // max(local.n_epochs, 1),
        total_steps=local.steps,
        gpu_hours=local.gpu_hours,
        tokens_exact=local.exact,
    )
