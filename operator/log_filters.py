"""Keeps the operator's log readable: kopf logs one INFO line for every success of every
handler, and the handlers that run on every tick or watch event would fill the log with them
(a timer per FineTuneJob every 10 s: 30 lines a second for 300 jobs) and hide what matters.

Only those routine successes are dropped, and only without ``--verbose``; failures, retries,
and every other handler's lines stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

KOPF_OBJECT_LOGGER = "kopf.objects"


class RoutineSuccesses(logging.Filter):
    """Drops kopf's "<Kind> '<name>' succeeded." lines for the named handlers."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.endswith("' succeeded."):
            return True
        kind, _, name = message.removesuffix(" succeeded.").partition(" ")
        return not (kind in {"Handler", "Timer", "Daemon"} and name.strip("'") in self.names)


def quiet_successes(*handlers: Callable[..., Any]) -> None:
    """Drop the routine success lines of ``handlers`` from kopf's per-object log."""
    names = {handler.__name__ for handler in handlers}
    logging.getLogger(KOPF_OBJECT_LOGGER).addFilter(RoutineSuccesses(names))
