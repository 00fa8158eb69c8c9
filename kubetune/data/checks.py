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
import re
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


_UTF8_BOM = b"\xef\xbb\xbf"


class _NotJSON(ValueError):
    """Something Python's json accepts and JSON (and msgspec) does not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"`{name}` is not a JSON number (JSON has no NaN or Infinity)")


def _refuse_huge(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJSON(f"the number {text} is out of range (larger than a 64-bit float)")
    return value


def _not_json_message(raw: bytes, exc: msgspec.DecodeError) -> str:
    """The clearest sentence for a line msgspec refused: Python's json names the column; for
    what Python accepts and JSON does not, say what it is; else msgspec's own message."""
    text = raw.rstrip(b"\r\n")
    if text.startswith(_UTF8_BOM):
        return "the line starts with a UTF-8 byte-order mark (files joined with `cat`?); remove it"
    try:
        json.loads(text, parse_constant=_refuse_constant, parse_float=_refuse_huge)
    except _NotJSON as py_exc:
        return f"not valid JSON: {py_exc}"
    except json.JSONDecodeError as py_exc:  # its message names the column, msgspec's the byte
        return f"not valid JSON: {py_exc.msg} at column {py_exc.colno}"
    except ValueError as py_exc:
        return f"not valid JSON: {py_exc}"
    if _LONE_SURROGATE.search(text):
        return "not valid JSON text: a \\uXXXX escape is not valid Unicode (a lone surrogate)"
    return f"not valid JSON: {exc}"


_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F]"
)
"""A high surrogate escape not followed by a low one, or a low one on its own (approximate:
only used to pick a message)."""


def check_line(
    raw: bytes, line: int, *, provider: str, method: schema.Method = "supervised"
) -> LineResult:
    """All problems of one raw line (without its line break handling concerns).

    ``method="dpo"`` reads the line as a preference pair (:data:`schema.DPO_TOP_KEYS`).
    """
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
    except msgspec.DecodeError as exc:
        out.add(Code.NOT_JSON, _not_json_message(raw, exc))
        return LineResult(problems=out.problems)
    if not isinstance(obj, dict):
        out.add(Code.NOT_OBJECT, f"the line is {_type_name(obj)}, not a JSON object")
        return LineResult(problems=out.problems)

    if method == "dpo":
        if not _dpo_shaped(obj, out):
            return LineResult(problems=out.problems)
        fmt: schema.Format = "dpo"
        _check_dpo(obj, out)
        known = schema.DPO_TOP_KEYS
    elif "messages" in obj:
        fmt = "chat"
        _check_chat(obj, out)
        known = schema.CHAT_TOP_KEYS
    elif "prompt" in obj or "completion" in obj:
        fmt = "prompt-completion"
        _check_prompt_completion(obj, out, provider)
        known = schema.PROMPT_COMPLETION_KEYS
    else:
        keys = ", ".join(f"`{k}`" for k in sorted(obj)) or "no keys"
        hint = (
            "; it looks like a preference (DPO) example: validate with method dpo"
            if "preferred_output" in obj or "non_preferred_output" in obj
            else ""
        )
        out.add(
            Code.MESSAGES_MISSING,
            f"no `messages` list (nor `prompt`/`completion`); the object has {keys}{hint}",
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
    if fmt == "dpo":
        clean["input"] = {k: v for k, v in obj["input"].items() if k in schema.CHAT_TOP_KEYS}
    target: type[schema.FastLine] = _TARGETS[fmt]
    try:
        value = msgspec.convert(clean, target)
    except msgspec.ValidationError as exc:  # the checks above and the types disagree: say so
        out.add(Code.FIELD_TYPE, f"rejected by the schema: {exc}")
        return LineResult(problems=out.problems, format=fmt)
    return LineResult(problems=out.problems, value=value, format=fmt)


_TARGETS: dict[str, type[schema.FastLine]] = {
    "chat": schema._FChat,
    "prompt-completion": schema._FPromptCompletion,
    "dpo": schema._FDpo,
}


def _dpo_shaped(obj: dict[str, Any], out: _Line) -> bool:
    """Whether the line is meant as a preference pair; if not, one problem that says so."""
    if schema.DPO_TOP_KEYS & set(obj):
        return True
    if "messages" in obj or "prompt" in obj or "completion" in obj:
        what = "chat" if "messages" in obj else "prompt/completion"
        out.add(
            Code.FORMAT_NOT_DPO,
            f"{what} example: method dpo needs preference pairs, "
            '{"input": {"messages": [...]}, "preferred_output": [...], '
            '"non_preferred_output": [...]}',
        )
    else:
        keys = ", ".join(f"`{k}`" for k in sorted(obj)) or "no keys"
        out.add(
            Code.MESSAGES_MISSING,
            f"no `input` (nor `preferred_output`/`non_preferred_output`); the object has {keys}",
        )
    return False


def _check_dpo(obj: dict[str, Any], out: _Line) -> None:
    """A preference pair: the prompt as chat in ``input``, one assistant reply in each output."""
    prompt = obj.get("input")
    if prompt is None:
        out.add(Code.MESSAGES_MISSING, "`input` is missing (it holds the prompt's `messages`)")
    elif not isinstance(prompt, dict):
        out.add(Code.FIELD_TYPE, f"`input` must be an object, got {_type_name(prompt)}")
    elif "messages" not in prompt:
        out.add(Code.MESSAGES_MISSING, "`input` has no `messages` list")
    else:
        _check_chat(prompt, out, field="input.", needs_assistant=False)
        extra = sorted(set(prompt) - schema.CHAT_TOP_KEYS)
        if extra:
            names = ", ".join(f"`input.{k}`" for k in extra)
            out.add(Code.UNKNOWN_TOP_KEY, f"unknown key(s) {names}; ignored")
    replies = [_check_output(obj, key, out) for key in schema.DPO_OUTPUTS]
    if replies[0] is not None and replies[0] == replies[1]:
        out.add(Code.OUTPUT_INVALID, "the preferred and non-preferred outputs are the same")


def _check_output(obj: dict[str, Any], key: str, out: _Line) -> str | None:
    """One output: a list of exactly one assistant message with text; its text, or None."""
    if key not in obj:
        out.add(Code.OUTPUT_INVALID, f"`{key}` is missing (a list with one assistant message)")
        return None
    value = obj[key]
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} items" if isinstance(value, list) else _type_name(value)
        out.add(Code.OUTPUT_INVALID, f"`{key}` must be a list of one assistant message, got {got}")
        return None
    m = value[0]
    where = f"{key}[0]"
    if not isinstance(m, dict):
        out.add(Code.MESSAGE_NOT_OBJECT, f"`{where}` is {_type_name(m)}, not an object")
        return None
    if m.get("role") != "assistant":
        out.add(
            Code.OUTPUT_INVALID,
            f"`{where}` must be an assistant message, got role {m.get('role')!r}",
        )
        return None
    extra = sorted(set(m) - {"role", "content", "name"})
    if extra:
        names = ", ".join(f"`{k}`" for k in extra)
        out.add(Code.UNKNOWN_KEY, f"`{where}` has unknown key(s) {names} (DPO outputs are text)")
    content = m.get("content")
    if content is None:
        out.add(
            Code.CONTENT_MISSING, f"`{where}.content` is {'null' if 'content' in m else 'missing'}"
        )
    elif not isinstance(content, str):
        out.add(
            Code.CONTENT_NOT_STRING,
            f"`{where}.content` must be a string, got {_type_name(content)}",
        )
    elif not content.strip():
        out.add(
            Code.CONTENT_EMPTY,
            f"`{where}.content` is {'empty' if not content else 'only whitespace'}",
        )
    else:
        return content
    return None


def _check_chat(
    obj: dict[str, Any], out: _Line, field: str = "", *, needs_assistant: bool = True
) -> None:
    for key in ("tools", "functions"):
        if key in obj and not isinstance(obj[key], list):
            got = _type_name(obj[key])
            out.add(Code.FIELD_TYPE, f"`{field}{key}` must be a list, got {got}")
    ptc = obj.get("parallel_tool_calls")
    if "parallel_tool_calls" in obj and not isinstance(ptc, bool):
        out.add(Code.FIELD_TYPE, f"`{field}parallel_tool_calls` must be true or false, got {ptc!r}")
    messages = obj["messages"]
    if not isinstance(messages, list):
        got = _type_name(messages)
        out.add(Code.MESSAGES_NOT_LIST, f"`{field}messages` must be a list, got {got}")
    elif not messages:
        out.add(Code.MESSAGES_EMPTY, f"`{field}messages` is an empty list")
    else:
        check_messages(messages, out, needs_assistant=needs_assistant)


_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "tool_calls": ((list,), "a list"),
    "function_call": ((dict,), "an object"),
    "tool_call_id": ((str,), "a string"),
    "refusal": ((str, type(None)), "a string or null"),
}


def check_messages(messages: list[Any], out: _Line, *, needs_assistant: bool = True) -> None:
    """Per-message rules, then the example-wide ones (assistant present, system first).

    ``needs_assistant=False`` for a DPO prompt, whose replies come in its outputs."""
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
    if not needs_assistant:
        return
    if not assistants:
        out.add(Code.NO_ASSISTANT, "no assistant message: the example teaches nothing")
    elif not trained:
        out.add(Code.ALL_WEIGHT_ZERO, "every assistant message has `weight: 0`: nothing to learn")


def _check_content(m: dict[str, Any], role: str | None, i: int, out: _Line) -> None:
    content = m.get("content")
    if content is None:
        # An empty list or object says nothing, as a missing one does.
        calls = role == "assistant" and bool(m.get("tool_calls") or m.get("function_call"))
        if not calls:
            what = "null" if "content" in m else "missing"
            empty = [k for k in ("tool_calls", "function_call") if k in m and not m[k]]
            and_empty = f" and `{empty[0]}` is empty" if role == "assistant" and empty else ""
            out.add(Code.CONTENT_MISSING, f"`content` is {what}{and_empty}", i)
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
