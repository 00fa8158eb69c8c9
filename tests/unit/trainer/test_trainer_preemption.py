"""SIGTERM becomes a request to checkpoint and stop, not an immediate death."""

from __future__ import annotations

import os
import signal
import time

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune.trainer import engine
from kubetune.trainer.preemption import Preemption


def test_sigterm_sets_the_flag_and_uninstall_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    preemption = Preemption()
    preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not preemption.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert preemption.requested
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_callback_saves_and_stops_only_when_requested(tmp_path: object) -> None:
    preemption = Preemption()
    callback = engine.PreemptionCallback(preemption)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    control = callback.on_step_end(args, TrainerState(), TrainerControl())
    assert not control.should_save and not control.should_training_stop
    preemption.requested = True
    control = callback.on_step_end(args, TrainerState(), TrainerControl())
    assert control.should_save and control.should_training_stop


def test_a_preempted_step_checkpoints_without_a_validation_pass(tmp_path: object) -> None:
    preemption = Preemption()
    preemption.requested = True
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    due = TrainerControl(should_evaluate=True)  # what the Trainer decides on an eval step
    control = engine.PreemptionCallback(preemption).on_step_end(args, TrainerState(), due)
    assert control.should_save and control.should_training_stop
    assert control.should_log  # the step it stopped at is recorded, on or off the grid
    assert not control.should_evaluate  # a full pass could outlast the grace period


def test_a_validation_pass_stops_at_the_next_batch_only_when_requested(tmp_path: object) -> None:
    preemption = Preemption()
    callback = engine.PreemptionCallback(preemption)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    callback.on_prediction_step(args, TrainerState(), TrainerControl())
    preemption.requested = True
    with pytest.raises(engine.EvaluationStopped):
        callback.on_prediction_step(args, TrainerState(), TrainerControl())


def test_a_sigterm_during_a_vote_counts_at_the_next_vote_on_every_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race that hung two workers under load (one left a validation pass alone): the
    SIGTERM handler ran while this process's vote was under way, after its 0 was counted.
    The vote's answer (0, as on the other process) stands; the next vote says 1 on both."""
    import torch
    import torch.distributed as dist

    preemption = Preemption()
    others: list[int] = []

    def all_reduce(flag: torch.Tensor, op: object = None) -> None:
        others.append(int(flag.item()))
        if len(others) == 1:
            preemption.requested = True  # the handler, while the collective runs

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert engine.preemption_agreed(preemption) is False
    assert engine.preemption_agreed(preemption) is True
    assert others == [0, 1]
