"""Chat examples → token ids and labels: the chat template, assistant-only loss, truncation.

Each example is rendered with the tokenizer's own chat template (or :data:`FALLBACK_TEMPLATE`
when the model has none) and tokenised once. Labels are the input ids on the tokens of assistant
messages whose weight is not 0 and ``-100`` everywhere else (system, user, tool turns, the
template's role headers, and assistant turns with ``weight: 0``).

Which characters belong to an assistant message is found by rendering the conversation up to
that message twice, with and without it (the prefix ends with the generation prompt), and
mapping that character span onto tokens through the tokenizer's offsets. That works for any
template that renders a conversation's prefix as a prefix of the whole, which is what
serving relies on too; a template that does not is refused with :class:`TemplateError`
rather than trained with wrong labels. The span includes the template's end-of-turn marker,
so the model learns to stop.

Pure logic over a tokenizer object: nothing here loads a model or reads files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.api.finetunejob import Truncation

IGNORE_INDEX = -100
"""Label of a token that is not trained on (PyTorch's cross-entropy ``ignore_index``)."""

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


class TemplateError(ValueError):
    """The chat template cannot be used for assistant-only loss (it is not prefix-stable)."""


class ChatTokenizer(Protocol):
    """What this module needs from a Hugging Face (fast) tokenizer."""

    chat_template: str | None
    eos_token: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1
    """0 means: keep the message as context, do not train on it (assistant messages only)."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Other keys the template may render (``name``, ``tool_calls``, ``tool_call_id``)."""

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **dict(self.extra)}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    line: int = 0
    """Line number in the source file (1-based), for messages about this example."""
    tools: tuple[Any, ...] | None = None
    """Tool definitions, passed to templates that render them."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    line: int = 0

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenizeSummary:
    """What happened to the examples; every example is counted in exactly one bucket."""

    kept: int = 0
    truncated: int = 0
    """Kept, but cut to ``max_seq_length`` tokens (counted in ``kept`` too)."""
    dropped_too_long: int = 0
    """Longer than ``max_seq_length`` with ``truncation: drop``."""
    dropped_no_target: int = 0
    """Nothing left to train on: every assistant turn has weight 0, or truncation cut them off."""
    tokens: int = 0
    """Tokens of the kept examples (after truncation): one epoch's real tokens."""
    target_tokens: int = 0
    """Of those, the tokens the loss is computed on."""
    dropped_lines: list[int] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_target


def template_for(tokenizer: ChatTokenizer) -> tuple[str, bool]:
    """The template to train with, and whether it is the fallback."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, False
    return FALLBACK_TEMPLATE, True


def _render(
    tokenizer: ChatTokenizer,
    template: str,
    messages: Sequence[Message],
    *,
    generation: bool,
    tools: Sequence[Any] | None = None,
) -> str:
    text = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation,
        tools=list(tools) if tools else None,
    )
    if not isinstance(text, str):  # pragma: no cover - tokenize=False always gives text
        raise TypeError(f"chat template rendered {type(text).__name__}, not text")
    return text


def assistant_spans(
    tokenizer: ChatTokenizer, template: str, conversation: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the trained assistant messages."""
    messages, tools = conversation.messages, conversation.tools
    full = _render(tokenizer, template, messages, generation=False, tools=tools)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        before = _render(tokenizer, template, messages[:i], generation=True, tools=tools)
        through = _render(tokenizer, template, messages[: i + 1], generation=False, tools=tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"line {conversation.line}: the chat template does not render message {i + 1} "
                "as a continuation of the messages before it, so the assistant tokens cannot "
                "be located; use a model whose template is prefix-stable"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(
    tokenizer: ChatTokenizer, template: str, conversation: Conversation
) -> TokenizedExample:
    """Token ids and labels (``-100`` outside trained assistant messages), not truncated."""
    text, spans = assistant_spans(tokenizer, template, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (start, _end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        lo, hi = spans[span_index]
        if lo <= start < hi:
            labels[t] = input_ids[t]
    return TokenizedExample(input_ids=input_ids, labels=labels, line=conversation.line)


def tokenize_all(
    tokenizer: ChatTokenizer,
    conversations: Iterable[Conversation],
    *,
    max_seq_length: int,
    truncation: Truncation | str,
    template: str | None = None,
) -> tuple[list[TokenizedExample], TokenizeSummary]:
    """Tokenise every example, applying the truncation policy; count what happened."""
    if template is None:
        template, _ = template_for(tokenizer)
    summary = TokenizeSummary()
    kept: list[TokenizedExample] = []
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, template, conversation)
        was_truncated = False
        if len(example.input_ids) > max_seq_length:
            if Truncation(truncation) == Truncation.DROP:
                summary.dropped_too_long += 1
                summary.dropped_lines.append(conversation.line)
                continue
            example = TokenizedExample(
                input_ids=example.input_ids[:max_seq_length],
                labels=example.labels[:max_seq_length],
                line=example.line,
            )
            was_truncated = True
        if example.target_tokens == 0:
            summary.dropped_no_target += 1
            summary.dropped_lines.append(conversation.line)
            continue
        summary.truncated += was_truncated
        summary.kept += 1
        summary.tokens += len(example.input_ids)
        summary.target_tokens += example.target_tokens
        kept.append(example)
    return kept, summary
