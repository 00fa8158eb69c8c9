"""SIGTERM as a request, not a death: the flag the training loop checks between steps.

Kubernetes sends SIGTERM when it evicts or preempts the pod, then SIGKILL after the grace
period. The handler only records the request; the engine's callback
(:class:`kubetune.trainer.engine.PreemptionCallback`) turns it into "finish this step, write a
checkpoint, stop", and the run exits with 143. Installed first thing in a run, so a SIGTERM
while data or the model loads is not lost either. Standard library only: it must be cheap to
import before the heavy imports happen.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Preemption:
    """Set once SIGTERM arrives; stays set."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM: checkpointing at the end of this step, then exiting")
        self.requested = True
