"""Training files → validated conversations, before any model is loaded.

The shared validator (:mod:`kubetune.data`) checks the file first — the same checks the
operator ran when the job was submitted — and any error stops the run with one line per
problem, each naming its line number (:class:`DataError`). Only then are the examples read,
through the same module, into the trainer's :class:`~kubetune.trainer.chat.Conversation`.
A dataset given by URL is downloaded into the output folder first, so the file that is hashed
into ``result.json`` is the file that was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubetune.api.jobconfig import DataFile
from kubetune.trainer.chat import Conversation, Message

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 50


class DataError(ValueError):
    """The training or validation file is malformed; the message lists every problem found."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        lines = [f"{path}: {len(errors)} error(s) in the data", *shown]
        if more:
            lines.append(f"... and {more} more")
        super().__init__("\n".join(lines))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def localize(source: DataFile, folder: Path, name: str) -> Path:
    """The file to read: ``path`` as is, or ``url`` downloaded once into ``folder/name``."""
    if source.path is not None:
        return Path(source.path)
    assert source.url is not None
    target = folder / name
    if target.exists():
        return target
    import httpx

    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    log.info("downloading %s", source.url)
    with httpx.stream("GET", source.url, follow_redirects=True, timeout=60.0) as response:
        response.raise_for_status()
        with tmp.open("wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
    tmp.replace(target)
    return target


def _describe(issue: Any) -> str:
    line = getattr(issue, "line", None)
    code = getattr(issue, "code", None)
    message = getattr(issue, "message", str(issue))
    where = f"line {line}" if line else "file"
    return f"{where}: {message}" + (f" [{code}]" if code else "")


def validate(path: Path) -> None:
    """Run the shared validator; raise :class:`DataError` listing every error."""
    from kubetune import data

    if not path.exists():
        raise DataError(path, [f"file: {path} does not exist"])
    report = data.validate_file(path, provider="local")
    for warning in getattr(report, "warnings", []):
        log.warning("%s: %s", path, _describe(warning))
    if not report.ok:
        raise DataError(path, [_describe(e) for e in report.errors])


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


EXTRA_KEYS = ("name", "tool_calls", "function_call", "tool_call_id")


def _arguments_as_object(arguments: Any) -> Any:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}  # as vLLM renders a call without arguments
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def parse_tool_call_arguments(tool_calls: Any) -> Any:
    """``tool_calls`` with each ``function.arguments`` JSON string parsed into an object.

    OpenAI's format carries the arguments as a JSON string; vLLM parses it into a dict before
    rendering the chat template, and templates write it with ``tojson``. Left a string, it would
    be trained double-encoded. A string that is not a JSON object is kept as it is.
    """
    if not isinstance(tool_calls, list):
        return tool_calls
    parsed = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping) and "arguments" in function:
            arguments = _arguments_as_object(function["arguments"])
            call = {**call, "function": {**function, "arguments": arguments}}
        parsed.append(call)
    return parsed


def to_conversation(example: Any, line: int) -> Conversation:
    """One example from :func:`kubetune.data.read_examples` as the trainer's conversation."""
    messages = []
    for m in _field(example, "messages") or []:
        weight = _field(m, "weight")
        extra = tuple(
            (k, parse_tool_call_arguments(v) if k == "tool_calls" else v)
            for k in EXTRA_KEYS
            if (v := _field(m, k)) is not None
        )
        messages.append(
            Message(
                role=str(_field(m, "role")),
                content=str(_field(m, "content") or ""),
                weight=1 if weight is None else int(weight),
                extra=extra,
            )
        )
    tools = _field(example, "tools")
    return Conversation(
        messages=tuple(messages),
        line=int(_field(example, "line") or line),
        tools=tuple(tools) if tools else None,
    )


def read_conversations(path: Path) -> list[Conversation]:
    """Validate ``path`` and read all of its examples."""
    from kubetune import data

    validate(path)
    examples: Iterable[Any] = data.read_examples(path)
    return [to_conversation(example, i) for i, example in enumerate(examples, 1)]
