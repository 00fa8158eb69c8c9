"""Errors of the OpenAI provider: openai-python's exceptions are classified here and nowhere else.

The provider wraps every call to the API in :func:`translated`, which maps the client's
exceptions onto two intents, in the manner of httpx's ``map_httpcore_exceptions``::

    openai.OpenAIError                                  kubetune
    ├── APIStatusError
    │   ├── 401 AuthenticationError ───────────────┐
    │   ├── 403 PermissionDeniedError ─────────────┴──► AuthProviderError      (permanent)
    │   ├── 404 NotFoundError ─────────────────────────► NotFoundProviderError  (permanent)
    │   ├── 429 RateLimitError, insufficient_quota ────► QuotaProviderError     (permanent)
    │   ├── 400 BadRequestError, 422, other 4xx ───────► PermanentProviderError
    │   └── 408, 409, 429 RateLimitError, 5xx ─────────► TemporaryProviderError(delay)
    ├── APIConnectionError, APITimeoutError ───────────► TemporaryProviderError(delay)
    └── APIResponseValidationError, anything else ─────► TemporaryProviderError(delay)

    ProviderError
    ├── PermanentProviderError      retrying the same request cannot help: the job fails
    │   ├── AuthProviderError       the key, organization or project is wrong
    │   ├── NotFoundProviderError   the job or file is gone (cleanup ignores it)
    │   ├── QuotaProviderError      the account has no quota left (billing), not a rate limit
    │   └── RefusedProviderError    kubetune itself refuses: the Secret is not marked for
    │                               kubetune, or the base URL is not in the operator's allowlist
    └── TemporaryProviderError      try again after ``delay`` seconds

A 429 is a rate limit unless its ``code`` or ``type`` is ``insufficient_quota``: then the
account (organization or project) has no credit or billing left, and no wait fixes that.

Once a remote job exists, an account-level error (auth, not found, quota) while *following* it
must not end the FineTuneJob: the remote job keeps running, and billing, whatever kubetune
reads. :func:`while_following` turns such an error into a long temporary wait whose message
says what to fix; the provider applies it (``openai_provider.step``).

Any other refusal while following (a 400 or 422 on retrieve, events or cancel) does not end it
either: it is retried, backing off, with the server's words in status. Only the remote job's
own terminal status (succeeded, failed, cancelled) ends a FineTuneJob that has one.

A temporary error's ``delay`` is the server's ``retry-after-ms`` or ``Retry-After`` (seconds
or an HTTP date) when it sent one, else a default per kind. The client itself already retried
short waits (see ``openai_client.make_client``); what reaches here is what is left over.
The handler grows the delay of an outage that lasts (:func:`retry_delay`): doubled per
consecutive failure of the same tick, up to :data:`MAX_BACKOFF_DELAY`.

Secrets: openai's exceptions carry the request (with its ``Authorization`` header) and the raw
response body, and OpenAI's 401 body echoes a masked form of the key. Nothing of that leaves
this module: messages are rebuilt from the status code and the error's ``message``, ``code``
and ``param``, run through :func:`redact`, and raised ``from None`` so no traceback shows the
original exception.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import openai

DEFAULT_DELAY_RATE_LIMITED = 30.0
"""Seconds to wait after a 429 that named no ``Retry-After``."""

DEFAULT_DELAY_SERVER = 15.0
"""Seconds to wait after a 5xx, 408 or 409 that named no ``Retry-After``."""

DEFAULT_DELAY_CONNECTION = 10.0
"""Seconds to wait after a timeout or a connection error."""

DELAY_REFUSED_WHILE_FOLLOWING = 60.0
"""Seconds before retrying a request about an existing remote job that OpenAI refused for
another reason (400, 422): the job runs on, so it is followed again, backing off."""

MAX_BACKOFF_DELAY = 600.0
"""The longest wait an outage grows to (:func:`retry_delay`); a longer ``Retry-After`` the
server asked for is still honoured."""

DELAY_WHILE_FOLLOWING = 300.0
"""Seconds between two tries to follow a remote job that the credentials cannot read (a revoked
key, a project without access, no quota): long, because a person has to fix something, and
short enough that following resumes within minutes once they have."""

QUOTA_CODE = "insufficient_quota"
"""``code``/``type`` of OpenAI's 429 when the account has no credit or billing left."""

QUOTA_ADVICE = (
    "; the OpenAI account (its organization or project) has no quota left, which no retry "
    "fixes: add credit or raise its limits under Billing in the OpenAI dashboard, then create "
    "the FineTuneJob again"
)

MAX_DELAY = 3600.0
"""An absurd ``Retry-After`` is capped at an hour; the handler polls again after that."""

MAX_MESSAGE = 1000
"""Characters of the server's message kept in our messages (status messages stay short)."""

# OpenAI keys (`sk-...`, `sk-proj-...`) and the masked echo in its 401 body (`sk-abc***wxyz`).
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{3,}")
_BEARER = re.compile(r"(?i)\bbearer\s+\S+")


class ProviderError(Exception):
    """Base of the errors the OpenAI provider raises; ``reason`` is a CamelCase word."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class PermanentProviderError(ProviderError):
    """Retrying cannot help: the handler marks the FineTuneJob ``Failed`` with this message."""


class AuthProviderError(PermanentProviderError):
    """401/403: the API key, organization or project is wrong or lacks access."""


class NotFoundProviderError(PermanentProviderError):
    """404: the job or file does not exist (any more)."""


class QuotaProviderError(PermanentProviderError):
    """429 ``insufficient_quota``: the account has no quota left; retrying cannot help."""


class RefusedProviderError(PermanentProviderError):
    """kubetune refuses to send the credentials (unmarked Secret, base URL not allowed)."""


class TemporaryProviderError(ProviderError):
    """Worth retrying after ``delay`` seconds (kopf.TemporaryError(delay=...)).

    ``backoff``: an outage or refusal that may last, whose delay grows with each consecutive
    failure (:func:`retry_delay`); False for waits whose length is chosen on purpose.
    """

    def __init__(self, message: str, *, reason: str, delay: float, backoff: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay
        self.backoff = backoff


def retry_delay(exc: TemporaryProviderError, retry: int) -> float:
    """Seconds to wait before try ``retry + 1`` (kopf's ``retry``: 0 for the first failure).

    A backing-off error's delay doubles per consecutive failure, capped at
    :data:`MAX_BACKOFF_DELAY` (but never below the delay itself, which may be the server's
    ``Retry-After``); any other error's delay is kept as it is.
    """
    if not exc.backoff:
        return exc.delay
    grown = exc.delay * 2.0 ** min(max(retry, 0), 16)
    return max(exc.delay, min(grown, MAX_BACKOFF_DELAY))


def client_secrets(client: openai.OpenAI) -> tuple[str, ...]:
    """What must never appear in a message made from this client's errors: its API key."""
    key = client.api_key
    return (key,) if isinstance(key, str) and key else ()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secrets, key-like tokens or bearer credentials."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _BEARER.sub("Bearer ***", text)
    return _KEY_LIKE.sub("sk-***", text)


def retry_after(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, then ``Retry-After``), or None."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(raw)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - (time.time() if now is None else now))


def is_quota_exhausted(code: object, type_: object) -> bool:
    """Whether an error's ``code`` or ``type`` says the account has no quota left."""
    return QUOTA_CODE in (code, type_)


def response_is_quota_exhausted(response: Any) -> bool:
    """Whether an HTTP 429 response's body is OpenAI's ``insufficient_quota`` error.

    Reads the body only if it has been read already (openai-python reads it before deciding to
    retry a non-streaming request); anything unreadable counts as an ordinary rate limit.
    """
    if getattr(response, "status_code", None) != 429:
        return False
    try:
        body = response.json()
    except Exception:  # not read yet, not JSON: an ordinary 429
        return False
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    return is_quota_exhausted(error.get("code"), error.get("type"))


def _server_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = str(body["message"])
    elif isinstance(body, str):
        text = body
    else:
        text = ""
    return text.strip()[:MAX_MESSAGE]


def _describe(exc: openai.APIStatusError, what: str) -> str:
    parts = [f"{what}: OpenAI answered {exc.status_code}"]
    if exc.code:
        parts[0] += f" ({exc.code})"
    text = _server_message(exc)
    if text:
        parts.append(text)
    if exc.param:
        parts.append(f"param: {exc.param}")
    return ": ".join(parts[:2]) + ("" if len(parts) < 3 else f" ({parts[2]})")


def _delay(exc: openai.APIStatusError, default: float) -> float:
    asked = retry_after(exc.response.headers)
    delay = default if asked is None else asked
    return min(max(delay, 1.0), MAX_DELAY)


def classify(exc: openai.OpenAIError, what: str, secrets: Iterable[str] = ()) -> ProviderError:
    """The one mapping from openai-python's exceptions to ours (see the module docstring)."""
    secrets = tuple(secrets)
    if isinstance(exc, openai.APIStatusError):
        msg = redact(_describe(exc, what), secrets)
        status = exc.status_code
        if status in (401, 403):
            reason = "Unauthorized" if status == 401 else "Forbidden"
            return AuthProviderError(msg, reason=reason)
        if status == 404:
            return NotFoundProviderError(msg, reason="NotFound")
        if status == 429 and is_quota_exhausted(exc.code, exc.type):
            return QuotaProviderError(msg + QUOTA_ADVICE, reason="InsufficientQuota")
        if status == 429:
            delay = _delay(exc, DEFAULT_DELAY_RATE_LIMITED)
            return TemporaryProviderError(msg, reason="RateLimited", delay=delay, backoff=True)
        if status >= 500 or status in (408, 409):
            delay = _delay(exc, DEFAULT_DELAY_SERVER)
            return TemporaryProviderError(msg, reason="ServerError", delay=delay, backoff=True)
        return PermanentProviderError(msg, reason="BadRequest" if status == 400 else "Rejected")
    if isinstance(exc, openai.APITimeoutError):
        return TemporaryProviderError(
            f"{what}: OpenAI did not answer in time",
            reason="Timeout",
            delay=DEFAULT_DELAY_CONNECTION,
            backoff=True,
        )
    if isinstance(exc, openai.APIConnectionError):
        return TemporaryProviderError(
            f"{what}: cannot reach the OpenAI API",
            reason="ConnectionError",
            delay=DEFAULT_DELAY_CONNECTION,
            backoff=True,
        )
    # APIResponseValidationError and the rest: a garbled answer, most likely passing.
    return TemporaryProviderError(
        redact(f"{what}: unexpected answer from the OpenAI API ({type(exc).__name__})", secrets),
        reason="BadResponse",
        delay=DEFAULT_DELAY_SERVER,
        backoff=True,
    )


def while_following(
    exc: PermanentProviderError, job_id: str, secret: str
) -> TemporaryProviderError:
    """What an error about the existing remote job ``job_id`` means for the FineTuneJob: a wait.

    The remote job runs (and bills) whatever kubetune can read, so nothing but its own terminal
    status ends the FineTuneJob. Auth, not-found and quota errors, and kubetune's own refusal
    to use the credentials, are retried after :data:`DELAY_WHILE_FOLLOWING` with a message that
    says what to fix in ``secret`` (the Secret, as ``namespace/name``); any other refusal (a 400
    or 422) after :data:`DELAY_REFUSED_WHILE_FOLLOWING`, backing off.
    """
    if isinstance(exc, AuthProviderError) and exc.reason == "Forbidden":
        fix = f"give the key in Secret {secret} (its organization, project) access to that job"
    elif isinstance(exc, AuthProviderError):
        fix = f"put a valid API key of the project that created it in Secret {secret}"
    elif isinstance(exc, RefusedProviderError):
        fix = "make the change named above (until then nothing is read from the Secret or sent)"
    elif isinstance(exc, NotFoundProviderError):
        fix = (f"the key in Secret {secret} does not see the job: it belongs to another "
               "organization or project than the one that created it; restore a key of that "
               "project (or the Secret's organization/project keys)")  # fmt: skip
    elif isinstance(exc, QuotaProviderError):
        fix = "add credit or raise the account's limits under Billing in the OpenAI dashboard"
    else:
        return TemporaryProviderError(
            f"{exc.message.rstrip('.')}. OpenAI job {job_id} exists and may still be running "
            "(and billing); the FineTuneJob is kept and kubetune tries again, backing off. If "
            "this persists, look at the job in OpenAI's dashboard (cancel it there if needed)",
            reason=exc.reason,
            delay=DELAY_REFUSED_WHILE_FOLLOWING,
            backoff=True,
        )
    minutes = round(DELAY_WHILE_FOLLOWING / 60)
    happened = exc.message.removesuffix(QUOTA_ADVICE).rstrip(".")
    return TemporaryProviderError(
        f"{happened}. OpenAI job {job_id} exists and may "
        f"still be running (and billing); the FineTuneJob is kept and kubetune tries again "
        f"every {minutes} minutes. To resume following it: {fix}",
        reason=exc.reason,
        delay=DELAY_WHILE_FOLLOWING,
    )


@contextmanager
def translated(what: str, secrets: Iterable[str] = ()) -> Iterator[None]:
    """Runs the block; an openai exception leaves it as a :class:`ProviderError`, redacted."""
    try:
        yield
    except openai.OpenAIError as exc:
        raise classify(exc, what, secrets) from None
