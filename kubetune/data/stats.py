"""Token-length statistics of a dataset, gathered in memory bounded by the longest example.

The accumulator keeps a count per distinct length (at most as many entries as the longest
example has tokens), so quantiles are exact without holding one number per example.
"""

from __future__ import annotations

import math
from collections import Counter

import msgspec

HISTOGRAM_BUCKETS = 10


class Bucket(msgspec.Struct, frozen=True):
    """Examples whose token count lies in ``lo..hi`` (inclusive)."""

    lo: int
    hi: int
    count: int


class TokenStats(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts over the valid examples of a file."""

    counter: str
    """Which counter produced the numbers (tokenizer and template, tiktoken encoding, or an
    approximation: then ``exact`` is false)."""
    exact: bool
    limit: int | None
    """Tokens per example the model takes; None when unknown (then nothing is over it)."""
    n_examples: int
    total_tokens: int
    trained_tokens: int
    """Tokens of trained assistant messages: the ones that carry loss."""
    min: int
    median: int
    p95: int
    max: int
    mean: float
    n_over_limit: int
    billed_tokens_per_epoch: int
    """Σ min(limit, tokens): what one epoch costs where over-long examples are truncated."""
    histogram: list[Bucket]
    lengths: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """``(tokens, examples)`` for each distinct length, shortest first: the exact distribution,
    from which :meth:`tokens_capped` sums any cut. At most as many pairs as the longest example
    has tokens; :meth:`kubetune.data.Report.to_builtins` leaves it out of the printed report."""

    def tokens_capped(self, cap: int) -> int | None:
        """Σ min(cap, tokens) over the examples; None when :attr:`lengths` was not kept."""
        if self.max <= cap:
            return self.total_tokens
        if not self.lengths and self.n_examples:
            return None
        return sum(min(cap, length) * count for length, count in self.lengths)


class StatsAccumulator:
    """Add (total, trained) per example; :meth:`result` gives :class:`TokenStats`."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.lengths: Counter[int] = Counter()
        self.n = 0
        self.total = 0
        self.trained = 0
        self.over = 0
        self.billed = 0

    def add(self, total: int, trained: int, parts: tuple[int, ...] | None = None) -> None:
        """One example; ``parts`` are the lengths of the sequences it trains as, when it is
        more than one (a DPO pair: input + each output), each held to the limit on its own."""
        self.lengths[total] += 1
        self.n += 1
        self.total += total
        self.trained += trained
        limit = self.limit
        if limit is None:
            self.billed += total
            return
        if any(p > limit for p in parts or (total,)):
            self.over += 1
        self.billed += sum(min(limit, p) for p in parts or (total,))

    def _quantile(self, ordered: list[tuple[int, int]], q: float) -> int:
        rank = max(1, math.ceil(q * self.n))  # nearest-rank definition
        seen = 0
        for length, count in ordered:
            seen += count
            if seen >= rank:
                return length
        return ordered[-1][0]

    def result(self, counter: str, exact: bool) -> TokenStats:
        ordered = sorted(self.lengths.items())
        if not ordered:
            lo = hi = med = p95 = 0
        else:
            lo, hi = ordered[0][0], ordered[-1][0]
            med, p95 = self._quantile(ordered, 0.5), self._quantile(ordered, 0.95)
        return TokenStats(
            counter=counter,
            exact=exact,
            limit=self.limit,
            n_examples=self.n,
            total_tokens=self.total,
            trained_tokens=self.trained,
            min=lo,
            median=med,
            p95=p95,
            max=hi,
            mean=round(self.total / self.n, 1) if self.n else 0.0,
            n_over_limit=self.over,
            billed_tokens_per_epoch=self.billed,
            histogram=_histogram(ordered),
            lengths=ordered,
        )


def _histogram(ordered: list[tuple[int, int]]) -> list[Bucket]:
    if not ordered:
        return []
    lo, hi = ordered[0][0], ordered[-1][0]
    width = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BUCKETS))
    counts = [0] * math.ceil((hi - lo + 1) / width)
    for length, count in ordered:
        counts[(length - lo) // width] += count
    return [
        Bucket(lo=lo + k * width, hi=min(hi, lo + (k + 1) * width - 1), count=c)
        for k, c in enumerate(counts)
    ]
