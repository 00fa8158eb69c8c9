"""The dataset doctor: reads, checks, counts and prices fine-tuning datasets.

One validator for the CLI (``kubetune validate``), the operator (before any upload or pod) and
the trainer (before loading a model). It reads OpenAI chat JSONL (``{"messages": [...]}``,
with ``tools``/``functions``/``parallel_tool_calls``), prompt/completion JSONL and, with
``method="dpo"``, OpenAI's preference pairs (``input``, ``preferred_output``,
``non_preferred_output``), streams any
number of lines in constant memory, and reports every problem with a stable code
(:class:`Code`), its line and, where it applies, the message index. Importing this package is
cheap and pulls in neither transformers nor tiktoken (the operator imports it).

Public API (stable; other components call these names):

``validate_file(path, *, provider="local", max_tokens=None, counter=None, progress=None,
method="supervised", source=None) -> Report``
    Check a JSONL file. ``provider`` sets the rules that differ (OpenAI: at least 10 examples,
    chat format only). ``method`` (:data:`Method`) is ``supervised`` (chat or prompt/completion
    lines) or ``dpo`` (preference pairs; each counts as two conversations, the input with each
    output, and the length limit applies to each). ``counter`` adds token statistics and the
    length check against ``max_tokens`` (default: the counter's known limit).
``validate_text(text, ...)`` / ``validate_lines(lines, ...) -> Report``
    The same on a document in memory (a ConfigMap value) or on an iterable of lines.
``Report``
    ``.ok`` (no errors), ``.errors`` / ``.warnings`` (lists of :class:`Problem` with ``.code``,
    ``.line``, ``.message_index``, ``.message``), ``.counts`` (all problems by code, also those
    past the listing cap), ``.n_examples``, ``.n_valid``, ``.stats`` (:class:`TokenStats` or
    None), ``.to_json()``; :func:`render_text` prints it.
``read_examples(path) -> Iterator[Example]``
    Valid examples normalised to chat (:class:`Example` of :class:`Message` with ``weight``;
    ``Message.trained`` says whether the loss covers it); raises :class:`InvalidExample`.
``TokenCounter``, ``counter_for(model, provider)``, ``hf_counter(model)``, ``openai_counter(model)``
    Token counting: a Hugging Face tokenizer with its chat template, or tiktoken (with a
    labelled approximation when no encoding file can be had).
``epochs_auto(n_examples) -> int``, ``estimate_openai(report_or_stats, model, n_epochs="auto",
prices=None) -> OpenAIEstimate``, ``estimate_local(report_or_stats, *, n_epochs="auto",
batch_size="auto", max_seq_length=2048, packing=True, tokens_per_second=None) -> LocalEstimate``
    What the job costs: OpenAI billed tokens and dollars, local steps and GPU-hours.
"""

from __future__ import annotations

from kubetune.data.estimate import (
    OPENAI_PRICES_PER_MILLION,
    LocalEstimate,
    OpenAIEstimate,
    epochs_auto,
    estimate_local,
    estimate_openai,
)
from kubetune.data.problems import Code, Problem
from kubetune.data.report import Provider, Report, render_text
from kubetune.data.schema import Example, Message, Method
from kubetune.data.stats import TokenStats
from kubetune.data.tokens import (
    CounterError,
    TokenCount,
    TokenCounter,
    counter_for,
    hf_counter,
    openai_counter,
)
from kubetune.data.validate import (
    MIN_EXAMPLES,
    InvalidExample,
    read_examples,
    validate_file,
    validate_lines,
    validate_text,
)

__all__ = [
    "MIN_EXAMPLES",
    "OPENAI_PRICES_PER_MILLION",
    "Code",
    "CounterError",
    "Example",
    "InvalidExample",
    "LocalEstimate",
    "Message",
    "Method",
    "OpenAIEstimate",
    "Problem",
    "Provider",
    "Report",
    "TokenCount",
    "TokenCounter",
    "TokenStats",
    "counter_for",
    "epochs_auto",
    "estimate_local",
    "estimate_openai",
    "hf_counter",
    "openai_counter",
    "read_examples",
    "render_text",
    "validate_file",
    "validate_lines",
    "validate_text",
]
