"""The Hugging Face Hub's refusals of a base model, in the job's terms.

A base model named by id is downloaded from the Hub (``HF_ENDPOINT``, the chart's
``jobDefaults.hfEndpoint``; huggingface.co otherwise) with the token the pod got from
``spec.model.tokenSecretRef`` (``HF_TOKEN``), by the trainer and by the server's vLLM. When the
Hub refuses (a gated model without a token, a token whose account has no access, an unknown id
or revision), huggingface_hub raises (transformers wraps it in an ``OSError``); another attempt
cannot succeed until the job or its Secret changes, so :func:`access` turns it into
:class:`ModelAccessError`, which the trainer and the server launcher report as an invalid job
(exit code 2). A Hub that cannot be reached stays a passing failure. No message carries the
token. huggingface_hub is imported only when a model is loaded: the operator never is.

Access is the job's own: :func:`check` asks the Hub with the job's token before a model is
loaded, even one already in the cache. huggingface_hub itself serves cached files when the Hub
refuses, so without it a cache shared by a namespace's pods (``jobDefaults.modelCacheClaim``)
would hand one job's access to a gated model to every other job there.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubetune.api.finetunejob import MODEL_ID_PATTERN

log = logging.getLogger(__name__)

TOKEN_FIELD = "spec.model.tokenSecretRef"
OFFLINE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
"""What huggingface_hub takes as true in ``HF_HUB_OFFLINE``."""


class ModelAccessError(RuntimeError):
    """The Hub refused the base model: the job (or its token) has to change."""


@contextmanager
def access(model: str, revision: str | None) -> Iterator[None]:
    """Raises :class:`ModelAccessError` for the Hub's refusals of ``model`` inside the block."""
    try:
        yield
    except OSError as exc:  # huggingface_hub's HTTP errors are OSErrors too
        refused = refusal(exc, model, revision)
        if refused is None:
            raise
        raise ModelAccessError(refused) from exc


def on_the_hub(model: str) -> bool:
    """Whether loading ``model`` asks the Hub: an id (``spec.model.id``'s pattern) that is no
    local folder, outside offline mode (``HF_HUB_OFFLINE``)."""
    if not re.match(MODEL_ID_PATTERN, model) or Path(model).is_dir():
        return False
    return os.environ.get("HF_HUB_OFFLINE", "").upper() not in OFFLINE_VALUES


def check(model: str, revision: str | None) -> None:
    """Asks the Hub whether this process's token (``HF_TOKEN``) may read ``model`` at
    ``revision`` (a HEAD of its ``config.json``, cached or not) and raises
    :class:`ModelAccessError` if it refuses. A model that is not on the Hub is not asked about;
    anything else, such as a Hub that cannot be reached, is left to the loader that comes next,
    which uses the cache, retries or fails as it does.
    """
    if not on_the_hub(model):
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        with access(model, revision):
            get_hf_file_metadata(hf_hub_url(model, "config.json", revision=revision))
    except ModelAccessError:
        raise
    except Exception as exc:
        log.warning("could not check %s on the Hub: %s", model, exc)


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


def refusal(exc: BaseException, model: str, revision: str | None) -> str | None:
    """What the Hub refused and what to change, or None when ``exc`` is no refusal."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model {model} on {constants.ENDPOINT}"
    token = get_token() is not None
    for cause in _chain(exc):
        if isinstance(cause, RevisionNotFoundError):
            return f"{where}: it has no revision {revision!r} (spec.model.revision)"
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
