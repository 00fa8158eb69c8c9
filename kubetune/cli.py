"""The ``kubetune`` command (also installed as ``kubectl-kubetune``, a kubectl plugin).

This module only parses the command line and dispatches. Each subcommand is registered by a
module-level ``register(subparsers)`` that adds its parser and sets
``handler=fn(args, out, err) -> int``; to add one, write that function in its own module and
list the module in :data:`COMMAND_MODULES`. Handlers import what they need inside, so
``kubetune --help`` stays instant. ``validate`` (the dataset doctor) is registered here.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from kubetune.data import Report, TokenCounter

COMMAND_MODULES: tuple[str, ...] = ("kubetune.localrun", "kubetune.chat")
"""Modules whose ``register(subparsers)`` adds more subcommands (run, demo-model, chat)."""

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

PROGRESS_MIN_BYTES = 32 << 20
"""Files at least this large show a progress line (when stderr is a terminal)."""

_OPENAI_PREFIXES = ("gpt-", "ft:", "o1", "o3", "o4", "chatgpt-")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kubetune`` and ``kubectl-kubetune`` console scripts."""
    parser = build_parser(prog=_prog_name())
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(handler(args, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kubetune validate x | head`
        return EXIT_OK


def _prog_name() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "kubetune"
    return "kubectl kubetune" if name.startswith("kubectl-") else "kubetune"


def build_parser(prog: str = "kubetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune LLMs on OpenAI or a Kubernetes GPU pool, and serve them.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    register_validate(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# ------------------------------------------------------------------------------ validate


def register_validate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a fine-tuning dataset and estimate what training it costs",
        description="Check every line of a JSONL dataset (OpenAI chat or prompt/completion), "
        "count tokens with the model's tokenizer, and estimate the job's cost (OpenAI) or "
        "steps and GPU-hours (local). Exits 1 when the file has errors.",
    )
    p.add_argument("file", help="JSONL file, or - for standard input")
    p.add_argument(
        "--model",
        help="OpenAI model (counts with tiktoken) or a local folder / cached Hugging Face id "
        "(counts with its tokenizer and chat template); default: format checks only "
        "(local) or gpt-4o-mini (openai)",
    )
    p.add_argument(
        "--provider",
        choices=("openai", "local"),
        help="rules to apply (default: openai for gpt-*/ft:* models, else local)",
    )
    p.add_argument(
        "--method",
        choices=("supervised", "dpo"),
        default="supervised",
        help="supervised: chat or prompt/completion lines (default); dpo: OpenAI preference "
        "pairs (input, preferred_output, non_preferred_output; provider openai)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--max-tokens", type=_positive_int, help="tokens per example (default: the model's)"
    )
    p.add_argument("--no-tokens", action="store_true", help="skip token counting")
    est = p.add_argument_group("estimate")
    est.add_argument("--epochs", default="auto", help="number or auto (OpenAI's rule; default)")
    est.add_argument(
        "--price-per-1m", type=_price, help="USD per 1M training tokens, 0 or more (openai)"
    )
    est.add_argument("--batch-size", default="auto", help="examples per step, or auto (local)")
    est.add_argument(
        "--max-seq-length",
        type=_positive_int,
        default=2048,
        help="longest example in tokens (local)",
    )
    est.add_argument(
        "--tokens-per-second", type=_positive_float, help="measured training tokens/s per GPU"
    )
    p.set_defaults(handler=validate_command)


# argparse turns the ArgumentTypeError of a `type=` function into "argument --x: message" and
# exit 2, the usage-error code (1 means: the data has errors).


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _finite(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def _positive_float(text: str) -> float:
    x = _finite(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return x


def _price(text: str) -> float:
    x = _finite(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return x


def _int_or_auto(value: str, flag: str) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number or auto, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{flag} must be at least 1, got {n}")
    return n


def _provider(args: argparse.Namespace) -> Literal["openai", "local"]:
    if args.provider:
        return "openai" if args.provider == "openai" else "local"
    model = args.model or ""
    # DPO is an OpenAI method; the local trainer tunes supervised only
    return "openai" if model.startswith(_OPENAI_PREFIXES) or args.method == "dpo" else "local"


class _ProgressLine:
    """``\\r``-updated progress on stderr, at most every 0.2 s."""

    def __init__(self, err: TextIO, size: int) -> None:
        self.err, self.size, self.last = err, size, 0.0

    def __call__(self, lines: int, done: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = f" {100 * done / self.size:3.0f}%" if self.size and done else ""
        self.err.write(f"\rvalidating:{pct} {lines:,} lines")
        self.err.flush()

    def clear(self) -> None:
        if self.last:
            self.err.write("\r\033[K")
            self.err.flush()


def validate_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kubetune import data

    prog = "kubetune validate"
    provider = _provider(args)
    try:
        epochs = _int_or_auto(args.epochs, "--epochs")
        batch = _int_or_auto(args.batch_size, "--batch-size")
        if args.method == "dpo" and provider != "openai":
            raise ValueError(
                "--method dpo is for provider openai (the local trainer is supervised)"
            )
    except ValueError as exc:
        err.write(f"{prog}: {exc}\n")
        return EXIT_USAGE
    counter = None
    if not args.no_tokens:
        try:
            counter = data.counter_for(args.model, provider)
        except data.CounterError as exc:
            err.write(f"{prog}: {exc}\n")
            return EXIT_USAGE

    try:
        report = _validate(args.file, provider, args.max_tokens, counter, err, args.method)
    except OSError as exc:
        err.write(f"{prog}: {args.file}: {exc.strerror or exc}\n")
        return EXIT_USAGE

    estimate: Any = None
    if report.stats is not None and report.stats.n_examples:
        if provider == "openai":
            model = args.model or "gpt-4o-mini"
            prices = None
            if args.price_per_1m is not None:
                prices = {model.removeprefix("ft:"): args.price_per_1m}
            estimate = data.estimate_openai(report, model, epochs, prices)
        else:
            estimate = data.estimate_local(
                report,
                n_epochs=epochs,
                batch_size=batch,
                max_seq_length=args.max_seq_length,
                tokens_per_second=args.tokens_per_second,
            )

    if args.json:
        import msgspec

        doc = report.to_builtins()
        doc["estimate"] = None if estimate is None else msgspec.to_builtins(estimate)
        out.write(msgspec.json.encode(doc).decode() + "\n")
    else:
        out.write(data.render_text(report, estimate))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _validate(
    file: str,
    provider: Literal["openai", "local"],
    max_tokens: int | None,
    counter: TokenCounter | None,
    err: TextIO,
    method: Literal["supervised", "dpo"] = "supervised",
) -> Report:
    from kubetune import data

    if file == "-":
        return data.validate_lines(
            sys.stdin.buffer,
            provider=provider,
            max_tokens=max_tokens,
            counter=counter,
            source="<stdin>",
            method=method,
        )
    size = Path(file).stat().st_size
    progress = _ProgressLine(err, size) if size >= PROGRESS_MIN_BYTES and err.isatty() else None
    try:
        return data.validate_file(
            file,
            provider=provider,
            max_tokens=max_tokens,
            counter=counter,
            progress=progress,
            method=method,
        )
    finally:
        if progress is not None:
            progress.clear()
