"""The streaming validator: reads a JSONL dataset once, line by line, and builds a Report.

Each line is first decoded by msgspec into the typed schema (:mod:`kubetune.data.schema`); a
clean line costs one C-level decode, a few attribute checks and a 64-bit digest for the
duplicate table. A line that does not decode cleanly goes to :mod:`kubetune.data.checks`,
which lists all of its problems. File-wide rules live here: BOM and UTF-16 sniffing, one
format per file, duplicates, the provider's minimum, token lengths (in batches, when a counter
is given).

Memory does not grow with the number of lines: one line and one counting batch at a time, the
duplicate table (at most :data:`kubetune.data.dedupe.BYTES_AT_CEILING`), at most
:data:`~kubetune.data.report.MAX_KEPT_PER_CODE` listed problems per code (the rest counted),
and one counter per distinct token length.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from kubetune.data import checks, schema
from kubetune.data.dedupe import DigestTable
from kubetune.data.problems import Code, Problem
from kubetune.data.report import MAX_KEPT_PER_CODE, Provider, Report
from kubetune.data.stats import StatsAccumulator
from kubetune.data.tokens import TokenCounter

MIN_EXAMPLES: dict[str, int] = {"openai": 10, "local": 1}
"""Fewest examples each provider accepts (OpenAI refuses fewer than 10)."""

COUNT_BATCH = 256
"""Examples handed to the token counter at once (fast tokenizers batch in native code), or
fewer: a batch also ends once its lines hold :data:`COUNT_BATCH_BYTES`."""

COUNT_BATCH_BYTES = 4 << 20
"""Bytes of JSONL lines queued for counting at once: 256 long examples (OpenAI allows 64k
tokens each) would otherwise hold a few hundred MB of parsed messages at a time."""

PROGRESS_EVERY = 1 << 16
"""Lines between two progress callbacks."""

Progress = Callable[[int, int], None]
"""Called with (lines read, bytes read; 0 when unknown) every :data:`PROGRESS_EVERY` lines."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_BAD_FAST = (msgspec.DecodeError, UnicodeDecodeError)  # ValidationError is a DecodeError


class InvalidExample(ValueError):
    """:func:`read_examples` met a line with errors; ``problems`` lists them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = problems[0]
        super().__init__(f"line {first.line}: {first.message} [{first.code}]")


class _Validator:
    def __init__(
        self,
        source: str,
        provider: Provider,
        max_tokens: int | None,
        counter: TokenCounter | None,
        method: schema.Method = "supervised",
    ) -> None:
        if method not in ("supervised", "dpo"):
            raise ValueError(f"`method` must be supervised or dpo, got {method!r}")
        self.source = source
        self.provider = provider
        self.method = method
        self.counter = counter
        self.limit = max_tokens if max_tokens is not None else (counter.limit if counter else None)
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self.not_listed = 0
        self.n_lines = 0
        self.n_examples = 0
        self.n_valid = 0
        self.format: schema.Format | None = None
        self.seen = DigestTable()
        self.batch: list[schema.Example] = []
        self.batch_bytes = 0
        self.stats = StatsAccumulator(self.limit) if counter else None
        self.notes: list[str] = []
        self.unreadable = False
        """The file as a whole cannot be read (UTF-16): no per-example rules apply."""

    # -- problems ------------------------------------------------------------------------------

    def add(self, p: Problem) -> None:
        n = self.counts[p.code] = self.counts[p.code] + 1
        if n > MAX_KEPT_PER_CODE:
            self.not_listed += 1
        elif p.is_error:
            self.errors.append(p)
        else:
            self.warnings.append(p)

    def file_problem(self, code: Code, message: str) -> None:
        self.add(Problem(code=code, message=message))

    # -- lines ---------------------------------------------------------------------------------

    def run(
        self, lines: Iterable[bytes], progress: Progress | None, tell: Callable[[], int]
    ) -> None:
        decode = schema.chat_decoder.decode
        digest = schema.digest
        clean = schema.fast_chat_is_clean
        seen = self.seen.add
        counting = self.counter is not None
        dpo = self.method == "dpo"
        lineno = 0
        for raw in lines:
            lineno += 1
            if lineno == 1:
                if raw.startswith(_UTF16_BOMS):
                    self.file_problem(
                        Code.NOT_UTF8, "the file is UTF-16 (byte-order mark); re-save as UTF-8"
                    )
                    self.n_lines = 1
                    self.unreadable = True
                    return
                if raw.startswith(_UTF8_BOM):
                    self.add(
                        Problem(
                            code=Code.BOM,
                            line=1,
                            message="the file starts with a UTF-8 byte-order mark; ignored",
                        )
                    )
                    raw = raw[len(_UTF8_BOM) :]
            if progress is not None and not lineno % PROGRESS_EVERY:
                progress(lineno, tell())
            if dpo:  # preference pairs have no fast path: one check per line
                self.slow(raw, lineno)
                continue
            try:
                value = decode(raw)
            except _BAD_FAST:
                self.slow(raw, lineno)
                continue
            if not clean(value) or self.format == "prompt-completion":
                self.slow(raw, lineno)
                continue
            # what accept() does, inlined: this is the path of nearly every line
            self.format = "chat"
            self.n_examples += 1
            self.n_valid += 1
            first = seen(digest(value), lineno)
            if first:
                self.duplicate(lineno, first)
            if counting:
                self.batch.append(schema.to_example(value, lineno))
                self.batch_bytes += len(raw)
                if len(self.batch) >= COUNT_BATCH or self.batch_bytes >= COUNT_BATCH_BYTES:
                    self.flush()
        self.n_lines = lineno

    def slow(self, raw: bytes, lineno: int) -> None:
        value: schema.FastLine | None = None
        fmt: schema.Format | None = None
        try:  # prompt/completion files have a fast path of their own
            pc = schema.prompt_completion_decoder.decode(raw)
            if (
                schema.fast_prompt_completion_is_clean(pc)
                and self.provider != "openai"
                and self.method == "supervised"
            ):
                value, fmt = pc, "prompt-completion"
        except _BAD_FAST:
            pass
        problems: list[Problem] = []
        if value is None:
            result = checks.check_line(raw, lineno, provider=self.provider, method=self.method)
            if result.blank:
                self.add(result.problems[0])
                return
            value, fmt, problems = result.value, result.format, result.problems
        self.n_examples += 1
        if fmt is not None:
            if self.format is None:
                self.format = fmt
            elif fmt != self.format:
                problems.append(
                    Problem(
                        code=Code.MIXED_FORMAT,
                        line=lineno,
                        message=f"{fmt} example in a {self.format} file (from its first example)",
                    )
                )
                value = None
        for p in problems:
            self.add(p)
        if value is not None and not any(p.is_error for p in problems):
            self.accept(value, lineno, len(raw))

    def accept(self, value: schema.FastLine, lineno: int, size: int) -> None:
        """A line without errors (``size`` bytes): count it, check it against earlier ones,
        queue its tokens."""
        self.n_valid += 1
        first = self.seen.add(schema.digest(value), lineno)
        if first:
            self.duplicate(lineno, first)
        if self.counter is not None:
            self.batch.append(schema.to_example(value, lineno))
            self.batch_bytes += size
            if len(self.batch) >= COUNT_BATCH or self.batch_bytes >= COUNT_BATCH_BYTES:
                self.flush()

    def duplicate(self, line: int, first: int) -> None:
        self.add(Problem(code=Code.DUPLICATE, line=line, message=f"same example as line {first}"))

    def flush(self) -> None:
        if not self.batch or self.counter is None or self.stats is None:
            return
        # A DPO pair counts as two conversations: the input with each output.
        sequences: list[schema.Example] = []
        for ex in self.batch:
            sequences.append(ex)
            if ex.non_preferred is not None:
                rejected = (*ex.messages[:-1], ex.non_preferred)
                sequences.append(msgspec.structs.replace(ex, messages=rejected))
        counts = iter(self.counter.count(sequences))
        for ex in self.batch:
            c = next(counts)
            parts = [c]
            if ex.non_preferred is not None:
                parts.append(next(counts))
            error = next((p.error for p in parts if p.error is not None), None)
            if error is not None:
                self.add(Problem(code=Code.TEMPLATE_ERROR, line=ex.line, message=error))
                self.n_valid -= 1
                continue
            lengths = tuple(p.total for p in parts)
            total = sum(lengths)
            self.stats.add(total, sum(p.trained for p in parts), lengths)
            longest = max(lengths)
            if self.limit is not None and longest > self.limit:
                self.n_valid -= 1
                self.add(
                    Problem(
                        code=Code.TOO_LONG,
                        line=ex.line,
                        message=f"{longest:,} tokens; the limit is {self.limit:,}",
                    )
                )
        self.batch.clear()
        self.batch_bytes = 0

    # -- the end -------------------------------------------------------------------------------

    def finish(self) -> Report:
        self.flush()
        minimum = MIN_EXAMPLES[self.provider]
        if self.n_examples < minimum and not self.unreadable:
            self.file_problem(
                Code.TOO_FEW_EXAMPLES,
                f"{self.n_examples} example(s); provider {self.provider} needs at least {minimum}",
            )
        if self.seen.full_at_line:
            self.file_problem(
                Code.DUPLICATES_UNCHECKED,
                f"the duplicate table is full: examples from line {self.seen.full_at_line} on "
                f"were compared with the first {self.seen.size:,} only",
            )
        if self.counter is None:
            self.notes.append(
                "token counting off (no tokenizer): lengths were not checked"
                + (f" against {self.limit:,}" if self.limit is not None else "")
            )
        else:
            note = getattr(self.counter, "note", None)
            if note:
                self.notes.append(str(note))
        if self.counter is not None and self.limit is None:
            self.notes.append("the model's token limit is unknown: lengths were not checked")
        key = _problem_order
        return Report(
            source=self.source,
            provider=self.provider,
            format=self.format,
            n_lines=self.n_lines,
            n_examples=self.n_examples,
            n_valid=self.n_valid,
            errors=sorted(self.errors, key=key),
            warnings=sorted(self.warnings, key=key),
            counts=dict(sorted(self.counts.items())),
            not_listed=self.not_listed,
            stats=(
                self.stats.result(self.counter.name, self.counter.exact)
                if self.stats is not None and self.counter is not None
                else None
            ),
            notes=self.notes,
        )


def _problem_order(p: Problem) -> tuple[int, int]:
    return (p.line or 0, -1 if p.message_index is None else p.message_index)


def _as_bytes(lines: Iterable[bytes | str]) -> Iterator[bytes]:
    for line in lines:
        yield line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line


def validate_lines(
    lines: Iterable[bytes | str],
    *,
    provider: Provider = "local",
    max_tokens: int | None = None,
    counter: TokenCounter | None = None,
    source: str = "<lines>",
    progress: Progress | None = None,
    method: schema.Method = "supervised",
) -> Report:
    """Validate JSONL given as lines (bytes or str, with or without line breaks)."""
    v = _Validator(source, provider, max_tokens, counter, method)
    v.run(_as_bytes(lines), progress, lambda: 0)
    return v.finish()


def validate_text(
    text: str | bytes,
    *,
    provider: Provider = "local",
    max_tokens: int | None = None,
    counter: TokenCounter | None = None,
    source: str = "<text>",
    method: schema.Method = "supervised",
) -> Report:
    """Validate a whole JSONL document held in memory (e.g. a ConfigMap value)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    v = _Validator(source, provider, max_tokens, counter, method)
    v.run(io.BytesIO(data), None, lambda: 0)
    return v.finish()


def validate_file(
    path: str | os.PathLike[str],
    *,
    provider: Provider = "local",
    max_tokens: int | None = None,
    counter: TokenCounter | None = None,
    progress: Progress | None = None,
    method: schema.Method = "supervised",
    source: str | None = None,
) -> Report:
    """Validate a JSONL file, streaming it; see :class:`~kubetune.data.report.Report`.

    ``method="dpo"`` reads preference pairs (OpenAI's DPO lines) instead of chat;
    ``source`` labels the report (default: the path)."""
    v = _Validator(str(path) if source is None else source, provider, max_tokens, counter, method)
    with Path(path).open("rb") as f:
        v.run(f, progress, f.tell)
    return v.finish()


def read_examples(path: str | os.PathLike[str] | IO[bytes]) -> Iterator[schema.Example]:
    """The examples of a file, normalised to chat, for training.

    Blank lines are skipped; a line with an error raises :class:`InvalidExample` (validate the
    file first to see all of them). Duplicates are kept: whether to drop them is the caller's
    call, and :func:`validate_file` warns about them.
    """
    if isinstance(path, str | os.PathLike):
        with Path(path).open("rb") as f:
            yield from _read(f)
    else:
        yield from _read(path)


def _read(f: Iterable[bytes]) -> Iterator[schema.Example]:
    fmt: schema.Format | None = None
    for lineno, line in enumerate(f, 1):
        raw = line[len(_UTF8_BOM) :] if lineno == 1 and line.startswith(_UTF8_BOM) else line
        try:  # the common case: a clean chat line, decoded in one pass
            value = schema.chat_decoder.decode(raw)
            if schema.fast_chat_is_clean(value) and fmt in (None, "chat"):
                fmt = "chat"
                yield schema.to_example(value, lineno)
                continue
        except _BAD_FAST:
            pass
        result = checks.check_line(raw, lineno, provider="local")
        if result.blank:
            continue
        errors = [p for p in result.problems if p.is_error]
        if result.value is not None and fmt is not None and result.format != fmt:
            errors.append(
                Problem(
                    code=Code.MIXED_FORMAT,
                    line=lineno,
                    message=f"{result.format} example in a {fmt} file",
                )
            )
        if errors or result.value is None:
            raise InvalidExample(errors or result.problems)
        fmt = fmt or result.format
        yield schema.to_example(result.value, lineno)
