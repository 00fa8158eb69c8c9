"""Problem codes of the dataset doctor and the record that reports one.

Every check in :mod:`kubetune.data` reports through a :class:`Code` listed here, never with a
free-form string, so the CLI, the operator and the trainer can match on codes and the tests can
assert one code per bad line. A code has one severity: an error stops a job, a warning does not.
This module holds no checking logic.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

Severity = Literal["error", "warning"]


class Code(enum.StrEnum):
    """Stable identifiers of dataset problems (shown in reports, matched by callers)."""

    # file and line level
    NOT_UTF8 = "not-utf8"
    BOM = "bom"
    BLANK_LINE = "blank-line"
    NOT_JSON = "not-json"
    NOT_OBJECT = "not-object"
    # example level
    MESSAGES_MISSING = "messages-missing"
    MESSAGES_NOT_LIST = "messages-not-list"
    MESSAGES_EMPTY = "messages-empty"
    UNKNOWN_TOP_KEY = "unknown-top-key"
    MIXED_FORMAT = "mixed-format"
    FORMAT_NOT_CHAT = "format-not-chat"
    FORMAT_NOT_DPO = "format-not-dpo"
    OUTPUT_INVALID = "output-invalid"
    NO_ASSISTANT = "no-assistant"
    ALL_WEIGHT_ZERO = "all-weight-zero"
    SYSTEM_NOT_FIRST = "system-not-first"
    TOO_LONG = "too-long"
    TEMPLATE_ERROR = "template-error"
    DUPLICATE = "duplicate"
    DUPLICATES_UNCHECKED = "duplicates-unchecked"
    # message level
    MESSAGE_NOT_OBJECT = "message-not-object"
    ROLE_MISSING = "role-missing"
    ROLE_UNKNOWN = "role-unknown"
    UNKNOWN_KEY = "unknown-key"
    CONTENT_MISSING = "content-missing"
    CONTENT_EMPTY = "content-empty"
    CONTENT_NOT_STRING = "content-not-string"
    WEIGHT_INVALID = "weight-invalid"
    FIELD_TYPE = "field-type"
    # whole file
    TOO_FEW_EXAMPLES = "too-few-examples"


WARNINGS: frozenset[Code] = frozenset(
    {
        Code.BOM,
        Code.BLANK_LINE,
        Code.UNKNOWN_TOP_KEY,
        Code.DUPLICATE,
        Code.DUPLICATES_UNCHECKED,
    }
)
"""Codes that do not stop a job; every other code is an error."""

DESCRIPTIONS: dict[Code, str] = {
    Code.NOT_UTF8: "the file or a line is not UTF-8 text",
    Code.BOM: "the file starts with a UTF-8 byte-order mark (ignored)",
    Code.BLANK_LINE: "an empty line (ignored)",
    Code.NOT_JSON: "the line is not valid JSON",
    Code.NOT_OBJECT: "the line is JSON but not an object",
    Code.MESSAGES_MISSING: "no `messages` (chat) nor `prompt`/`completion` keys",
    Code.MESSAGES_NOT_LIST: "`messages` is not a list",
    Code.MESSAGES_EMPTY: "`messages` is an empty list",
    Code.UNKNOWN_TOP_KEY: "a top-level key that is neither chat nor tool data (ignored)",
    Code.MIXED_FORMAT: "chat and prompt/completion examples in one file",
    Code.FORMAT_NOT_CHAT: "prompt/completion example for a provider that takes chat only",
    Code.FORMAT_NOT_DPO: "a chat or prompt/completion example where `method: dpo` needs "
    "preference pairs",
    Code.OUTPUT_INVALID: "`preferred_output` / `non_preferred_output` is missing, not one "
    "assistant message, or both are the same",
    Code.NO_ASSISTANT: "no assistant message, so nothing to learn",
    Code.ALL_WEIGHT_ZERO: "every assistant message has `weight: 0`, so nothing to learn",
    Code.SYSTEM_NOT_FIRST: "a system message that is not the first message",
    Code.TOO_LONG: "the example has more tokens than the model's limit",
    Code.TEMPLATE_ERROR: "the model's chat template refuses the example",
    Code.DUPLICATE: "the example repeats an earlier one",
    Code.DUPLICATES_UNCHECKED: "the file has more examples than the duplicate check holds",
    Code.MESSAGE_NOT_OBJECT: "a message is not a JSON object",
    Code.ROLE_MISSING: "a message has no `role`",
    Code.ROLE_UNKNOWN: "a role other than system, user, assistant, tool, function",
    Code.UNKNOWN_KEY: "a message has a key its role does not allow",
    Code.CONTENT_MISSING: "a message has no `content` (or null, without tool calls)",
    Code.CONTENT_EMPTY: "a message's `content` is empty or only whitespace",
    Code.CONTENT_NOT_STRING: "a message's `content` is not a string",
    Code.WEIGHT_INVALID: "`weight` is not 0 or 1",
    Code.FIELD_TYPE: "a known key has a value of the wrong type",
    Code.TOO_FEW_EXAMPLES: "fewer examples than the provider's minimum",
}


def severity(code: Code) -> Severity:
    """``"warning"`` for codes in :data:`WARNINGS`, else ``"error"``."""
    return "warning" if code in WARNINGS else "error"


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """One finding: what (``code``), where (``line``, ``message_index``) and a sentence."""

    code: Code
    """Stable identifier; see :class:`Code`."""
    message: str
    """A sentence for people, naming the key or value at fault."""
    line: int | None = None
    """1-based line number in the file; None for file-wide problems."""
    message_index: int | None = None
    """0-based index into ``messages`` where the problem is in one message."""

    @property
    def severity(self) -> Severity:
        return severity(self.code)

    @property
    def is_error(self) -> bool:
        return self.code not in WARNINGS
