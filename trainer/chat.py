"""Chat examples → token ids and labels: the chat template, assistant-only loss, truncation.

Each example is rendered with the tokenizer's own chat template (or :data:`FALLBACK_TEMPLATE`
when the model has none) and tokenised once. Labels are the input ids on the tokens of assistant
messages whose weight is not 0 and ``-100`` everywhere else (system, user, tool turns, the
template's role headers, and assistant turns with ``weight: 0``).

Rendering, the fallback template and the search for the trained text are
:mod:`kubetune.data.chat_template`, shared with the dataset doctor so that its token counts
are the trainer's: an assistant message's characters are found by rendering the conversation
up to it twice, with and without it, and mapped onto tokens through the tokenizer's offsets.
A template that does not render a conversation's prefix as a prefix of the whole (which
serving relies on too) is refused with :class:`TemplateError` rather than trained with wrong
labels. The span includes the template's end-of-turn marker, so the model learns to stop.

Pure logic over a tokenizer object: nothing here loads a model or reads files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.api.finetunejob import Truncation
from kubetune.data import chat_template
from kubetune.data.chat_template import FALLBACK_TEMPLATE as FALLBACK_TEMPLATE
from kubetune.data.chat_template import TemplateError as TemplateError
from kubetune.data.chat_template import template_for as template_for

IGNORE_INDEX = -100
"""Label of a token that is not trained on (PyTorch's cross-entropy ``ignore_index``)."""


class ChatTokenizer(chat_template.ChatTokenizer, Protocol):
    """What this module needs from a Hugging Face (fast) tokenizer."""

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


def assistant_spans(
    tokenizer: ChatTokenizer, template: str, conversation: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the trained assistant messages."""
    messages = [m.as_dict() for m in conversation.messages]
    trained = [m.role == "assistant" and m.weight != 0 for m in conversation.messages]
    try:
        return chat_template.trained_spans(
            tokenizer, template, messages, trained, conversation.tools
        )
    except TemplateError as exc:
        raise TemplateError(f"line {conversation.line}: {exc}") from exc


def tokenize_conversation(
    tokenizer: ChatTokenizer, template: str, conversation: Conversation
) -> TokenizedExample:
    """Token ids and labels (``-100`` outside trained assistant messages), not truncated."""
    text, spans = assistant_spans(tokenizer, template, conversation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    mask = chat_template.trained_mask(list(encoding["offset_mapping"]), spans)
    labels = [t if trained else IGNORE_INDEX for t, trained in zip(input_ids, mask, strict=True)]
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
