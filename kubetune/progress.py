"""The progress contract between the trainer (writer) and the operator (reader).

The trainer appends one :class:`ProgressRecord` per logged step to ``metrics.jsonl`` and, in a
cluster, writes the latest one into its progress ConfigMap under :data:`CONFIGMAP_KEY`. The
operator reads that key and turns it into ``FineTuneJob.status.progress``. Both ends use only
this module, so the format changes in one place. It imports nothing but the standard library
and ``kubetune.api``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune.api.jobstatus import Progress

CONFIGMAP_KEY = "progress.json"
"""Key of the latest record in the trainer's progress ConfigMap."""

RESULT_KEY = "result.json"
"""Key the trainer writes its final result under, next to the progress record."""


@dataclass(frozen=True)
class ProgressRecord:
    """One training step as the trainer saw it."""

    step: int
    total_steps: int
    epoch: float
    train_loss: float | None = None
    valid_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    """Real (non-padding) tokens per second over the last logging interval."""
    elapsed_seconds: float = 0.0
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ProgressRecord:
        data: dict[str, Any] = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def eta(self) -> datetime | None:
        """Estimated finish, extrapolating the mean step time so far."""
        if self.step <= 0 or self.total_steps <= self.step or self.elapsed_seconds <= 0:
            return None
        per_step = self.elapsed_seconds / self.step
        at = datetime.fromisoformat(self.time)
        return at + timedelta(seconds=per_step * (self.total_steps - self.step))

    def to_status(self) -> Progress:
        """What the operator writes into ``status.progress``."""
        pct = 100 * self.step // self.total_steps if self.total_steps else 0
        eta = self.eta()
        return Progress(
            step=self.step,
            total_steps=self.total_steps,
            epoch=round(self.epoch, 3),
            train_loss=None if self.train_loss is None else round(self.train_loss, 4),
            valid_loss=None if self.valid_loss is None else round(self.valid_loss, 4),
            tokens_per_second=None
            if self.tokens_per_second is None
            else round(self.tokens_per_second, 1),
            eta=None if eta is None else eta.isoformat(timespec="seconds"),
            summary=f"{self.step}/{self.total_steps} ({pct}%)",
        )
