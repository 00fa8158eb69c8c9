"""Errors of the OpenAI provider: openai-python's exceptions are classified here and nowhere else.

The provider wraps every call to the API in :func:`translated`, which maps the client's
exceptions onto two intents, in the manner of httpx's ``map_httpcore_exceptions``::

    openai.OpenAIError                                  kubetune
    ├── APIStatusError
    │   ├── 401 AuthenticationError ───────────────┐
    │   ├── 403 PermissionDeniedError ─────────────┴──► AuthProviderError      (permanent)
    │   ├── 404 NotFoundError ─────────────────────────► NotFoundProviderError  (permanent)
    │   ├── 400 BadRequestError, 422, other 4xx ───────► PermanentProviderError
    │   └── 408, 409, 429 RateLimitError, 5xx ─────────► TemporaryProviderError(delay)
    ├── APIConnectionError, APITimeoutError ───────────► TemporaryProviderError(delay)
    └── APIResponseValidationError, anything else ─────► TemporaryProviderError(delay)

    ProviderError
    ├── PermanentProviderError      retrying the same request cannot help: the job fails
    │   ├── AuthProviderError       the key, organization or project is wrong
    │   └── NotFoundProviderError   the job or file is gone (cleanup ignores it)
    └── TemporaryProviderError      try again after ``delay`` seconds

A temporary error's ``delay`` is the server's ``retry-after-ms`` or ``Retry-After`` (seconds
or an HTTP date) when it sent one, else a default per kind. The client itself already retried
short waits (see ``openai_provider.make_client``); what reaches here is what is left over.

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


class TemporaryProviderError(ProviderError):
    """Worth retrying after ``delay`` seconds (kopf.TemporaryError(delay=...))."""

    def __init__(self, message: str, *, reason: str, delay: float) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


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
        if status == 429:
            delay = _delay(exc, DEFAULT_DELAY_RATE_LIMITED)
            return TemporaryProviderError(msg, reason="RateLimited", delay=delay)
        if status >= 500 or status in (408, 409):
            delay = _delay(exc, DEFAULT_DELAY_SERVER)
            return TemporaryProviderError(msg, reason="ServerError", delay=delay)
        return PermanentProviderError(msg, reason="BadRequest" if status == 400 else "Rejected")
    if isinstance(exc, openai.APITimeoutError):
        return TemporaryProviderError(
            f"{what}: OpenAI did not answer in time",
            reason="Timeout",
            delay=DEFAULT_DELAY_CONNECTION,
        )
    if isinstance(exc, openai.APIConnectionError):
        return TemporaryProviderError(
            f"{what}: cannot reach the OpenAI API",
            reason="ConnectionError",
            delay=DEFAULT_DELAY_CONNECTION,
        )
    # APIResponseValidationError and the rest: a garbled answer, most likely passing.
    return TemporaryProviderError(
        redact(f"{what}: unexpected answer from the OpenAI API ({type(exc).__name__})", secrets),
        reason="BadResponse",
        delay=DEFAULT_DELAY_SERVER,
    )


@contextmanager
def translated(what: str, secrets: Iterable[str] = ()) -> Iterator[None]:
    """Runs the block; an openai exception leaves it as a :class:`ProviderError`, redacted."""
    try:
        yield
    except openai.OpenAIError as exc:
        raise classify(exc, what, secrets) from None
