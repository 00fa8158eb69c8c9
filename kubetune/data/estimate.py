"""What a fine-tuning job will cost, from a dataset's token statistics; no I/O, no tokenizers.

OpenAI: epochs under the ``auto`` rule of OpenAI's data-preparation cookbook, billed tokens
(Σ min(limit, tokens) × epochs) and dollars from a per-1M-token price table that callers can
override (the operator passes its chart value). Local: optimizer steps and GPU-hours from a
tokens/s figure that callers set (the default is an assumption and says so).

Model names match table keys by longest prefix, after an ``ft:`` prefix is dropped, so dated
snapshots (``gpt-4o-mini-2024-07-18``) and fine-tuned models find their base model's row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, Protocol

import msgspec

from kubetune.data.stats import TokenStats

OPENAI_PRICES_PER_MILLION: dict[str, float] = {
    "gpt-4o-mini": 3.00,
    "gpt-4o": 25.00,
    "gpt-4.1-mini": 5.00,
}
"""USD per 1M training tokens, by model-name prefix."""

OPENAI_EXAMPLE_TOKEN_LIMITS: dict[str, int] = {
    "gpt-4o-mini": 65_536,
    "gpt-4o": 65_536,
    "gpt-4.1": 65_536,
    "gpt-3.5-turbo": 16_385,
    "gpt-4": 8_192,
}
"""Tokens per training example OpenAI accepts, by model-name prefix."""

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"

# OpenAI's `auto` epochs rule (data-preparation cookbook).
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

DEFAULT_TOKENS_PER_SECOND = 2_500.0
"""Assumed LoRA training throughput of one GPU on a 7-8B model; set a measured figure."""
DEFAULT_MAX_SEQ_LENGTH = 2048
"""The trainer's default longest example in tokens (``hyperparameters.maxSeqLength``)."""

Auto = Literal["auto"]


class _HasStats(Protocol):
    @property
    def stats(self) -> TokenStats | None: ...


def lookup(table: Mapping[str, float], model: str) -> float | None:
    """The row of ``table`` whose key is the longest prefix of ``model`` (``ft:`` dropped)."""
    name = model.removeprefix("ft:")
    best = max((k for k in table if name.startswith(k)), key=len, default=None)
    return None if best is None else table[best]


def openai_token_limit(model: str) -> int | None:
    value = lookup(OPENAI_EXAMPLE_TOKEN_LIMITS, model)
    return None if value is None else int(value)


def epochs_auto(n_examples: int) -> int:
    """OpenAI's ``auto`` epochs: 3, adjusted so that examples × epochs stays in 100..25,000."""
    if n_examples <= 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def _stats(report_or_stats: TokenStats | _HasStats) -> TokenStats:
    stats = report_or_stats if isinstance(report_or_stats, TokenStats) else report_or_stats.stats
    if stats is None:
        raise ValueError("an estimate needs token counts: validate with a token counter")
    return stats


class OpenAIEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """What an OpenAI fine-tuning job on this data costs."""

    model: str
    n_examples: int
    n_epochs: int
    epochs_auto: bool
    """Whether ``n_epochs`` came from the ``auto`` rule."""
    billed_tokens_per_epoch: int
    billed_tokens: int
    price_per_million: float | None
    """None when the model has no row in the price table."""
    cost_usd: float | None
    counter: str
    exact: bool
    """False when the token counts are an approximation (see ``counter``)."""


class LocalEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """How long a local LoRA job on this data runs."""

    n_examples: int
    n_epochs: int
    epochs_auto: bool
    batch_size: int
    packing: bool
    max_seq_length: int
    steps_per_epoch: int
    steps: int
    tokens: int
    """Tokens processed over all epochs (examples cut to ``max_seq_length``)."""
    tokens_per_second: float
    throughput_assumed: bool
    """True when ``tokens_per_second`` is the default, not a measured figure."""
    gpu_hours: float
    counter: str
    exact: bool


def estimate_openai(
    report_or_stats: TokenStats | _HasStats,
    model: str = DEFAULT_OPENAI_MODEL,
    n_epochs: int | Auto = "auto",
    prices: Mapping[str, float] | None = None,
) -> OpenAIEstimate:
    """Billed tokens and cost; ``prices`` replaces :data:`OPENAI_PRICES_PER_MILLION`."""
    stats = _stats(report_or_stats)
    auto = n_epochs == "auto"
    epochs = epochs_auto(stats.n_examples) if n_epochs == "auto" else n_epochs
    if epochs < 1:
        raise ValueError(f"`n_epochs` must be at least 1, got {epochs}")
    price = lookup(OPENAI_PRICES_PER_MILLION if prices is None else prices, model)
    billed = stats.billed_tokens_per_epoch * epochs
    return OpenAIEstimate(
        model=model,
        n_examples=stats.n_examples,
        n_epochs=epochs,
        epochs_auto=auto,
        billed_tokens_per_epoch=stats.billed_tokens_per_epoch,
        billed_tokens=billed,
        price_per_million=price,
        cost_usd=None if price is None else round(billed * price / 1e6, 6),
        counter=stats.counter,
        exact=stats.exact,
    )


def auto_batch_size(n_examples: int) -> int:
    """The trainer's ``batchSize: auto``: about 0.2% of the examples, clamped to 1..8."""
    return min(8, max(1, round(0.002 * n_examples)))


def estimate_local(
    report_or_stats: TokenStats | _HasStats,
    *,
    n_epochs: int | Auto = "auto",
    batch_size: int | Auto = "auto",
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    packing: bool = True,
    tokens_per_second: float | None = None,
) -> LocalEstimate:
    """Steps and GPU-hours, as the trainer counts them on one GPU: a step takes ``batch_size``
    examples (OpenAI's meaning; ``kubetune.trainer.plan``), packed or padded alike, so packing
    changes the time per step, not the steps. Examples longer than ``max_seq_length`` count
    at that length. ``tokens_per_second`` is per GPU; None uses
    :data:`DEFAULT_TOKENS_PER_SECOND`."""
    stats = _stats(report_or_stats)
    n = stats.n_examples
    epochs = epochs_auto(n) if n_epochs == "auto" else n_epochs
    batch = auto_batch_size(n) if batch_size == "auto" else batch_size
    if epochs < 1 or batch < 1 or max_seq_length < 1:
        raise ValueError("`n_epochs`, `batch_size` and `max_seq_length` must be at least 1")
    tps = DEFAULT_TOKENS_PER_SECOND if tokens_per_second is None else tokens_per_second
    if tps <= 0:
        raise ValueError(f"`tokens_per_second` must be positive, got {tps}")
    # Examples longer than a sequence are cut to it, whatever the file's own limit.
    per_epoch, exact = _tokens_capped(stats, max_seq_length)
    steps_per_epoch = math.ceil(n / batch) if n else 0
    tokens = per_epoch * epochs
    return LocalEstimate(
        n_examples=n,
        n_epochs=epochs,
        epochs_auto=n_epochs == "auto",
        batch_size=batch,
        packing=packing,
        max_seq_length=max_seq_length,
        steps_per_epoch=steps_per_epoch,
        steps=steps_per_epoch * epochs,
        tokens=tokens,
        tokens_per_second=tps,
        throughput_assumed=tokens_per_second is None,
        gpu_hours=round(tokens / tps / 3600, 6),
        counter=stats.counter,
        exact=stats.exact and exact,
    )


def _tokens_capped(stats: TokenStats, cap: int) -> tuple[int, bool]:
    """Σ min(cap, tokens) per epoch, and whether it is exact (not read off the histogram)."""
    exact = stats.tokens_capped(cap)
    if exact is not None:
        return exact, True
    if stats.limit == cap:
        return stats.billed_tokens_per_epoch, True
    # Stats built without their per-length counts (by hand, or decoded from an older report):
    # only the histogram is left. Every example in a bucket that starts above the cap loses at
    # least (start - cap) tokens, so this bound never exceeds the uncut total; it is not exact.
    cut = sum(b.count * (b.lo - cap) for b in stats.histogram if b.lo > cap)
    return stats.total_tokens - cut, False
