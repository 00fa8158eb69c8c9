"""The training plan: OpenAI's auto epochs, auto batch size, step counts, bad combinations."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.jobconfig import TrainerConfig
from kubetune.trainer import plan


def config(**hyperparameters: Any) -> TrainerConfig:
    gpus = hyperparameters.pop("gpus", 0)
    max_steps = hyperparameters.pop("max_steps", None)
    return TrainerConfig.model_validate(
        {
            "job": {"name": "t"},
            "model": {"idOrPath": "/m", "display": "m"},
            "dataset": {"path": "/d.jsonl"},
            "outputDir": "/o",
            "gpus": gpus,
            "maxSteps": max_steps,
            "hyperparameters": hyperparameters,
        }
    )


@pytest.mark.parametrize(
    ("examples", "epochs"),
    [
        (1, 25),  # 100 // 1 = 100, capped at 25
        (10, 10),  # 10 x 3 < 100 -> 100 // 10
        (30, 3),  # 90 < 100 -> 100 // 30 = 3 (integer division, as OpenAI)
        (33, 3),
        (34, 3),  # 102 >= 100: the default 3
        (54, 3),
        (8_333, 3),  # 24,999
        (8_334, 2),  # 25,002 > 25,000 -> 25,000 // 8,334
        (12_501, 1),
        (100_000, 1),  # at least 1
    ],
)
def test_auto_epochs_follows_openai(examples: int, epochs: int) -> None:
    assert plan.auto_epochs(examples) == epochs


@pytest.mark.parametrize(
    ("examples", "processes", "accumulation", "batch"),
    [
        (54, 1, 1, 1),  # 0.2% of 54 rounds to 0 -> at least 1
        (1_000, 1, 1, 2),
        (10_000, 1, 1, 8),  # 20, clamped to 8 per process
        (10_000, 4, 1, 20),  # 5 per GPU
        (100_000, 4, 1, 32),  # 50 per GPU, clamped to 8
        (1_000, 4, 1, 4),  # at least 1 per GPU
        (1_000, 1, 4, 4),  # rounded up to a multiple of the accumulation
        (3_000, 2, 2, 8),  # 6 -> 3 per GPU -> multiple of 4
    ],
)
def test_auto_batch_size(examples: int, processes: int, accumulation: int, batch: int) -> None:
    assert plan.auto_batch_size(examples, processes, accumulation) == batch


def test_plan_counts_steps_like_the_trainer() -> None:
    p = plan.make_plan(config(epochs=3, batchSize=8), examples=54)
    assert (p.epochs, p.batch_size, p.micro_batch_size) == (3, 8, 8)
    assert p.steps_per_epoch == 7  # 6 full batches and one of 6
    assert p.total_steps == 21
    assert p.warmup_steps == 1  # ceil(21 x 0.03)


def test_plan_with_accumulation_and_gpus() -> None:
    p = plan.make_plan(config(epochs=2, batchSize=16, gradientAccumulationSteps=2, gpus=4), 100)
    assert (p.processes, p.micro_batch_size) == (4, 2)
    # 100 / (2 x 4) = 13 micro-batches per process, 7 optimizer steps (the last one short)
    assert (p.steps_per_epoch, p.total_steps) == (7, 14)


def test_auto_values_are_marked() -> None:
    p = plan.make_plan(config(), examples=54)
    assert p.epochs_auto and p.batch_size_auto
    assert (p.epochs, p.batch_size, p.total_steps) == (3, 1, 162)


def test_max_steps_caps_the_plan() -> None:
    assert plan.make_plan(config(epochs=3, batchSize=1, max_steps=5), 54).total_steps == 5


def test_batch_size_must_divide_by_accumulation_and_gpus() -> None:
    with pytest.raises(plan.PlanError, match=r"`batchSize` \(6\).*4 × 1 = 4"):
        plan.make_plan(config(batchSize=6, gradientAccumulationSteps=4), 100)


def test_no_examples_is_an_error() -> None:
    with pytest.raises(plan.PlanError, match="no usable examples"):
        plan.make_plan(config(), 0)


@pytest.mark.parametrize("examples", [1, 54, 1_000, 4_321, 20_000])
@pytest.mark.parametrize("batch_size", ["auto", 3, 8])
def test_the_doctors_estimate_counts_the_steps_the_trainer_takes(
    examples: int, batch_size: Any
) -> None:
    """The operator writes ``estimate.totalSteps`` from the dataset doctor before the trainer
    runs; on one GPU it must be the trainer's own count, packed or not."""
    from kubetune import data
    from kubetune.data.stats import StatsAccumulator

    acc = StatsAccumulator(None)
    for i in range(examples):
        acc.add(40 + i % 90, 20)
    stats = acc.result("test", True)
    for packing in (True, False):
        est = data.estimate_local(stats, batch_size=batch_size, packing=packing)
        p = plan.make_plan(config(batchSize=batch_size, packing=packing), examples=examples)
        assert (est.n_epochs, est.batch_size, est.steps) == (p.epochs, p.batch_size, p.total_steps)
