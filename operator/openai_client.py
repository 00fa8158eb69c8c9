"""The OpenAI client the operator uses: one per FineTuneJob's credentials, careful with them.

:func:`make_client` refuses credentials that cannot be sent as HTTP headers (naming what is
wrong, never the value); the client it returns retries short server-requested waits itself and
leaves long ones (and exhausted quota) to kopf. :func:`quiet_http_logs` keeps the HTTP
libraries' DEBUG records, which carry the ``Authorization`` header, out of ``-v`` logs.
"""

from __future__ import annotations

import logging

import httpx
import openai

from kubetune.operator import openai_errors as errors
from kubetune.operator.settings import DEFAULT_OPENAI_BASE_URL

TIMEOUT = httpx.Timeout(60.0, connect=10.0, write=300.0)
"""Per request: 60 s to answer, 5 minutes to send a large upload."""

MAX_RETRIES = 2
"""Retries inside one call for 408/409/429/5xx, timeouts and connection errors, with the
client's backoff (0.5 s doubling, at most 8 s, jittered) or the server's ``retry-after-ms`` /
``Retry-After``. What still fails reaches the handler as a temporary error."""

MAX_INLINE_RETRY_AFTER = 20.0
"""A server asking for a longer wait is not waited for inside the call (openai-python would
sleep up to 2 minutes in a kopf worker thread): the error goes to kopf with that delay."""


def header_problem(value: str) -> str | None:
    """What keeps ``value`` (stripped) from being sent as a header value, or None.

    A key pasted with a line break or a space inside would be refused by the HTTP library
    (h11) on every request, which openai-python reports as a connection error (retried forever)
    and whose debug log names the whole header. Keys, organization and project IDs are
    printable ASCII without spaces.
    """
    for ch in value:
        if ch in "\r\n":
            return "a line break"
        if ch.isspace():
            return "whitespace"
        if not ch.isascii():
            return "a non-ASCII character"
        if not ch.isprintable():
            return "a control character"
    return None


HTTP_LOGGERS = ("httpx", "httpcore", "openai")
"""Loggers whose DEBUG records carry request headers (the ``Authorization`` header)."""


def quiet_http_logs() -> None:
    """Keeps :data:`HTTP_LOGGERS` at INFO or above, whatever the root level (``-v``)."""
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


class _Client(openai.OpenAI):
    """openai.OpenAI that leaves long server-requested waits to kopf instead of sleeping."""

    def _should_retry(self, response: httpx.Response) -> bool:
        asked = errors.retry_after(response.headers)
        if asked is not None and asked > MAX_INLINE_RETRY_AFTER:
            return False
        if errors.response_is_quota_exhausted(response):  # no quota: waiting cannot help
            return False
        return super()._should_retry(response)


def make_client(
    api_key: str,
    *,
    organization: str | None = None,
    project: str | None = None,
    base_url: str | None = None,
    max_retries: int = MAX_RETRIES,
    timeout: httpx.Timeout = TIMEOUT,
) -> openai.OpenAI:
    """A client for one FineTuneJob's credentials; use it as a context manager (it pools).

    Raises AuthProviderError for an empty key, or a key, organization or project that cannot
    be sent as an HTTP header (:func:`header_problem`); the message never holds the value.
    """
    key = api_key.strip()  # Secrets made with --from-file often end in a newline
    if not key:
        raise errors.AuthProviderError("the API key in the Secret is empty", reason="MissingKey")
    org = (organization or "").strip() or None
    proj = (project or "").strip() or None
    for what, value in (("API key", key), ("organization", org), ("project", proj)):
        problem = header_problem(value or "")
        if problem is not None:
            raise errors.AuthProviderError(
                f"the {what} in the Secret contains {problem}", reason="InvalidKey"
            )
    return _Client(
        api_key=key,
        organization=org,
        project=proj,
        base_url=base_url or DEFAULT_OPENAI_BASE_URL,
        max_retries=max_retries,
        timeout=timeout,
    )
