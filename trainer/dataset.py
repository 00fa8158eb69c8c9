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
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubetune.api.jobconfig import DataFile
from kubetune.data import chat_template
from kubetune.trainer.chat import Conversation, Message

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 50


class DataError(ValueError):
    """The training or validation file is malformed; the message lists every problem found."""

    def __init__(self, path: Path, errors: list[str], total: int | None = None) -> None:
        """``total``: how many errors there are, when ``errors`` lists only some (the report
        keeps at most 1,000 of each kind)."""
        self.path = path
        self.errors = errors
        total = max(total or 0, len(errors))
        shown = errors[:MAX_REPORTED_ERRORS]
        more = total - len(shown)
        lines = [f"{path}: {total:,} error(s) in the data", *shown]
        if more:
            lines.append(f"... and {more:,} more")
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
        raise DataError(path, [_describe(e) for e in report.errors], report.n_errors)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def to_conversation(example: Any, line: int) -> Conversation:
    """One example from :func:`kubetune.data.read_examples` as the trainer's conversation,
    its messages as :func:`kubetune.data.chat_template.template_message` makes them."""
    messages = []
    for m in _field(example, "messages") or []:
        weight = _field(m, "weight")
        rendered = chat_template.template_message(m)
        role, content = rendered.pop("role"), rendered.pop("content")
        messages.append(
            Message(
                role=role,
                content=content,
                weight=1 if weight is None else int(weight),
                extra=tuple(rendered.items()),
            )
        )
    tools = chat_template.template_tools(example)
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
