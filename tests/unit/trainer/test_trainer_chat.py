"""Chat formatting: assistant-only labels (weights honoured), fallback template, truncation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.trainer import chat
from kubetune.trainer.chat import IGNORE_INDEX, Conversation, Message

MULTI_TURN = Conversation(
    messages=(
        Message("system", "你是道家智者。"),
        Message("user", "什么是道?"),
        Message("assistant", "道可道，非常道。", weight=0),
        Message("user", "再说一句。"),
        Message("assistant", "上善若水。"),
    ),
    line=7,
)


def trained_text(tokenizer: Any, example: chat.TokenizedExample) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    return str(tokenizer.decode(ids))


def test_labels_cover_exactly_the_weighted_assistant_turn(tokenizer: Any) -> None:
    template, fallback = chat.template_for(tokenizer)
    assert not fallback
    example = chat.tokenize_conversation(tokenizer, template, MULTI_TURN)
    # Only the last assistant turn, with its end-of-turn marker, is trained on.
    assert trained_text(tokenizer, example) == "上善若水。<|im_end|>\n"
    assert example.line == 7
    # Trained labels are the input ids themselves, so the model predicts the real text.
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (token, IGNORE_INDEX)


def test_every_non_assistant_token_is_masked(tokenizer: Any) -> None:
    template, _ = chat.template_for(tokenizer)
    text, spans = chat.assistant_spans(tokenizer, template, MULTI_TURN)
    example = chat.tokenize_conversation(tokenizer, template, MULTI_TURN)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert len(offsets) == len(example.labels)
    weight0 = text.index("道可道，非常道。")
    for (start, _), label in zip(offsets, example.labels, strict=True):
        inside = any(lo <= start < hi for lo, hi in spans)
        assert (label != IGNORE_INDEX) == inside
        if weight0 <= start < weight0 + len("道可道，非常道。"):
            assert label == IGNORE_INDEX, "a weight-0 assistant turn must not be trained"
    masked = sum(label == IGNORE_INDEX for label in example.labels)
    assert masked > len(example.labels) // 2  # system, users, headers, the weight-0 turn


def test_all_assistant_turns_trained_without_weights(tokenizer: Any) -> None:
    conversation = Conversation(
        messages=tuple(
            Message(m.role, m.content) for m in MULTI_TURN.messages
        )  # weight 1 everywhere
    )
    template, _ = chat.template_for(tokenizer)
    example = chat.tokenize_conversation(tokenizer, template, conversation)
    assert trained_text(tokenizer, example) == "道可道，非常道。<|im_end|>\n上善若水。<|im_end|>\n"


def without_template(tokenizer: Any) -> Any:
    """A copy of the tokenizer as a base model ships it: no chat template, EOS not ChatML."""
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.eos_token = "<|endoftext|>"
    return bare


def test_fallback_template_is_chatml_with_eos_after_assistant(tokenizer: Any) -> None:
    bare = without_template(tokenizer)
    template, fallback = chat.template_for(bare)
    assert fallback and template == chat.FALLBACK_TEMPLATE
    text, _ = chat.assistant_spans(bare, template, MULTI_TURN)
    assert text.startswith("<|im_start|>system\n你是道家智者。<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n上善若水。<|im_end|><|endoftext|>\n")
    example = chat.tokenize_conversation(bare, template, MULTI_TURN)
    assert trained_text(tokenizer, example) == "上善若水。<|im_end|><|endoftext|>\n"


UNSTABLE = (
    "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
"""A template that renders the last message differently from earlier ones."""


def test_template_that_is_not_prefix_stable_is_refused(tokenizer: Any) -> None:
    with pytest.raises(chat.TemplateError, match="line 7"):
        chat.tokenize_conversation(tokenizer, UNSTABLE, MULTI_TURN)


def long_conversation(n_chars: int, line: int) -> Conversation:
    return Conversation(
        messages=(Message("user", "问" * 5), Message("assistant", "道" * n_chars)), line=line
    )


def test_truncate_counts_and_cuts(tokenizer: Any) -> None:
    convs = [long_conversation(5, 1), long_conversation(400, 2)]
    examples, summary = chat.tokenize_all(
        tokenizer, convs, max_seq_length=64, truncation="truncate"
    )
    assert [len(e.input_ids) <= 64 for e in examples] == [True, True]
    assert len(examples[1].input_ids) == 64
    assert (summary.kept, summary.truncated, summary.dropped) == (2, 1, 0)
    assert summary.tokens == sum(len(e.input_ids) for e in examples)


def test_drop_counts_and_names_the_line(tokenizer: Any) -> None:
    convs = [long_conversation(5, 1), long_conversation(400, 2), long_conversation(6, 3)]
    examples, summary = chat.tokenize_all(tokenizer, convs, max_seq_length=64, truncation="drop")
    assert [e.line for e in examples] == [1, 3]
    assert (summary.kept, summary.truncated, summary.dropped_too_long) == (2, 0, 1)
    assert summary.dropped_lines == [2]


def test_truncation_that_leaves_nothing_to_learn_drops_and_counts(tokenizer: Any) -> None:
    prompt_heavy = Conversation(
        messages=(Message("user", "问" * 400), Message("assistant", "答")), line=5
    )
    examples, summary = chat.tokenize_all(
        tokenizer, [prompt_heavy], max_seq_length=32, truncation="truncate"
    )
    assert examples == []
    assert (summary.kept, summary.dropped_no_target, summary.dropped_lines) == (0, 1, [5])


def test_daoyan_examples_all_train_on_their_answer(
    tokenizer: Any, daoyan_lines: list[dict[str, Any]]
) -> None:
    convs = [
        Conversation(tuple(Message(m["role"], m["content"]) for m in d["messages"]), i)
        for i, d in enumerate(daoyan_lines, 1)
    ]
    examples, summary = chat.tokenize_all(
        tokenizer, convs, max_seq_length=2048, truncation="truncate"
    )
    assert summary.kept == len(daoyan_lines) >= 40
    for example, data in zip(examples, daoyan_lines, strict=True):
        answer = data["messages"][-1]["content"]
        assert trained_text(tokenizer, example) == answer + "<|im_end|>\n"
