"""The Validating step shared by both providers: the spec, then the dataset, before any child.

A bad spec or dataset is a permanent failure: the message names the field path or the JSONL
line, and no pod, upload or remote job is created. The API server's schema and CEL rules catch
most spec errors at ``kubectl apply``; this catches the rest (and objects written before a CRD
upgrade). Dataset text comes from a ConfigMap (through ``kube``) or an http(s) URL; datasets on
a PVC cannot be read from here and are checked by the trainer with the same validator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from kubetune import data
from kubetune.api import finetunejob as ftj
from kubetune.data import tokens
from kubetune.operator import dataset_url, kube
from kubetune.operator.settings import OperatorSettings

MAX_DATASET_BYTES = 512 * 1024 * 1024
MAX_LISTED_PROBLEMS = 5


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
    text: bytes


def fetch_dataset(
    src: ftj.DatasetSource,
    namespace: str,
    field: str,
    transport: httpx.BaseTransport | None = None,
) -> bytes | None:
    """The dataset's bytes, or None for a PVC source (the trainer checks those)."""
    if src.config_map is not None:
        ref = src.config_map
        value = kube.read_configmap_key(namespace, ref.name, ref.key)
        if value is None:
            raise InvalidJob(f"{field}.configMap: ConfigMap {ref.name!r} has no key {ref.key!r}")
        return value.encode("utf-8")
    if src.url is not None:
        try:
            return dataset_url.fetch(src.url, MAX_DATASET_BYTES, transport)
        except (dataset_url.Refused, dataset_url.TooLarge) as exc:
            raise InvalidJob(f"{field}.url: {exc}") from None
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code in (404, 401, 403):
                raise InvalidJob(f"{field}.url: HTTP {code} from {src.url}") from None
            raise kube.TemporaryKubeError(f"{field}.url: HTTP {code}", delay=30) from None
        except httpx.HTTPError as exc:
            raise kube.TemporaryKubeError(f"{field}.url: {type(exc).__name__}", delay=30) from None
    return None


def describe_problems(report: data.Report, field: str) -> str:
    listed = [
        f"line {p.line}: {p.message} [{p.code}]" if p.line else f"{p.message} [{p.code}]"
        for p in report.errors[:MAX_LISTED_PROBLEMS]
    ]
    more = len(report.errors) - len(listed)
    tail = f"; and {more} more (run `kubetune validate` on the file)" if more > 0 else ""
    return f"{field} has {len(report.errors)} error(s): " + "; ".join(listed) + tail


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
    src: ftj.DatasetSource, namespace: str, field: str, spec: ftj.FineTuneJobSpec
) -> DatasetCheck | None:
    """Validates one dataset with the shared validator; raises InvalidJob on errors."""
    text = fetch_dataset(src, namespace, field)
    if text is None:
        return None
    report = data.validate_text(
        text, provider=ftj.Provider(spec.provider).value, counter=token_counter(spec), source=field
    )
    if not report.ok:
        raise InvalidJob(describe_problems(report, field))
    return DatasetCheck(report=report, text=text)


def estimate(
    spec: ftj.FineTuneJobSpec, report: data.Report, settings: OperatorSettings
) -> ftj.Estimate | None:
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
        return ftj.Estimate(
            examples=oa.n_examples,
            epochs=oa.n_epochs,
            total_tokens=oa.billed_tokens_per_epoch,
            billed_tokens=oa.billed_tokens,
            cost_usd=oa.cost_usd,
        )
    hp = spec.hyperparameters
    local = data.estimate_local(
        report,
        n_epochs=hp.epochs,
        batch_size=hp.batch_size,
        max_seq_length=hp.max_seq_length,
        packing=hp.packing,
    )
    return ftj.Estimate(
        examples=local.n_examples,
        epochs=local.n_epochs,
        total_tokens=local.tokens // max(local.n_epochs, 1),
        total_steps=local.steps,
        gpu_hours=local.gpu_hours,
    )
