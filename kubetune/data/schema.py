"""The shapes of a training example: the public records and the fast typed decoders.

:class:`Example` and :class:`Message` are what callers get (the trainer reads them through
:func:`kubetune.data.read_examples`). The private ``_F*`` structs mirror OpenAI's fine-tuning
line schema (supervised chat: per-role message types, ``tools``, ``functions``,
``parallel_tool_calls``; legacy prompt/completion; and the preference pairs of ``method: dpo``)
so that msgspec can accept a clean line in one C-level pass; a line they refuse goes to
:mod:`kubetune.data.checks`, which finds out why. The rules here and there must agree: a line
these structs accept has no problems there (a unit test holds them to it). This module decides
nothing about errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "function")
"""Roles of OpenAI's fine-tuning chat format (``developer`` is not among them)."""

MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset(
        {"role", "content", "name", "weight", "tool_calls", "function_call", "refusal"}
    ),
    "tool": frozenset({"role", "content", "tool_call_id"}),
    "function": frozenset({"role", "content", "name"}),
}
"""Keys each role may carry; anything else is :attr:`Code.UNKNOWN_KEY`."""

CHAT_TOP_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls"})
PROMPT_COMPLETION_KEYS = frozenset({"prompt", "completion"})
DPO_TOP_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
"""OpenAI's preference (DPO) line: ``input`` holds the chat keys, each output one assistant
message (https://platform.openai.com/docs/guides/direct-preference-optimization)."""
DPO_OUTPUTS = ("preferred_output", "non_preferred_output")

Format = Literal["chat", "prompt-completion", "dpo"]
Method = Literal["supervised", "dpo"]
"""OpenAI's fine-tuning methods: supervised reads chat (or prompt/completion) lines, dpo reads
preference pairs."""


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One chat message of a valid example."""

    role: str
    """One of :data:`ROLES`."""
    content: str | None = None
    """The text; None only for an assistant message that carries tool or function calls."""
    weight: int | None = None
    """0 or 1 on assistant messages (None means 1: trained); None on other roles."""
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_call_id: str | None = None

    @property
    def trained(self) -> bool:
        """Whether the loss covers this message: an assistant message without ``weight: 0``."""
        return self.role == "assistant" and self.weight != 0


class Example(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One valid line, normalised to chat: prompt/completion becomes user + assistant."""

    messages: tuple[Message, ...]
    line: int
    """1-based line number in the source."""
    format: Format = "chat"
    """What the line was written as."""
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    non_preferred: Message | None = None
    """DPO only: the rejected reply. ``messages`` then holds the input and, last, the preferred
    reply."""


# --- fast typed decoders (private) ------------------------------------------------------------

_Text = Annotated[str, Meta(min_length=1)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Unknown keys are refused; frozen, so a decoded line is hashable (see :func:`digest`)."""


class _FSystem(_Strict, tag_field="role", tag="system", frozen=True):
    content: _Text
    name: str | UnsetType = UNSET


class _FUser(_Strict, tag_field="role", tag="user", frozen=True):
    content: _Text
    name: str | UnsetType = UNSET


class _FAssistant(_Strict, tag_field="role", tag="assistant", frozen=True):
    content: _Text | UnsetType | None = UNSET
    name: str | UnsetType = UNSET
    weight: Literal[0, 1] | UnsetType = UNSET
    tool_calls: list[Any] | UnsetType = UNSET
    function_call: dict[str, Any] | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET


class _FTool(_Strict, tag_field="role", tag="tool", frozen=True):
    content: _Text
    tool_call_id: str | UnsetType = UNSET


class _FFunction(_Strict, tag_field="role", tag="function", frozen=True):
    content: _Text
    name: str | UnsetType = UNSET


_FMessage = _FSystem | _FUser | _FAssistant | _FTool | _FFunction


class _FChat(_Strict, frozen=True):
    messages: tuple[_FMessage, ...]
    tools: list[Any] | UnsetType = UNSET
    functions: list[Any] | UnsetType = UNSET
    parallel_tool_calls: bool | UnsetType = UNSET


class _FPromptCompletion(_Strict, frozen=True):
    prompt: _Text
    completion: _Text


class _FDpo(_Strict, frozen=True):
    input: _FChat
    preferred_output: tuple[_FAssistant]
    non_preferred_output: tuple[_FAssistant]


FastLine = _FChat | _FPromptCompletion | _FDpo

chat_decoder: msgspec.json.Decoder[_FChat] = msgspec.json.Decoder(_FChat)
prompt_completion_decoder: msgspec.json.Decoder[_FPromptCompletion] = msgspec.json.Decoder(
    _FPromptCompletion
)
canonical_encoder = msgspec.json.Encoder(order="sorted")
"""Encodes a fast struct canonically (keys sorted, also inside free-form tool data; no spaces)."""


def digest(value: FastLine) -> int:
    """64-bit digest of an example for the duplicate check, blind to key order and spacing.

    The structs are frozen, so msgspec hashes their fields (and type) in C; an example holding
    lists (tool calls, tool definitions) is not hashable and is digested by its canonical JSON,
    whose object keys are sorted at every depth.
    """
    try:
        return hash(value)
    except TypeError:
        return hash(canonical_encoder.encode(value))


def fast_chat_is_clean(chat: _FChat) -> bool:
    """The semantic rules the types cannot state; mirrors :func:`checks.check_messages`.

    ``type(x) is`` rather than ``isinstance``: this runs once per message of every line (and
    the messages are typed ``Any`` here because mypy cannot narrow on a saved ``type()``).
    """
    trained = False
    first = True
    messages: tuple[Any, ...] = chat.messages
    for m in messages:
        cls = type(m)
        if cls is _FAssistant:
            c = m.content
            if type(c) is str:
                if c.isspace():
                    return False
            elif not m.tool_calls and not m.function_call:  # unset, [] or {}: nothing to say
                return False
            if m.weight != 0:
                trained = True
        elif m.content.isspace() or (cls is _FSystem and not first):
            return False
        first = False
    return trained


def fast_prompt_completion_is_clean(pc: _FPromptCompletion) -> bool:
    return not pc.prompt.isspace() and not pc.completion.isspace()


def _unset_none(value: Any) -> Any:
    return None if value is UNSET else value


def _assistant(m: _FAssistant) -> Message:
    return Message(
        role="assistant",
        content=_unset_none(m.content),
        name=_unset_none(m.name),
        weight=_unset_none(m.weight),
        tool_calls=_unset_none(m.tool_calls),
        function_call=_unset_none(m.function_call),
    )


def to_example(fast: FastLine, line: int) -> Example:
    """The public record of a line that passed the checks."""
    if isinstance(fast, _FDpo):
        prompt = to_example(fast.input, line)
        return Example(
            messages=(*prompt.messages, _assistant(fast.preferred_output[0])),
            line=line,
            format="dpo",
            tools=prompt.tools,
            functions=prompt.functions,
            parallel_tool_calls=prompt.parallel_tool_calls,
            non_preferred=_assistant(fast.non_preferred_output[0]),
        )
    if isinstance(fast, _FPromptCompletion):
        return Example(
            messages=(
                Message(role="user", content=fast.prompt),
                Message(role="assistant", content=fast.completion),
            ),
            line=line,
            format="prompt-completion",
        )
    messages = []
    for m in fast.messages:
        if isinstance(m, _FAssistant):
            messages.append(_assistant(m))
        elif isinstance(m, _FTool):
            messages.append(
                Message(role="tool", content=m.content, tool_call_id=_unset_none(m.tool_call_id))
            )
        else:
            role = "system" if isinstance(m, _FSystem) else "user"
            if isinstance(m, _FFunction):
                role = "function"
            messages.append(Message(role=role, content=m.content, name=_unset_none(m.name)))
    return Example(
        messages=tuple(messages),
        line=line,
        tools=_unset_none(fast.tools),
        functions=_unset_none(fast.functions),
        parallel_tool_calls=_unset_none(fast.parallel_tool_calls),
    )
