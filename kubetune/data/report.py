"""The dataset doctor's report: the record validators return, and its text and JSON forms.

:class:`Report` is plain data (msgspec), so the operator can log it and the CLI can print it as
JSON without a custom encoder. :func:`render_text` is what ``kubetune validate`` shows: a
table of problems, a histogram of token lengths, the estimate. Nothing here reads files.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from kubetune.data.estimate import LocalEstimate, OpenAIEstimate
from kubetune.data.problems import WARNINGS, Code, Problem
from kubetune.data.schema import Format
from kubetune.data.stats import TokenStats

Provider = Literal["openai", "local"]

MAX_KEPT_PER_CODE = 1000
"""Problems listed per code; beyond it they are counted (``counts``) but not listed."""


class Report(msgspec.Struct, kw_only=True):
    """Everything the validator found in one dataset."""

    source: str
    """The file path, or a label for text given directly."""
    provider: Provider
    format: Format | None
    """``chat`` or ``prompt-completion`` (from the first example); None when none was read."""
    n_lines: int
    n_examples: int
    """Lines that hold an example (every non-blank line), valid or not."""
    n_valid: int
    """Examples without errors."""
    errors: list[Problem]
    warnings: list[Problem]
    counts: dict[str, int]
    """Every problem found, by code, including those past :data:`MAX_KEPT_PER_CODE`."""
    not_listed: int
    """Problems counted in ``counts`` but not listed in ``errors``/``warnings``."""
    stats: TokenStats | None = None
    """Token statistics when a counter was given, else None."""
    notes: list[str] = msgspec.field(default_factory=list)
    """What was not checked and why (e.g. no tokenizer, so no length check)."""

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not any(n for code, n in self.counts.items() if Code(code) not in WARNINGS)

    @property
    def n_errors(self) -> int:
        return sum(n for code, n in self.counts.items() if Code(code) not in WARNINGS)

    @property
    def n_warnings(self) -> int:
        return sum(n for code, n in self.counts.items() if Code(code) in WARNINGS)

    def to_builtins(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok}
        out.update(msgspec.to_builtins(self))
        if out.get("stats"):
            del out["stats"]["lengths"]  # the estimate's input; the histogram shows its shape
        return out

    def to_json(self) -> str:
        return msgspec.json.encode(self.to_builtins()).decode()


Estimate = OpenAIEstimate | LocalEstimate


def _n(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}"


def _problem_rows(problems: list[Problem], limit: int) -> list[str]:
    rows = []
    for p in problems[:limit]:
        line = str(p.line) if p.line is not None else "-"
        idx = str(p.message_index) if p.message_index is not None else "-"
        rows.append(f"  {line:>7}  {idx:>3}  {p.severity:<7}  {p.code:<20}  {p.message}")
    return rows


def render_text(report: Report, estimate: Estimate | None = None, *, max_rows: int = 50) -> str:
    """The human-readable report (plain text, no colour)."""
    out = [f"kubetune validate: {report.source} (provider {report.provider})"]
    fmt = report.format or "no examples"
    out.append(
        f"  {_n(report.n_lines)} lines, {_n(report.n_examples)} examples ({fmt}), "
        f"{_n(report.n_valid)} valid; {_n(report.n_errors)} errors, "
        f"{_n(report.n_warnings)} warnings"
    )
    problems = sorted(
        [*report.errors, *report.warnings],
        key=lambda p: (p.line or 0, p.message_index if p.message_index is not None else -1),
    )
    if problems:
        out += ["", "Problems", f"  {'LINE':>7}  {'MSG':>3}  {'LEVEL':<7}  {'CODE':<20}  MESSAGE"]
        out += _problem_rows(problems, max_rows)
        hidden = len(problems) - min(len(problems), max_rows) + report.not_listed
        if hidden:
            out.append(f"  ... {hidden:,} more (--json lists up to {MAX_KEPT_PER_CODE} per code)")
        by_code = ", ".join(f"{c} {n:,}" for c, n in sorted(report.counts.items()))
        out.append(f"  by code: {by_code}")
    if report.stats is not None:
        out += ["", *_render_stats(report.stats)]
    if estimate is not None:
        out += ["", *_render_estimate(estimate)]
    if report.notes:
        out += ["", *(f"note: {n}" for n in report.notes)]
    out.append("")
    if report.ok:
        warn = f" ({report.n_warnings:,} warnings)" if report.n_warnings else ""
        out.append(f"OK: no errors{warn}")
    else:
        out.append(f"FAILED: {report.n_errors:,} errors")
    return "\n".join(out) + "\n"


def _render_stats(s: TokenStats) -> list[str]:
    kind = "exact" if s.exact else "NOT EXACT"
    limit = f"limit {s.limit:,}" if s.limit is not None else "no known limit"
    out = [
        f"Tokens per example ({s.counter}; {kind}; {limit})",
        f"  examples {s.n_examples:,}  total {s.total_tokens:,}  trained (assistant) "
        f"{s.trained_tokens:,}",
        f"  min {s.min:,}  median {s.median:,}  p95 {s.p95:,}  max {s.max:,}  mean {s.mean:,}"
        + (f"  over limit {s.n_over_limit:,}" if s.limit is not None else ""),
    ]
    peak = max((b.count for b in s.histogram), default=0)
    width = len(f"{s.max:,}")
    for b in s.histogram:
        bar = "#" * (round(30 * b.count / peak) if peak else 0)
        if b.count and not bar:
            bar = "."
        over = "  > limit" if s.limit is not None and b.hi > s.limit else ""
        out.append(f"  {b.lo:>{width},} .. {b.hi:>{width},} | {bar:<30} {b.count:,}{over}")
    return out


def _render_estimate(e: Estimate) -> list[str]:
    approx = "" if e.exact else " (from APPROXIMATE token counts)"
    if isinstance(e, OpenAIEstimate):
        how = f"auto for {e.n_examples:,} examples" if e.epochs_auto else "set"
        out = [
            f"Estimate: OpenAI {e.model}{approx}",
            f"  epochs {e.n_epochs} ({how})",
            f"  billed tokens {e.billed_tokens:,} = {e.billed_tokens_per_epoch:,} x {e.n_epochs}",
        ]
        if e.cost_usd is None:
            out.append(f"  cost: no price known for {e.model}; pass --price-per-1m")
        else:
            cost = f"{e.cost_usd:,.2f}" if e.cost_usd >= 1 else f"{e.cost_usd:.4f}"
            out.append(f"  cost ${cost} at ${e.price_per_million:,.2f} per 1M tokens")
        return out
    how = f"auto for {e.n_examples:,} examples" if e.epochs_auto else "set"
    packing = "packed" if e.packing else "padded"
    rate = f"{e.tokens_per_second:,.0f} tokens/s per GPU" + (
        " (assumed; set --tokens-per-second)" if e.throughput_assumed else ""
    )
    return [
        f"Estimate: local LoRA job{approx}",
        f"  epochs {e.n_epochs} ({how}), {e.batch_size} example{'' if e.batch_size == 1 else 's'}"
        f" per step, {packing}, examples cut at {e.max_seq_length:,} tokens",
        f"  steps {e.steps:,} = {e.steps_per_epoch:,} x {e.n_epochs}",
        f"  tokens {e.tokens:,}  at {rate}: {_hours(e.gpu_hours)}",
    ]


def _hours(gpu_hours: float) -> str:
    if gpu_hours >= 1:
        return f"{gpu_hours:,.1f} GPU-hours"
    return f"{gpu_hours:.3g} GPU-hours ({gpu_hours * 60:.2g} GPU-minutes)"
