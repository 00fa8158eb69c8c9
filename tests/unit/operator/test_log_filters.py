"""The operator's log drops kopf's routine success lines of its per-tick handlers, and only
those."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from kubetune.operator import log_filters


def reconcile() -> None: ...


def count_jobs() -> None: ...


@pytest.fixture
def kopf_log(caplog: pytest.LogCaptureFixture) -> Iterator[logging.Logger]:
    logger = logging.getLogger(log_filters.KOPF_OBJECT_LOGGER)
    before = list(logger.filters)
    caplog.set_level(logging.DEBUG)
    yield logger
    logger.filters[:] = before


def test_routine_successes_are_dropped_and_everything_else_kept(
    kopf_log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    log_filters.quiet_successes(reconcile, count_jobs)
    kopf_log.info("Timer 'reconcile' succeeded.")
    kopf_log.info("Handler 'count_jobs' succeeded.")
    kopf_log.info("Handler 'delete_output' succeeded.")
    kopf_log.error("Timer 'reconcile' failed with an exception. Will retry.")
    kopf_log.info("Timer %r succeeded.", "reconcile")  # %-style, as a LoggerAdapter may send it

    assert [r.getMessage() for r in caplog.records] == [
        "Handler 'delete_output' succeeded.",
        "Timer 'reconcile' failed with an exception. Will retry.",
    ]
