"""The Hugging Face Hub's refusals, in the job's terms.

A base model named by id is downloaded from the Hub (``HF_ENDPOINT``, the chart's
``jobDefaults.hfEndpoint``; huggingface.co otherwise) with the token the pod got from
``spec.model.tokenSecretRef`` (``HF_TOKEN``). When the Hub refuses (a gated model without a
token, a token whose account has no access, an unknown id or revision), transformers raises an
``OSError`` that wraps huggingface_hub's error; another attempt cannot succeed until the job or
its Secret changes, so :func:`access` turns it into :class:`ModelAccessError`, which the trainer
reports as an invalid job (exit code 2: the Job fails at once instead of retrying). A Hub that
cannot be reached stays a passing failure, retried by the Job. No message carries the token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kubetune.api.jobconfig import TrainerConfig

TOKEN_FIELD = "spec.model.tokenSecretRef"


class ModelAccessError(RuntimeError):
    """The Hub refused the base model: the job (or its token) has to change."""


@contextmanager
def access(config: TrainerConfig) -> Iterator[None]:
    """Raises :class:`ModelAccessError` for the Hub's refusals inside the block."""
    try:
        yield
    except OSError as exc:
        refused = refusal(exc, config)
        if refused is None:
            raise
        raise ModelAccessError(refused) from exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def refusal(exc: BaseException, config: TrainerConfig) -> str | None:
    """What the Hub refused and what to change, or None when ``exc`` is no refusal."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    model = config.model.id_or_path
    where = f"model {model} on {constants.ENDPOINT}"
    token = get_token() is not None
    for cause in _chain(exc):
        if isinstance(cause, RevisionNotFoundError):
            return f"{where}: it has no revision {config.model.revision!r} (spec.model.revision)"
        if isinstance(cause, GatedRepoError):
            if not token:
                return (
                    f"{where}: the model is gated and the job gave no token; put a token of an "
                    f"account that was granted access in a Secret and name it in {TOKEN_FIELD}"
                )
            return (
                f"{where}: the model is gated and the account of the token in {TOKEN_FIELD} "
                "has not been granted access; ask for access on the model's page"
            )
        if isinstance(cause, RepositoryNotFoundError):
            hint = "" if token else f"; a private model needs a token ({TOKEN_FIELD})"
            return f"{where}: no such model, or no access to it{hint}"
        if isinstance(cause, HfHubHTTPError) and _status(cause) == 401 and token:
            return f"{where}: the Hub rejected the token in {TOKEN_FIELD} (invalid or expired)"
    return None
