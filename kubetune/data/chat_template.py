"""The one way a conversation is rendered with a chat template and its trained text found.

The trainer (:mod:`kubetune.trainer.chat`: labels for assistant-only loss) and the dataset
doctor (:class:`kubetune.data.tokens.HFChatCounter`: token counts) both render here, so
``kubetune validate --model`` counts what the trainer trains on and refuses what the trainer
refuses:

- messages reach the template as :func:`template_message` makes them: ``content`` ``""`` when
  a message has none (an assistant turn that only calls tools), each tool call's
  ``function.arguments`` parsed from its JSON string into an object (as vLLM does before it
  renders, and as templates expect when they write it with ``tojson``);
- a tokenizer without a chat template renders with :data:`FALLBACK_TEMPLATE` (ChatML);
- a trained turn's text is found by rendering the conversation up to it twice, with and
  without it (the shorter one ends with the generation prompt); a template whose renderings
  of a prefix are not prefixes of the whole is refused with :class:`TemplateError`, as is a
  template that raises for the conversation;
- a token is trained when its first character lies inside a trained span
  (:func:`trained_mask`), which includes the end-of-turn marker the template writes.

Pure logic over a tokenizer object the caller brings: nothing here imports transformers or
torch (the operator imports :mod:`kubetune.data`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}"
    "{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, used when the tokenizer has no chat template: ``<|im_start|>role\\n...<|im_end|>\\n``.

After an assistant message the tokenizer's EOS token follows ``<|im_end|>`` (unless it *is*
``<|im_end|>``), so a base model that does not know the ChatML markers as special tokens still
learns to end its turn with a token that stops generation. When it is used, the trainer writes
it next to the adapter as ``chat_template.jinja`` with the tokenizer files, so the server
renders prompts the same way.
"""

TEMPLATE_KEYS = ("name", "tool_calls", "function_call", "tool_call_id")
"""Message keys besides ``role`` and ``content`` that reach the template when set."""


class TemplateError(ValueError):
    """The chat template cannot be used for this conversation: it raised, or it does not
    render a prefix of the conversation as a prefix of the whole (so the trained tokens
    cannot be located)."""


class ChatTokenizer(Protocol):
    """What rendering needs from a Hugging Face tokenizer."""

    chat_template: str | None
    eos_token: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def template_for(tokenizer: ChatTokenizer) -> tuple[str, bool]:
    """The template to render with, and whether it is the fallback."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, False
    return FALLBACK_TEMPLATE, True


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


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


def template_extra(message: Any) -> dict[str, Any]:
    """The :data:`TEMPLATE_KEYS` a message (a mapping or an object) sets, ready to render."""
    return {
        key: parse_tool_call_arguments(value) if key == "tool_calls" else value
        for key in TEMPLATE_KEYS
        if (value := _field(message, key)) is not None
    }


def template_message(message: Any) -> dict[str, Any]:
    """A message (a mapping or an object such as :class:`kubetune.data.Message`) as the
    template sees it."""
    return {
        "role": str(_field(message, "role")),
        "content": str(_field(message, "content") or ""),
        **template_extra(message),
    }


def template_tools(example: Any) -> list[Any] | None:
    """The tool definitions rendered with an example (``tools``; none when empty)."""
    tools = _field(example, "tools")
    return list(tools) if tools else None


def render(
    tokenizer: ChatTokenizer,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    generation: bool,
    tools: Sequence[Any] | None = None,
) -> str:
    """The conversation as the template writes it; :class:`TemplateError` if it raises."""
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation,
            tools=list(tools) if tools else None,
        )
    except Exception as exc:  # jinja raises (raise_exception, a None + str) for what it refuses
        raise TemplateError(f"the chat template refused it: {exc}") from exc
    if not isinstance(text, str):  # pragma: no cover - tokenize=False always gives text
        raise TypeError(f"chat template rendered {type(text).__name__}, not text")
    return text


def trained_spans(
    tokenizer: ChatTokenizer,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    trained: Sequence[bool],
    tools: Sequence[Any] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the messages marked ``trained``."""
    full = render(tokenizer, template, messages, generation=False, tools=tools)
    spans: list[tuple[int, int]] = []
    for i, is_trained in enumerate(trained):
        if not is_trained:
            continue
        before = render(tokenizer, template, messages[:i], generation=True, tools=tools)
        through = render(tokenizer, template, messages[: i + 1], generation=False, tools=tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"the chat template does not render message {i + 1} as a continuation of the "
                "messages before it, so the assistant tokens cannot be located; use a model "
                "whose template is prefix-stable"
            )
        spans.append((len(before), len(through)))
    return full, spans


def trained_mask(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """For each token (its character offsets), whether it starts inside a trained span."""
    mask = [False] * len(offsets)
    span_index = 0
    for t, (start, _end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        lo, hi = spans[span_index]
        mask[t] = lo <= start < hi
    return mask
