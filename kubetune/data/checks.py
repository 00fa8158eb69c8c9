"""The thorough line checker: every problem of one line, on the generic JSON value.

:mod:`kubetune.data.validate` sends here only the lines that the fast typed decoders of
:mod:`kubetune.data.schema` refused, so this code is written for completeness and clear
messages, not speed. It reports every problem of the line (not just the first) and, when the
line has no error, hands back the same typed value the fast path would have produced, so both
paths feed duplicates and token counting alike. It keeps no state between lines; file-wide rules
(format mixing, duplicates, minimum count) belong to the validator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kubetune.data import schema
from kubetune.data.problems import Code, Problem


@dataclass
class LineResult:
    """What one line held: its problems and, when it has no error, its typed value."""

    problems: list[Problem] = field(default_factory=list)
    value: schema.FastLine | None = None
    format: schema.Format | None = None
    """The format the line's keys announce, even when the line has errors."""
    blank: bool = False


class _Line:
    """Collects the problems of one line with its line number filled in."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.problems: list[Problem] = []

    def add(self, code: Code, message: str, index: int | None = None) -> None:
        self.problems.append(
            Problem(code=code, message=message, line=self.line, message_index=index)
        )

    @property
    def has_error(self) -> bool:
        return any(p.is_error for p in self.problems)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _not_json_message(raw: bytes) -> str:
    try:
        json.loads(raw.rstrip(b"\r\n"))
    except json.JSONDecodeError as py_exc:  # its message names the column, msgspec's the byte
        return f"not valid JSON: {py_exc.msg} at column {py_exc.colno}"
    except ValueError as py_exc:
        return f"not valid JSON: {py_exc}"
    # Python's json accepts it, msgspec does not: a \ud800-style escape (a lone surrogate).
    return "not valid JSON text: a \\uXXXX escape is not valid Unicode (a lone surrogate)"


def check_line(raw: bytes, line: int, *, provider: str) -> LineResult:
    """All problems of one raw line (without its line break handling concerns)."""
    out = _Line(line)
    if not raw.strip():
        out.add(Code.BLANK_LINE, "empty line; ignored")
        return LineResult(problems=out.problems, blank=True)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        out.add(Code.NOT_UTF8, f"byte 0x{bad} at offset {exc.start} is not UTF-8; re-save as UTF-8")
        return LineResult(problems=out.problems)
    if b"\x00" in raw:
        out.add(Code.NOT_UTF8, "the line has NUL bytes: is the file UTF-16? re-save as UTF-8")
        return LineResult(problems=out.problems)
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        out.add(Code.NOT_JSON, _not_json_message(raw))
        return LineResult(problems=out.problems)
    if not isinstance(obj, dict):
        out.add(Code.NOT_OBJECT, f"the line is {_type_name(obj)}, not a JSON object")
        return LineResult(problems=out.problems)

    if "messages" in obj:
        fmt: schema.Format = "chat"
        _check_chat(obj, out)
        known = schema.CHAT_TOP_KEYS
    elif "prompt" in obj or "completion" in obj:
        fmt = "prompt-completion"
        _check_prompt_completion(obj, out, provider)
        known = schema.PROMPT_COMPLETION_KEYS
    else:
        keys = ", ".join(f"`{k}`" for k in sorted(obj)) or "no keys"
        out.add(
            Code.MESSAGES_MISSING,
            f"no `messages` list (nor `prompt`/`completion`); the object has {keys}",
        )
        return LineResult(problems=out.problems)
    extra = sorted(set(obj) - known)
    if extra:
        out.add(
            Code.UNKNOWN_TOP_KEY,
            "unknown top-level key(s) " + ", ".join(f"`{k}`" for k in extra) + "; ignored",
        )
    if out.has_error:
        return LineResult(problems=out.problems, format=fmt)
    clean = {k: v for k, v in obj.items() if k in known}
    target: type[schema.FastLine] = schema._FChat if fmt == "chat" else schema._FPromptCompletion
    try:
        value = msgspec.convert(clean, target)
    except msgspec.ValidationError as exc:  # the checks above and the types disagree: say so
        out.add(Code.FIELD_TYPE, f"rejected by the schema: {exc}")
        return LineResult(problems=out.problems, format=fmt)
    return LineResult(problems=out.problems, value=value, format=fmt)


def _check_chat(obj: dict[str, Any], out: _Line) -> None:
    for key in ("tools", "functions"):
        if key in obj and not isinstance(obj[key], list):
            out.add(Code.FIELD_TYPE, f"`{key}` must be a list, got {_type_name(obj[key])}")
    ptc = obj.get("parallel_tool_calls")
    if "parallel_tool_calls" in obj and not isinstance(ptc, bool):
        out.add(Code.FIELD_TYPE, f"`parallel_tool_calls` must be true or false, got {ptc!r}")
    messages = obj["messages"]
    if not isinstance(messages, list):
        out.add(Code.MESSAGES_NOT_LIST, f"`messages` must be a list, got {_type_name(messages)}")
    elif not messages:
        out.add(Code.MESSAGES_EMPTY, "`messages` is an empty list")
    else:
        check_messages(messages, out)


_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "tool_calls": ((list,), "a list"),
    "function_call": ((dict,), "an object"),
    "tool_call_id": ((str,), "a string"),
    "refusal": ((str, type(None)), "a string or null"),
}


def check_messages(messages: list[Any], out: _Line) -> None:
    """Per-message rules, then the example-wide ones (assistant present, system first)."""
    assistants = trained = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.add(Code.MESSAGE_NOT_OBJECT, f"message is {_type_name(m)}, not an object", i)
            continue
        role = m.get("role")
        if "role" not in m:
            out.add(Code.ROLE_MISSING, "message has no `role`", i)
        elif not isinstance(role, str) or role not in schema.MESSAGE_KEYS:
            hint = "; use `system`" if role == "developer" else ""
            allowed = ", ".join(schema.ROLES)
            out.add(Code.ROLE_UNKNOWN, f"unknown role {role!r} (allowed: {allowed}){hint}", i)
            role = None
        else:
            extra = sorted(set(m) - schema.MESSAGE_KEYS[role])
            if extra:
                names = ", ".join(f"`{k}`" for k in extra)
                hint = " (`weight` belongs on assistant messages)" if "weight" in extra else ""
                out.add(Code.UNKNOWN_KEY, f"{role} message has unknown key(s) {names}{hint}", i)
            for key, (types, what) in _FIELD_TYPES.items():
                if key in m and key in schema.MESSAGE_KEYS[role] and not isinstance(m[key], types):
                    got = _type_name(m[key])
                    out.add(Code.FIELD_TYPE, f"`{key}` must be {what}, got {got}", i)
        _check_content(m, role, i, out)
        if role == "system" and i > 0:
            out.add(Code.SYSTEM_NOT_FIRST, f"system message at position {i}; it must be first", i)
        if role == "assistant":
            assistants += 1
            weight = m.get("weight", 1)
            if "weight" in m and (type(weight) is not int or weight not in (0, 1)):
                out.add(Code.WEIGHT_INVALID, f"`weight` must be 0 or 1, got {weight!r}", i)
                trained += 1  # reported already; do not also claim nothing is trained
            elif weight == 1:
                trained += 1
    if not assistants:
        out.add(Code.NO_ASSISTANT, "no assistant message: the example teaches nothing")
    elif not trained:
        out.add(Code.ALL_WEIGHT_ZERO, "every assistant message has `weight: 0`: nothing to learn")


def _check_content(m: dict[str, Any], role: str | None, i: int, out: _Line) -> None:
    content = m.get("content")
    if content is None:
        calls = role == "assistant" and ("tool_calls" in m or "function_call" in m)
        if not calls:
            what = "null" if "content" in m else "missing"
            out.add(Code.CONTENT_MISSING, f"`content` is {what}", i)
    elif not isinstance(content, str):
        hint = (
            "; content parts are not supported, write one string"
            if isinstance(content, list)
            else ""
        )
        out.add(
            Code.CONTENT_NOT_STRING,
            f"`content` must be a string, got {_type_name(content)}{hint}",
            i,
        )
    elif not content.strip():
        what = "empty" if not content else "only whitespace"
        out.add(Code.CONTENT_EMPTY, f"`content` is {what}", i)


def _check_prompt_completion(obj: dict[str, Any], out: _Line, provider: str) -> None:
    if provider == "openai":
        out.add(
            Code.FORMAT_NOT_CHAT,
            "prompt/completion example: OpenAI fine-tunes chat models on "
            '{"messages": [...]} only (provider local accepts both)',
        )
    for i, key in enumerate(("prompt", "completion")):
        value = obj.get(key)
        if value is None:
            what = "null" if key in obj else "missing"
            out.add(Code.CONTENT_MISSING, f"`{key}` is {what}", i)
        elif not isinstance(value, str):
            got = _type_name(value)
            out.add(Code.CONTENT_NOT_STRING, f"`{key}` must be a string, got {got}", i)
        elif not value.strip():
            out.add(Code.CONTENT_EMPTY, f"`{key}` is empty", i)
