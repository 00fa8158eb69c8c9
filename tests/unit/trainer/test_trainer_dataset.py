"""Bad data stops the trainer before any model is loaded, one error per bad line, by number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer import dataset
from kubetune.trainer.chat import IGNORE_INDEX, tokenize_conversation

GOOD = {
    "messages": [
        {"role": "system", "content": "你是道家智者。"},
        {"role": "user", "content": "什么是道?"},
        {"role": "assistant", "content": "道可道，非常道。"},
    ]
}


def chat(*messages: dict[str, Any]) -> str:
    return json.dumps({"messages": list(messages)}, ensure_ascii=False)


USER = {"role": "user", "content": "问"}
ANSWER = {"role": "assistant", "content": "答"}

BAD_LINES: dict[str, str] = {
    "not-json": '{"messages": [',
    "not-object": "[1, 2]",
    "messages-missing": '{"question": "?"}',
    "messages-not-list": '{"messages": "hi"}',
    "messages-empty": '{"messages": []}',
    "no-assistant": chat(USER),
    "all-weight-zero": chat(USER, {**ANSWER, "weight": 0}),
    "weight-invalid": chat(USER, {**ANSWER, "weight": 2}),
    "role-unknown": chat({"role": "boss", "content": "x"}, ANSWER),
    "role-missing": chat({"content": "x"}, ANSWER),
    "content-missing": chat({"role": "user"}, ANSWER),
    "content-not-string": chat({"role": "user", "content": 5}, ANSWER),
    "content-empty": chat({"role": "user", "content": "  "}, ANSWER),
    "message-not-object": chat("hi", ANSWER),  # type: ignore[arg-type]
    "unknown-key": chat({**USER, "mood": "calm"}, ANSWER),
    "system-not-first": chat(USER, {"role": "system", "content": "s"}, ANSWER),
}


def good_line(i: int) -> str:
    example = json.loads(json.dumps(GOOD))
    example["messages"][1]["content"] += str(i)  # no duplicates
    return json.dumps(example, ensure_ascii=False)


@pytest.mark.parametrize("code", sorted(BAD_LINES))
def test_each_kind_of_bad_line_has_its_own_error(tmp_path: Path, code: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([good_line(1), good_line(2), BAD_LINES[code], good_line(4)]) + "\n")
    with pytest.raises(dataset.DataError) as info:
        dataset.read_conversations(path)
    assert len(info.value.errors) == 1
    (error,) = info.value.errors
    assert error.startswith("line 3: ") and error.endswith(f"[{code}]")


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    lines = [good_line(0)]
    for bad in BAD_LINES.values():
        lines += [bad, good_line(len(lines))]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(dataset.DataError) as info:
        dataset.read_conversations(path)
    expected = [f"line {2 * i + 2}: " for i in range(len(BAD_LINES))]
    assert [e[: len(x)] for e, x in zip(info.value.errors, expected, strict=True)] == expected
    codes = [e.rsplit("[", 1)[1].rstrip("]") for e in info.value.errors]
    assert codes == list(BAD_LINES)


def test_the_error_total_counts_past_the_reports_listing_cap(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("not json\n" * 5000)
    with pytest.raises(dataset.DataError) as info:
        dataset.validate(path)
    text = str(info.value)
    assert "5,000 error(s) in the data" in text
    assert f"... and {5000 - dataset.MAX_REPORTED_ERRORS:,} more" in text


def test_good_lines_become_conversations_with_weights(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [
        good_line(1),
        chat(USER, {**ANSWER, "weight": 0}, USER, {"role": "assistant", "content": "再答"}),
        json.dumps({"prompt": "上善", "completion": "若水"}, ensure_ascii=False),
    ]
    path.write_text("\n".join(rows[:2]) + "\n")
    first, second = dataset.read_conversations(path)
    assert [m.role for m in first.messages] == ["system", "user", "assistant"]
    assert (first.line, second.line) == (1, 2)
    assert [m.weight for m in second.messages if m.role == "assistant"] == [0, 1]
    path.write_text(rows[2] + "\n")
    (completion,) = dataset.read_conversations(path)
    assert [(m.role, m.content) for m in completion.messages] == [
        ("user", "上善"),
        ("assistant", "若水"),
    ]


def test_tool_call_arguments_are_parsed_as_vllm_renders_them(
    tmp_path: Path, tokenizer: Any
) -> None:
    def call(arguments: Any) -> dict[str, Any]:
        function = {"name": "get_weather", "arguments": arguments}
        return {"id": "c1", "type": "function", "function": function}

    calls = [call('{"city": "Paris"}'), call("{not json"), call(""), call('["Paris"]')]
    line = chat(
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "20C"},
        {"role": "assistant", "content": "It is 20C."},
    )
    path = tmp_path / "train.jsonl"
    path.write_text(line + "\n")
    (conversation,) = dataset.read_conversations(path)
    rendered = conversation.messages[1].as_dict()["tool_calls"]
    # An object, as vLLM passes it to the template (tojson would double-encode a string);
    # what is not a JSON object stays as written, and no arguments are {} as in vLLM.
    assert [c["function"]["arguments"] for c in rendered] == [
        {"city": "Paris"},
        "{not json",
        {},
        '["Paris"]',
    ]
    assert rendered[0] == {"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}  # fmt: skip

    # Rendered the way Qwen2.5's template writes a call, the trained tokens hold the
    # arguments once encoded, as the served model sees them.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        '{% for c in m.tool_calls or [] %}<tool_call>{"name": "{{ c.function.name }}", '
        '"arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}'
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    one_call = json.loads(line)
    one_call["messages"][1]["tool_calls"] = calls[:1]
    path.write_text(json.dumps(one_call) + "\n")
    (conversation,) = dataset.read_conversations(path)
    example = tokenize_conversation(tokenizer, template, conversation)
    labels = zip(example.input_ids, example.labels, strict=True)
    trained = tokenizer.decode([t for t, label in labels if label != IGNORE_INDEX])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(dataset.DataError, match="does not exist"):
        dataset.read_conversations(tmp_path / "nope.jsonl")


def test_trainer_exits_2_on_bad_data_before_touching_the_model(tmp_path: Path) -> None:
    """The model path does not exist: had the trainer tried to load it, it would fail
    differently (exit 1). Exit 2 with the line-numbered errors shows it stopped first."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([good_line(1), BAD_LINES["not-json"], BAD_LINES["no-assistant"]]))
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "job": {"name": "bad"},
                "model": {"idOrPath": str(tmp_path / "no-such-model"), "display": "none"},
                "dataset": {"path": str(data)},
                "outputDir": str(tmp_path / "out"),
            }
        )
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "line 2: " in proc.stderr and "[not-json]" in proc.stderr
    assert "line 3: " in proc.stderr and "[no-assistant]" in proc.stderr
    assert "no-such-model" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
