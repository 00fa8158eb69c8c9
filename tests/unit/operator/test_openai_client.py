"""The operator's OpenAI client: credentials that cannot be headers are refused by name, never
by value, and ``-v`` logs never carry the ``Authorization`` header."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import openai
import pytest

from fakes.openai_finetune import FakeOpenAI, Timing
from kubetune.operator import openai_client
from kubetune.operator import openai_errors as errors

KEY = "sk-kubetune-test-7f3Qx9LmN2pR8sVw4Zq9W"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(2, 2, 10)).serve() as f:
        yield f


def test_make_client_strips_the_key_and_refuses_an_empty_one() -> None:
    with openai_client.make_client(KEY + "\n", base_url="http://x/v1") as c:
        assert c.api_key == KEY
    with pytest.raises(errors.AuthProviderError):
        openai_client.make_client(" \n")


@pytest.mark.parametrize(
    ("inside", "problem"),
    [("\n", "a line break"), (" ", "whitespace"), ("\t", "whitespace"),
     ("\x00", "a control character"), ("\u00e9", "a non-ASCII character")],
)  # fmt: skip
def test_make_client_refuses_a_key_that_cannot_be_a_header(inside: str, problem: str) -> None:
    broken = KEY[:12] + inside + KEY[12:]
    with pytest.raises(errors.AuthProviderError) as caught:
        openai_client.make_client(broken, base_url="http://x/v1")
    assert caught.value.reason == "InvalidKey" and problem in str(caught.value)
    assert KEY[:12] not in str(caught.value) and KEY[12:] not in str(caught.value)
    with pytest.raises(errors.AuthProviderError, match="project"):
        openai_client.make_client(KEY, project="proj" + inside + "x", base_url="http://x/v1")


@pytest.fixture
def http_log_levels() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in openai_client.HTTP_LOGGERS]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_verbose_operator_logs_keep_http_libraries_at_info(
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    http_log_levels: None,
) -> None:
    """With ``-v`` the root logger is at DEBUG; httpx/httpcore/openai debug records would show
    the Authorization header (h11 names a header value it refuses)."""
    import kopf

    from kubetune.operator import __main__ as operator_main

    monkeypatch.setattr(kopf, "run", lambda **_: None)
    caplog.set_level(logging.DEBUG)
    assert operator_main.main(["-v", "--metrics", ""]) == 0
    for name in openai_client.HTTP_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.INFO, name

    # A key the client would send as it is (make_client refuses it): nothing logs it.
    broken = KEY[:12] + "\n" + KEY[12:]
    raw = openai.OpenAI(api_key=broken, base_url=fake.base_url, max_retries=1)
    with raw, pytest.raises(openai.APIConnectionError):
        raw.files.list()
    assert caplog.records, "the root logger records at DEBUG"
    assert KEY[12:] not in caplog.text and KEY[:12] not in caplog.text
