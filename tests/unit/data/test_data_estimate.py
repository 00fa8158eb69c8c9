"""Estimates: OpenAI's auto epochs rule, price lookup, local steps and GPU-hours by hand."""

from __future__ import annotations

import msgspec
import pytest

from kubetune import data
from kubetune.data import estimate, tokens
from kubetune.data.stats import StatsAccumulator, TokenStats


@pytest.mark.parametrize(
    ("n", "epochs"),
    [(1, 25), (4, 25), (5, 20), (10, 10), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2),
     (12_500, 2), (12_501, 1), (50_000, 1)],
)  # fmt: skip
def test_epochs_auto(n: int, epochs: int) -> None:
    assert data.epochs_auto(n) == epochs


@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("gpt-4o-mini", 3.00),
        ("gpt-4o-mini-2024-07-18", 3.00),
        ("gpt-4o-2024-08-06", 25.00),
        ("ft:gpt-4.1-mini-2025-04-14:acme::x1", 5.00),
        ("gpt-4.1-2025-04-14", None),
    ],
)
def test_price_lookup_by_longest_prefix(model: str, price: float | None) -> None:
    assert estimate.lookup(data.OPENAI_PRICES_PER_MILLION, model) == price


def stats_of(lengths: list[int], limit: int | None = None) -> TokenStats:
    acc = StatsAccumulator(limit)
    for n in lengths:
        acc.add(n, n // 2)
    return acc.result("test", True)


def test_price_table_can_be_overridden() -> None:
    s = stats_of([1000] * 10)
    est = data.estimate_openai(s, "my-model", 3, prices={"my-": 10.0})
    assert est.billed_tokens == 30_000 and est.cost_usd == pytest.approx(0.3)
    assert data.estimate_openai(s, "my-model", 3).cost_usd is None


def test_local_steps_and_gpu_hours_by_hand() -> None:
    s = stats_of([500] * 1000 + [3000] * 10, limit=2048)
    est = data.estimate_local(s, tokens_per_second=1000.0, max_seq_length=2048)
    # 1010 examples: auto epochs 3, auto batch round(2.02) = 2
    assert (est.n_epochs, est.batch_size) == (3, 2)
    per_epoch = 1000 * 500 + 10 * 2048  # examples longer than a sequence are cut to it
    assert est.tokens == per_epoch * 3
    # batch = examples per step, as the trainer counts (kubetune.trainer.plan)
    assert est.steps_per_epoch == 505 and est.steps == 1515
    assert est.gpu_hours == pytest.approx(per_epoch * 3 / 1000 / 3600, rel=1e-5)
    assert not est.throughput_assumed

    unpacked = data.estimate_local(s, n_epochs=1, batch_size=10, packing=False)
    assert unpacked.steps == 101 and unpacked.throughput_assumed
    assert unpacked.tokens_per_second == estimate.DEFAULT_TOKENS_PER_SECOND


def test_estimates_need_token_stats() -> None:
    report = data.validate_text(b"")
    with pytest.raises(ValueError, match="token counter"):
        data.estimate_openai(report)
    with pytest.raises(ValueError, match="at least 1"):
        data.estimate_local(stats_of([10]), n_epochs=0)


def test_cutting_examples_lowers_the_local_estimate_exactly() -> None:
    # 999 short examples and one of 1,821 tokens, cut at 512: Σ min(512, tokens), not bucket
    # midpoints (which once gave 113,898 and called it exact).
    s = stats_of([24] * 999 + [1821])
    est = data.estimate_local(s, n_epochs=1, max_seq_length=512)
    assert est.tokens == 999 * 24 + 512 and est.exact
    uncut = data.estimate_local(s, n_epochs=1, max_seq_length=2048)
    assert uncut.tokens == s.total_tokens == 999 * 24 + 1821
    assert est.tokens < uncut.tokens


def test_stats_without_their_lengths_give_an_estimate_marked_not_exact() -> None:
    s = stats_of([24] * 999 + [1821])
    bare = msgspec.structs.replace(s, lengths=[])
    est = data.estimate_local(bare, n_epochs=1, max_seq_length=512)
    assert not est.exact and 999 * 24 + 512 <= est.tokens < s.total_tokens


def test_the_printed_report_leaves_the_length_table_out() -> None:
    line = '{"messages": [{"role":"user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    counter = tokens.OpenAIChatCounter(tokens.approx_lengths, name="~", exact=False, limit=None)
    report = data.validate_text(line + "\n", counter=counter)
    assert report.stats is not None and report.stats.lengths
    assert "lengths" not in report.to_builtins()["stats"]
