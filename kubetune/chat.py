"""``kubetune chat``: one chat completion against a kubetune endpoint, with the ``openai`` client.

The endpoint is a URL (a cluster endpoint through ``kubectl port-forward``, or any
OpenAI-compatible server) or a local run served by ``kubetune run --local`` (``--local-run
NAME`` reads the run's ``endpoint.json``). For a local run the conversation starts with the
system prompt of the run's training data, so a training question gets the answer the adapter
learned. The helpers here are shared with ``kubetune run --once`` and ``make demo``.
The ``openai`` import happens inside the functions, so ``kubetune --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

Message = dict[str, str]

TEMPERATURE = 0.0
"""Greedy decoding: the same question always gets the same answer (smoke tests, demos)."""
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]
    expected: str | None
    """The training answer when the question is one of the training examples."""


def load_examples(path: Path) -> list[list[Message]]:
    """The ``messages`` of every chat example in a JSONL file (other lines are skipped)."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        messages = record.get("messages") if isinstance(record, dict) else None
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            examples.append(
                [
                    {"role": str(m.get("role")), "content": str(m.get("content") or "")}
                    for m in messages
                ]
            )
    return examples


def conversation_for(prompt: str, examples: Sequence[list[Message]]) -> Conversation:
    """The messages to send for ``prompt``, as the training data frames it.

    A prompt that is a training example's last user turn gets that example's earlier turns
    (its system prompt) and its answer as ``expected``; any other prompt gets the most common
    system prompt of the data, if there is one.
    """
    for messages in examples:
        if (
            len(messages) >= 2
            and messages[-1]["role"] == "assistant"
            and messages[-2]["role"] == "user"
            and messages[-2]["content"] == prompt
        ):
            return Conversation(list(messages[:-1]), messages[-1]["content"])
    systems = Counter(
        m[0]["content"] for m in examples if m and m[0]["role"] == "system"
    ).most_common(1)
    head = [{"role": "system", "content": systems[0][0]}] if systems else []
    return Conversation([*head, {"role": "user", "content": prompt}], None)


def first_prompt(examples: Sequence[list[Message]]) -> str | None:
    """The user question of the first training example (the default smoke question)."""
    for messages in examples:
        if len(messages) >= 2 and messages[-2]["role"] == "user":
            return messages[-2]["content"]
    return None


def complete(
    base_url: str,
    model: str,
    messages: Sequence[Message],
    *,
    api_key: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout: float = 120.0,
) -> str:
    """One chat completion at temperature 0; the answer's text."""
    from openai import OpenAI

    client = OpenAI(
        base_url=base_url,
        api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        timeout=timeout,
        max_retries=1,
    )
    with client:
        r = client.chat.completions.create(
            model=model,
            messages=list(messages),  # type: ignore[arg-type]
            temperature=TEMPERATURE,
            max_tokens=max_tokens,
        )
    return (r.choices[0].message.content or "").strip()


def served_models(base_url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    """``GET /v1/models``: what the server serves (adapters carry their ``parent``)."""
    from openai import OpenAI

    client = OpenAI(
        base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    )
    with client:
        return [m.model_dump() for m in client.models.list()]


def normalize_base_url(url: str) -> str:
    """``http://host:port`` gets vLLM's ``/v1``; a URL with a path is kept as given."""
    url = url.rstrip("/")
    _, _, rest = url.partition("://")
    return url if "/" in rest else f"{url}/v1"


# ------------------------------------------------------------------------------ rendering


def printable(text: str) -> str:
    """``text`` safe for a column: control, format and combining characters become ``·``.

    A random base model emits any token, including tabs, byte fragments and combining marks,
    which would shift the column after them.
    """
    return "".join(
        c if c == "\n" or unicodedata.category(c)[0] not in "CMZ" or c == " " else "·" for c in text
    )


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` display columns (CJK characters count two)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        if all(display_width(c) == 1 for c in paragraph):
            lines += textwrap.wrap(paragraph, width) or [""]
            continue
        line = ""
        for c in paragraph:
            if display_width(line + c) > width:
                lines.append(line)
                line = ""
            line += c
        lines.append(line)
    return lines


def side_by_side(
    rows: Sequence[tuple[str, str, str]],
    headers: tuple[str, str],
    width: int,
    max_lines: int = 6,
) -> str:
    """Question headings, then two columns (e.g. base model | tuned adapter) per question.

    Each answer is cut to ``max_lines`` lines (ending in ``…``): a babbling base model must
    not push the tuned answer off the screen.
    """
    col = max(16, (width - 3) // 2)

    def pad(s: str) -> str:
        return s + " " * (col - display_width(s))

    def cell(text: str) -> list[str]:
        lines = wrap(printable(text), col)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            last = lines[-1]
            while last and display_width(last) > col - 1:
                last = last[:-1]
            lines[-1] = last + "…"
        return lines

    out = []
    for question, left, right in rows:
        out.append(f"Q: {question}")
        out.append(f"{pad(headers[0])} │ {headers[1]}")
        out.append(f"{'─' * col}─┼─{'─' * col}")
        a, b = cell(left), cell(right)
        for i in range(max(len(a), len(b))):
            la = a[i] if i < len(a) else ""
            lb = b[i] if i < len(b) else ""
            out.append(f"{pad(la)} │ {lb}".rstrip())
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ the command


def register(subparsers: Any) -> None:
    """Adds ``kubetune chat`` to the CLI's subparsers (the CLI calls ``args.handler``)."""
    p = subparsers.add_parser(
        "chat",
        help="send one chat message to an endpoint or a local run and print the answer",
        description="Send one chat completion (temperature 0) with the openai client and print "
        "the answer. Works against a local run (`kubetune run --local`) or any "
        "OpenAI-compatible endpoint, e.g. a cluster endpoint through `kubectl port-forward`.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", metavar="URL", help="base URL, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--local-run", metavar="NAME", help="a run served by `kubetune run --local`")
    p.add_argument("--model", help="model to ask (default: the run's adapter, or the only adapter)")
    p.add_argument("--system", help="system prompt (default for --local-run: the training data's)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY, or none)")
    p.add_argument("--state-dir", type=Path, default=Path(".kubetune"), help="default: .kubetune")
    p.add_argument("prompt", help="the user message")
    p.set_defaults(handler=chat_command)


def chat_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import openai

    examples: list[list[Message]] = []
    if args.local_run:
        endpoint = args.state_dir / "runs" / args.local_run / "endpoint.json"
        try:
            served = json.loads(endpoint.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            err.write(
                f"kubetune chat: run `{args.local_run}` is not being served (no {endpoint}); "
                "start it with `kubetune run MANIFEST --local`\n"
            )
            return 1
        base_url, model = served["baseURL"], args.model or served["model"]
        if served.get("dataset"):
            examples = load_examples(Path(served["dataset"]))
    else:
        base_url, model = normalize_base_url(args.endpoint), args.model
    try:
        if model is None:
            model = _only_adapter(served_models(base_url, args.api_key))
        if args.system is not None:
            messages = [
                {"role": "system", "content": args.system},
                {"role": "user", "content": args.prompt},
            ]
        else:
            messages = conversation_for(args.prompt, examples).messages
        answer = complete(
            base_url, model, messages, api_key=args.api_key, max_tokens=args.max_tokens
        )
    except openai.APIConnectionError:
        err.write(f"kubetune chat: cannot connect to {base_url}\n")
        return 1
    except (openai.APIStatusError, LookupError) as e:
        err.write(f"kubetune chat: {e}\n")
        return 1
    out.write(answer + "\n")
    return 0


def _only_adapter(models: list[dict[str, Any]]) -> str:
    """The one adapter the server serves (or its one model); LookupError otherwise."""
    adapters = [m["id"] for m in models if m.get("parent")]
    if len(adapters) == 1:
        return str(adapters[0])
    if not adapters and len(models) == 1:
        return str(models[0]["id"])
    names = ", ".join(str(m["id"]) for m in models) or "nothing"
    raise LookupError(f"the server serves {names}; choose one with --model")
