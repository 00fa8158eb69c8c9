"""The dataset doctor counts what the trainer trains on, and refuses what the trainer refuses.

``kubetune validate --model DIR`` (:class:`kubetune.data.tokens.HFChatCounter`) against the
trainer's own path (:func:`kubetune.trainer.dataset.to_conversation`, then
:func:`kubetune.trainer.chat.tokenize_conversation`) on the same file, for templates that
differ where the two once did: the model's own, none at all (the trainer's ChatML fallback),
one that writes tool-call arguments with ``tojson``, and one that does not render earlier
turns unchanged. The tokenizer is the tiny demo model's, built here.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from kubetune import cli, data
from kubetune.data import Code, tokens

REPO = Path(__file__).resolve().parents[3]
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"

TOJSON = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}"
    "<tool_call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Writes each call's arguments with ``tojson``: an object once, a JSON string twice over."""

HISTORY_STRIPPED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Replaces earlier assistant turns, as reasoning models' templates do with their thoughts."""

CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": ""}}

LINES: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "你是道家智者。"},
            {"role": "user", "content": "什么是道?"},
            {"role": "assistant", "content": "道可道，非常道。"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "什么是道?"},
            {"role": "assistant", "content": "道可道，非常道。", "weight": 0},
            {"role": "user", "content": "再说一句。"},
            {"role": "assistant", "content": "上善若水。"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "什么是道?"},
            {"role": "assistant", "content": "道可道。"},
            {"role": "user", "content": "再说一句。"},
            {"role": "assistant", "content": "上善若水。"},
        ]
    },
    {  # content null, arguments a JSON string: OpenAI's format
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "查一下道。"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {**CALL, "function": {"name": "lookup", "arguments": '{"q": "道", "n": 1}'}}
                ],
            },
            {"role": "tool", "content": "道可道", "tool_call_id": "c1"},
            {"role": "assistant", "content": "道可道，非常道。"},
        ],
    },
]


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from kubetune.demo_model import build_demo_model

    folder = build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny", DATASET)
    return AutoTokenizer.from_pretrained(folder)


def with_template(tokenizer: Any, template: str | None) -> Any:
    out = copy.deepcopy(tokenizer)
    if template != "model":
        out.chat_template = template
    return out


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES)
    path.write_text(text, encoding="utf-8")
    return path


def trainer_counts(tokenizer: Any, path: Path) -> Iterator[tuple[int, int] | str]:
    """What the trainer makes of each line: (tokens, trained tokens), or why it refuses."""
    from kubetune.trainer import chat, dataset

    template, _ = chat.template_for(tokenizer)
    for i, example in enumerate(data.read_examples(path), 1):
        try:
            tokenized = chat.tokenize_conversation(
                tokenizer, template, dataset.to_conversation(example, i)
            )
        except chat.TemplateError as exc:
            yield str(exc)
            continue
        trained = sum(label != chat.IGNORE_INDEX for label in tokenized.labels)
        yield len(tokenized.input_ids), trained


@pytest.mark.parametrize(
    ("template", "refused_lines"),
    [("model", []), (None, []), (TOJSON, []), (HISTORY_STRIPPED, [3, 4])],
    ids=["model-template", "no-template", "tojson-arguments", "history-stripped"],
)
def test_doctor_counts_are_the_trainers(
    demo_tokenizer: Any, dataset_file: Path, template: str | None, refused_lines: list[int]
) -> None:
    tokenizer = with_template(demo_tokenizer, template)
    counter = tokens.HFChatCounter(tokenizer)
    doctor = counter.count(list(data.read_examples(dataset_file)))
    trainer = list(trainer_counts(tokenizer, dataset_file))
    assert len(doctor) == len(trainer) == len(LINES)
    for line, (counted, trained) in enumerate(zip(doctor, trainer, strict=True), 1):
        if isinstance(trained, str):  # the trainer refuses it: the doctor says so, in its words
            assert counted.error is not None and trained.endswith(counted.error), line
        else:
            assert counted.error is None, (line, counted.error)
            assert (counted.total, counted.trained) == trained, line
            assert 0 < counted.trained < counted.total
    assert [i for i, c in enumerate(doctor, 1) if c.error is not None] == refused_lines

    report = data.validate_file(dataset_file, provider="local", counter=counter)
    assert [(p.code, p.line) for p in report.errors] == [
        (Code.TEMPLATE_ERROR, line) for line in refused_lines
    ]


def test_tool_call_arguments_reach_the_template_as_an_object(
    demo_tokenizer: Any, dataset_file: Path
) -> None:
    from kubetune.data import chat_template

    tool_line = list(data.read_examples(dataset_file))[3]
    rendered = chat_template.render(
        demo_tokenizer,
        TOJSON,
        [chat_template.template_message(m) for m in tool_line.messages],
        generation=False,
    )
    assert '<tool_call>lookup {"q": "道", "n": 1}</tool_call>' in rendered.replace("\\u9053", "道")
    assert "None" not in rendered  # content null renders as nothing


def test_validate_counts_a_model_without_a_template_as_the_trainer_trains_it(
    demo_tokenizer: Any, dataset_file: Path, tmp_path: Path
) -> None:
    bare = with_template(demo_tokenizer, None)
    bare.save_pretrained(tmp_path / "bare")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["validate", str(dataset_file), "--model", str(tmp_path / "bare")])
    assert code == 0, out.getvalue() + err.getvalue()
    assert "ChatML fallback" in out.getvalue()


def test_batches_keep_to_the_character_budget() -> None:
    sizes = [5, 5, 5, 12, 1, 1, 30, 2]
    batches = list(tokens.batched_by_budget(sizes, lambda n: n, max_chars=10))
    assert [x for batch in batches for x in batch] == sizes  # all of them, in order
    assert batches == [[5, 5], [5], [12], [1, 1], [30], [2]]  # an oversized one comes alone
    assert list(tokens.batched_by_budget([], len, max_chars=10)) == []


def test_long_examples_are_tokenised_a_few_at_a_time(
    demo_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = type(demo_tokenizer).__call__

    def spy(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, list):
            seen.append(sum(map(len, text)))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(demo_tokenizer), "__call__", spy)
    monkeypatch.setattr(tokens, "COUNT_CHARS", 5_000)
    answer = "道可道，非常道。" * 250  # 2,000 characters
    long = data.Example(
        messages=(
            data.Message(role="user", content="什么是道?"),
            data.Message(role="assistant", content=answer),
        ),
        line=1,
    )
    counter = tokens.HFChatCounter(demo_tokenizer)
    counts = counter.count([long] * 10)
    assert len(set(counts)) == 1 and counts[0].trained > 0
    assert len(seen) == 5 and max(seen) <= 5_000  # two examples a batch, not ten
