"""The training plan: the resolved config's ``auto`` values and step counts, as pure arithmetic.

Decided here, once, before any model is loaded (and unit-tested without torch):

- ``epochs: auto`` — OpenAI's rule, as its cookbook states it: 3 epochs; if examples × 3 is
  under 100, ``100 // examples`` (at most 25); if it is over 25,000, ``25,000 // examples``
  (at least 1). Integer division, as OpenAI does, so the same file gets the same epochs here
  as on OpenAI's API.
- ``batch_size`` is the number of examples per optimizer step over all processes (OpenAI's
  meaning). ``auto`` is about 0.2% of the examples, clamped to 1..8 per GPU (or per CPU
  process), then rounded up to a multiple of ``processes × gradient_accumulation_steps`` so
  every micro-batch holds the same number of examples. With packing, the examples of one
  micro-batch share one padding-free sequence, so a larger batch costs no padding.
- The step counts follow the Hugging Face Trainer's own arithmetic (a short last micro-batch
  and a short last accumulation window still count), so ``total_steps`` is what the trainer
  reports as its total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune import data
from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.types import AUTO

AUTO_BATCH_FRACTION = 0.002
MAX_AUTO_BATCH_PER_PROCESS = 8


class PlanError(ValueError):
    """The config cannot be trained as written (a permanent error: retrying will not help)."""


def auto_epochs(examples: int) -> int:
    """OpenAI's default ``n_epochs`` for ``examples`` examples: the dataset doctor's rule, so
    the operator's estimate and the trainer agree."""
    if examples <= 0:
        raise PlanError("the training file has no usable examples")
    return int(data.epochs_auto(examples))


def auto_batch_size(examples: int, processes: int, accumulation: int) -> int:
    """About 0.2% of the examples, 1..8 per process, a multiple of processes × accumulation.

    With one process and no accumulation this is ``kubetune.data``'s estimate rule."""
    per_process = round(AUTO_BATCH_FRACTION * examples / processes)
    per_process = min(max(per_process, 1), MAX_AUTO_BATCH_PER_PROCESS)
    unit = processes * accumulation
    return math.ceil(per_process * processes / unit) * unit


@dataclass(frozen=True)
class TrainingPlan:
    examples: int
    """Examples left after truncation/dropping: what one epoch trains on."""
    epochs: int
    batch_size: int
    """Examples per optimizer step, over all processes."""
    processes: int
    gradient_accumulation_steps: int
    micro_batch_size: int
    """Examples per forward pass in one process (packed into one sequence when packing)."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs_auto: bool = False
    batch_size_auto: bool = False


def make_plan(config: TrainerConfig, examples: int) -> TrainingPlan:
    """Resolve ``auto`` values and count steps for ``examples`` usable examples."""
    hp = config.hyperparameters
    processes = max(1, config.gpus)
    accumulation = hp.gradient_accumulation_steps
    unit = processes * accumulation
    if examples <= 0:
        raise PlanError("the training file has no usable examples")

    epochs = auto_epochs(examples) if hp.epochs == AUTO else int(hp.epochs)
    if hp.batch_size == AUTO:
        batch_size = auto_batch_size(examples, processes, accumulation)
    else:
        batch_size = int(hp.batch_size)
        if batch_size % unit:
            raise PlanError(
                f"`batchSize` ({batch_size}) must be a multiple of `gradientAccumulationSteps` "
                f"× GPUs ({accumulation} × {processes} = {unit}), so that every micro-batch "
                "holds the same number of examples"
            )
    micro = batch_size // unit
    # HF Trainer: batches per process per epoch, then optimizer steps per epoch.
    batches = math.ceil(examples / (micro * processes))
    steps_per_epoch = max(1, math.ceil(batches / accumulation))
    total = steps_per_epoch * epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = math.ceil(total * hp.warmup_ratio)
    return TrainingPlan(
        examples=examples,
        epochs=epochs,
        batch_size=batch_size,
        processes=processes,
        gradient_accumulation_steps=accumulation,
        micro_batch_size=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        epochs_auto=hp.epochs == AUTO,
        batch_size_auto=hp.batch_size == AUTO,
    )
