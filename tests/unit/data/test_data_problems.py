"""One bad line gives exactly its problem code, at its line; a clean file gives none.

Every code in :class:`kubetune.data.Code` has a case here (a test fails when one is added
without one), and every bad line is also fed to the fast typed path to prove it refuses it: a
line the fast path let through would skip the thorough checks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from data_helpers import chat, clean_example, write_jsonl

from kubetune import data
from kubetune.data import Code, checks, schema, tokens, validate
from kubetune.data.dedupe import DigestTable
from kubetune.data.tokens import TokenCount

ROOT = Path(__file__).resolve().parents[3]
BAD_AT = 6  # the bad line sits among clean ones, at this line number

U, A = ("user", "hi"), ("assistant", "hello")
U_ = {"role": "user", "content": "hi"}
A_ = {"role": "assistant", "content": "x"}


def line(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


# (code, bad line, message index or None); each is put at line BAD_AT of 12 lines
LINE_CASES: list[tuple[Code, Any, int | None]] = [
    (Code.NOT_UTF8, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None),
    (Code.NOT_JSON, b'{"messages": [{"role": "user", "content": "hi"}', None),
    (Code.NOT_JSON, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    (Code.NOT_JSON, b'{"messages": [], "parallel_tool_calls": NaN}', None),
    (Code.NOT_JSON, b'{"messages": [], "parallel_tool_calls": -Infinity}', None),
    (Code.NOT_JSON, b'{"messages": [], "parallel_tool_calls": 1e999}', None),
    (Code.NOT_JSON, b"\xef\xbb\xbf" + json.dumps(clean_example(99)).encode(), None),
    (Code.NOT_OBJECT, [clean_example(0)], None),
    (Code.NOT_OBJECT, b'"just a string"', None),
    (Code.MESSAGES_MISSING, {"conversation": [{"role": "user", "content": "hi"}]}, None),
    (Code.MESSAGES_NOT_LIST, {"messages": {"role": "user", "content": "hi"}}, None),
    (Code.MESSAGES_EMPTY, {"messages": []}, None),
    (Code.MESSAGE_NOT_OBJECT, {"messages": ["hi", {"role": "assistant", "content": "x"}]}, 0),
    (
        Code.ROLE_MISSING,
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        0,
    ),
    (Code.ROLE_UNKNOWN, chat(("developer", "be brief"), U, A), 0),
    (Code.ROLE_UNKNOWN, chat(U, ("bot", "hello"), A), 1),
    (Code.UNKNOWN_KEY, {"messages": [{"role": "user", "content": "hi", "weight": 1}, A_]}, 0),
    (Code.UNKNOWN_KEY, {"messages": [U_, {"role": "assistant", "content": "x", "score": 3}]}, 1),
    (
        Code.CONTENT_MISSING,
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        0,
    ),
    (
        Code.CONTENT_MISSING,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
        1,
    ),
    (Code.CONTENT_MISSING, {"messages": [U_, {"role": "assistant", "tool_calls": []}]}, 1),
    (
        Code.CONTENT_MISSING,
        {"messages": [U_, {"role": "assistant", "content": None, "function_call": {}}]},
        1,
    ),
    (Code.CONTENT_EMPTY, chat(U, ("assistant", "")), 1),
    (Code.CONTENT_EMPTY, chat(("user", " \n\t"), A), 0),
    (Code.CONTENT_NOT_STRING, chat(U, ("assistant", 42)), 1),  # type: ignore[arg-type]
    (Code.CONTENT_NOT_STRING, chat(("user", [{"type": "text", "text": "hi"}]), A), 0),  # type: ignore[arg-type]
    (Code.NO_ASSISTANT, chat(("system", "s"), U), None),
    (
        Code.ALL_WEIGHT_ZERO,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "x", "weight": 0},
            ]
        },
        None,
    ),
    (Code.SYSTEM_NOT_FIRST, chat(U, ("system", "be brief"), A), 1),
    (
        Code.WEIGHT_INVALID,
        {"messages": [U_, {"role": "assistant", "content": "x", "weight": 2}]},
        1,
    ),
    (
        Code.WEIGHT_INVALID,
        {"messages": [U_, {"role": "assistant", "content": "x", "weight": True}]},
        1,
    ),
    (
        Code.WEIGHT_INVALID,
        {"messages": [U_, {"role": "assistant", "content": "x", "weight": 1.0}]},
        1,
    ),
    (
        Code.WEIGHT_INVALID,
        {"messages": [U_, {"role": "assistant", "content": "x", "weight": None}]},
        1,
    ),
    (
        Code.FIELD_TYPE,
        {"messages": [{"role": "user", "content": "hi", "name": 7}, A_]},
        0,
    ),
    (Code.FIELD_TYPE, {"messages": [U_, {"role": "assistant", "tool_calls": {"id": "c1"}}]}, 1),
    (Code.FIELD_TYPE, {"messages": [U_, A_], "tools": "get_weather"}, None),
    (Code.FIELD_TYPE, {"messages": [U_, A_], "parallel_tool_calls": "yes"}, None),
    (Code.MIXED_FORMAT, {"prompt": "hi", "completion": "hello"}, None),
]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"messages": NaN}', "`NaN` is not a JSON number (JSON has no NaN or Infinity)"),
        (b'{"messages": [Infinity]}', "`Infinity` is not a JSON number"),
        (b'{"messages": 1e999}', "the number 1e999 is out of range"),
        (b"\xef\xbb\xbf{}", "the line starts with a UTF-8 byte-order mark"),
        (b'{"messages": "\\udc00"}', "a lone surrogate"),
        (b'{"messages": [1,]}', "not valid JSON: Expecting value at column 17"),
    ],
)
def test_not_json_says_what_is_wrong(bad: bytes, message: str) -> None:
    (problem,) = checks.check_line(bad, 3, provider="local").problems
    assert problem.code == Code.NOT_JSON and message in problem.message
    assert "surrogate" not in problem.message or message == "a lone surrogate"


def test_a_bom_on_a_later_line_is_named(tmp_path: Path) -> None:
    # `cat a.jsonl b.jsonl` where b.jsonl starts with a byte-order mark
    lines = [line(clean_example(i)) for i in range(11)]
    lines[7] = b"\xef\xbb\xbf" + lines[7]
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    (error,) = report.errors
    assert (error.code, error.line) == (Code.NOT_JSON, 8) and "byte-order mark" in error.message


def twelve_lines_with(bad: bytes) -> list[bytes]:
    lines = [line(clean_example(i)) for i in range(12)]
    lines[BAD_AT - 1] = bad
    return lines


def only(report: data.Report) -> set[tuple[Code, int | None, int | None]]:
    return {(p.code, p.line, p.message_index) for p in [*report.errors, *report.warnings]}


@pytest.mark.parametrize(("code", "bad", "index"), LINE_CASES, ids=lambda v: str(v)[:40])
def test_bad_line_gives_exactly_its_code_and_line(
    code: Code, bad: Any, index: int | None, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", twelve_lines_with(line(bad)))
    report = data.validate_file(path, provider="local")
    assert only(report) == {(code, BAD_AT, index)}
    assert not report.ok
    assert report.n_examples == 12 and report.n_valid == 11


@pytest.mark.parametrize(("code", "bad", "index"), LINE_CASES, ids=lambda v: str(v)[:40])
def test_fast_path_refuses_every_bad_line(code: Code, bad: Any, index: int | None) -> None:
    raw = line(bad)
    try:
        value = schema.chat_decoder.decode(raw)
    except (ValueError, UnicodeDecodeError):
        return
    assert not schema.fast_chat_is_clean(value), f"fast path accepts a {code} line"


GOOD_LINES: list[dict[str, Any]] = [
    clean_example(1),
    chat(U, A, ("user", "more"), ("assistant", "sure")),
    {"messages": [U_, {"role": "assistant", "content": "draft", "weight": 0}, A_]},
    {"messages": [{"role": "system", "content": "s", "name": "rules"}, U_, A_]},
    {
        "messages": [
            U_,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is sunny.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "parallel_tool_calls": False,
    },
    {
        "messages": [
            U_,
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "42"},
            {"role": "assistant", "content": "42.", "refusal": None},
        ],
        "functions": [{"name": "f", "parameters": {}}],
    },
]


@pytest.mark.parametrize("obj", GOOD_LINES, ids=range(len(GOOD_LINES)))
def test_fast_and_thorough_paths_agree_on_valid_lines(obj: dict[str, Any]) -> None:
    raw = line(obj)
    fast = schema.chat_decoder.decode(raw)
    assert schema.fast_chat_is_clean(fast)
    slow = checks.check_line(raw, 1, provider="openai")
    assert slow.problems == []
    assert slow.value == fast
    assert schema.to_example(fast, 1) == schema.to_example(slow.value, 1)


def test_clean_file_gives_no_problems(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD_LINES, *map(clean_example, range(10, 20))])
    for provider in ("openai", "local"):
        report = data.validate_file(path, provider=provider)  # type: ignore[arg-type]
        assert report.errors == [] and report.warnings == [] and report.counts == {}
        assert report.ok and report.n_examples == report.n_valid == 16


def test_example_dataset_is_clean() -> None:
    path = ROOT / "examples" / "data" / "daoyan.jsonl"
    report = data.validate_file(path, provider="openai")
    assert report.ok and report.counts == {}, report.errors[:3]


def test_broken_example_file_shows_many_codes() -> None:
    report = data.validate_file(ROOT / "examples" / "data" / "broken.jsonl", provider="openai")
    assert not report.ok
    assert len(report.counts) >= 15


# ---------------------------------------------------------------------- codes beyond one line


def test_blank_line_is_a_warning_and_not_an_example(tmp_path: Path) -> None:
    lines = twelve_lines_with(b"   ")
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.BLANK_LINE, BAD_AT, None)}
    assert report.ok and report.n_examples == 11 and report.n_lines == 12


def test_unknown_top_level_key_is_a_warning(tmp_path: Path) -> None:
    lines = twelve_lines_with(line({**clean_example(99), "id": "ex-99"}))
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.UNKNOWN_TOP_KEY, BAD_AT, None)}
    assert report.ok and report.n_valid == 12


def test_bom_is_a_warning(tmp_path: Path) -> None:
    lines = [line(clean_example(i)) for i in range(12)]
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.BOM, 1, None)}
    assert report.ok and report.n_valid == 12


def test_utf16_file_is_not_utf8(tmp_path: Path) -> None:
    text = "\n".join(json.dumps(clean_example(i)) for i in range(12))
    path = tmp_path / "d.jsonl"
    path.write_bytes(text.encode("utf-16"))
    report = data.validate_file(path)
    assert only(report) == {(Code.NOT_UTF8, None, None)}
    assert "UTF-16" in report.errors[0].message


def test_duplicate_is_a_warning_naming_the_first_line(tmp_path: Path) -> None:
    lines = [line(clean_example(i)) for i in range(12)]
    # same example, other key order and spacing
    lines[BAD_AT - 1] = b'{"messages":[{"content":"You answer briefly.","role":"system"},' + (
        b'{"role":"user","content":"question 2"}, {"role":"assistant","content":"answer 2"}]}'
    )
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.DUPLICATE, BAD_AT, None)}
    assert "line 3" in report.warnings[0].message
    assert report.ok


def test_duplicates_unchecked_past_the_table_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "DigestTable", functools.partial(DigestTable, max_entries=5))
    lines = [line(clean_example(i)) for i in range(12)]
    lines[-1] = lines[1]  # a repeat of a stored example is still found
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.DUPLICATE, 12, None), (Code.DUPLICATES_UNCHECKED, None, None)}
    assert "line 6" in report.warnings[-1].message or "line 6" in report.warnings[0].message


def test_format_not_chat_for_openai(tmp_path: Path) -> None:
    lines = [line({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    report = data.validate_file(path, provider="openai")
    assert only(report) == {(Code.FORMAT_NOT_CHAT, n, None) for n in range(1, 13)}
    local = data.validate_file(path, provider="local")
    assert local.ok and local.counts == {} and local.format == "prompt-completion"


def test_prompt_completion_field_problems(tmp_path: Path) -> None:
    lines = [line({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(12)]
    lines[2] = line({"prompt": "q"})
    lines[3] = line({"prompt": 5, "completion": "a"})
    lines[4] = line({"prompt": "q", "completion": "  "})
    lines[5] = line(clean_example(0))
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), provider="local")
    assert only(report) == {
        (Code.CONTENT_MISSING, 3, 1),
        (Code.CONTENT_NOT_STRING, 4, 0),
        (Code.CONTENT_EMPTY, 5, 1),
        (Code.MIXED_FORMAT, 6, None),
    }


@pytest.mark.parametrize(("provider", "n", "minimum"), [("openai", 9, 10), ("local", 0, 1)])
def test_too_few_examples(provider: str, n: int, minimum: int, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [clean_example(i) for i in range(n)])
    report = data.validate_file(path, provider=provider)  # type: ignore[arg-type]
    assert only(report) == {(Code.TOO_FEW_EXAMPLES, None, None)}
    assert f"at least {minimum}" in report.errors[0].message


class FixedCounter:
    """Counts every example as its number of characters (a stand-in tokenizer)."""

    name = "chars"
    exact = True
    limit = None

    def count(self, examples: list[data.Example]) -> list[TokenCount]:
        out = []
        for ex in examples:
            n = sum(len(m.content or "") for m in ex.messages)
            if any((m.content or "").startswith("REFUSE") for m in ex.messages):
                out.append(TokenCount(0, 0, "the chat template refused it: no"))
            else:
                out.append(TokenCount(n, n // 2))
        return out


def test_too_long_against_max_tokens(tmp_path: Path) -> None:
    lines = twelve_lines_with(line(chat(("user", "x" * 500), A)))
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    report = data.validate_file(path, max_tokens=100, counter=FixedCounter())
    assert only(report) == {(Code.TOO_LONG, BAD_AT, None)}
    assert "505 tokens; the limit is 100" in report.errors[0].message
    assert report.stats is not None and report.stats.n_over_limit == 1
    assert report.n_valid == 11


def test_template_error_is_reported_per_line(tmp_path: Path) -> None:
    lines = twelve_lines_with(line(chat(("user", "REFUSE me"), A)))
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), counter=FixedCounter())
    assert only(report) == {(Code.TEMPLATE_ERROR, BAD_AT, None)}
    assert report.n_valid == 11 and report.stats is not None and report.stats.n_examples == 11


def test_every_code_has_a_case_here() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    missing = [c.name for c in Code if f"Code.{c.name}" not in source]
    assert missing == []


def test_all_problems_of_a_line_are_collected(tmp_path: Path) -> None:
    bad = {
        "messages": [
            {"role": "user", "content": ""},
            {"role": "system", "content": "late", "weight": 1},
            {"role": "robot", "content": 3},
            "text",
        ]
    }
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", twelve_lines_with(line(bad))))
    assert only(report) == {
        (Code.CONTENT_EMPTY, BAD_AT, 0),
        (Code.UNKNOWN_KEY, BAD_AT, 1),
        (Code.SYSTEM_NOT_FIRST, BAD_AT, 1),
        (Code.ROLE_UNKNOWN, BAD_AT, 2),
        (Code.CONTENT_NOT_STRING, BAD_AT, 2),
        (Code.MESSAGE_NOT_OBJECT, BAD_AT, 3),
        (Code.NO_ASSISTANT, BAD_AT, None),
    }


def test_listing_is_capped_but_counts_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.data import report as report_module

    monkeypatch.setattr(report_module, "MAX_KEPT_PER_CODE", 3)
    monkeypatch.setattr(validate, "MAX_KEPT_PER_CODE", 3)
    path = write_jsonl(tmp_path / "d.jsonl", [b"nope"] * 10)
    report = data.validate_file(path)
    assert len(report.errors) == 3 and report.counts == {"not-json": 10}
    assert report.not_listed == 7 and report.n_errors == 10


def test_duplicates_with_tool_calls_are_found_and_roles_count(tmp_path: Path) -> None:
    call = {
        "messages": [
            U_,
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            A_,
        ]
    }
    as_system = chat(("system", "hi"), ("assistant", "x"))
    as_user = chat(("user", "hi"), ("assistant", "x"))
    lines = [line(clean_example(i)) for i in range(8)]
    lines += [line(call), line(as_system), line(as_user), line(call)]
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.DUPLICATE, 12, None)}
    assert report.warnings[0].message == "same example as line 9"


def test_duplicates_ignore_key_order_inside_tool_data(tmp_path: Path) -> None:
    fn = {"name": "f", "arguments": "{}"}
    calls = [{"id": "c1", "type": "function", "function": fn}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

    def example(order: int) -> dict[str, Any]:
        def flip(d: dict[str, Any]) -> dict[str, Any]:  # same keys, reversed order, all depths
            items = [(k, flip(v) if isinstance(v, dict) else v) for k, v in d.items()]
            return dict(reversed(items) if order else items)

        return {
            "messages": [U_, {"role": "assistant", "tool_calls": [flip(c) for c in calls]}, A_],
            "tools": [flip(t) for t in tools],
        }

    assert line(example(0)) != line(example(1))
    lines = [line(clean_example(i)) for i in range(8)] + [line(example(0)), line(example(1))]
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines))
    assert only(report) == {(Code.DUPLICATE, 10, None)}
    assert report.warnings[0].message == "same example as line 9"


# --- method dpo: OpenAI's preference pairs ----------------------------------------------------


def dpo(i: int, **change: Any) -> dict[str, Any]:
    """A clean preference pair (OpenAI's documented shape), with top-level keys replaced."""
    pair: dict[str, Any] = {
        "input": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"q{i}"},
            ],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": f"short answer {i}"}],
        "non_preferred_output": [{"role": "assistant", "content": f"a long rambling answer {i}"}],
    }
    pair.update(change)
    return {k: v for k, v in pair.items() if v is not None}


OUT = "preferred_output"
NOUT = "non_preferred_output"
DPO_CASES: list[tuple[Code, Any, int | None]] = [
    (Code.FORMAT_NOT_DPO, clean_example(3), None),
    (Code.FORMAT_NOT_DPO, {"prompt": "hi", "completion": "yo"}, None),
    (Code.MESSAGES_MISSING, {"question": "hi"}, None),
    (Code.MESSAGES_MISSING, dpo(1, input=None), None),
    (Code.MESSAGES_MISSING, dpo(1, input={"tools": []}), None),
    (Code.FIELD_TYPE, dpo(1, input="hi"), None),
    (Code.MESSAGES_EMPTY, dpo(1, input={"messages": []}), None),
    (Code.ROLE_UNKNOWN, dpo(1, input={"messages": [{"role": "developer", "content": "x"}]}), 0),
    (Code.OUTPUT_INVALID, dpo(1, preferred_output=None), None),
    (Code.OUTPUT_INVALID, dpo(1, non_preferred_output={"role": "assistant", "content": "x"}), None),
    (Code.OUTPUT_INVALID, dpo(1, preferred_output=[A_, A_]), None),
    (Code.OUTPUT_INVALID, dpo(1, preferred_output=[U_]), None),
    (Code.OUTPUT_INVALID, dpo(1, non_preferred_output=dpo(1)[OUT]), None),
    (Code.MESSAGE_NOT_OBJECT, dpo(1, preferred_output=["x"]), None),
    (Code.CONTENT_MISSING, dpo(1, preferred_output=[{"role": "assistant"}]), None),
    (
        Code.CONTENT_EMPTY,
        dpo(1, non_preferred_output=[{"role": "assistant", "content": " "}]),
        None,
    ),
    (Code.CONTENT_NOT_STRING, dpo(1, preferred_output=[{"role": "assistant", "content": 4}]), None),
    (Code.UNKNOWN_KEY, dpo(1, preferred_output=[{**A_, "weight": 1}]), None),
]


def twelve_pairs_with(bad: bytes) -> list[bytes]:
    lines = [line(dpo(i)) for i in range(12)]
    lines[BAD_AT - 1] = bad
    return lines


@pytest.mark.parametrize(("code", "bad", "index"), DPO_CASES, ids=lambda v: str(v)[:40])
def test_bad_dpo_line_gives_exactly_its_code_and_line(
    code: Code, bad: Any, index: int | None, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", twelve_pairs_with(line(bad)))
    report = data.validate_file(path, provider="openai", method="dpo")
    assert only(report) == {(code, BAD_AT, index)}, report.errors
    assert report.n_examples == 12 and report.n_valid == 11


def test_dpo_messages_name_the_field() -> None:
    bad = dpo(1, non_preferred_output=[{"role": "assistant", "content": ""}])
    (problem,) = checks.check_line(line(bad), 4, provider="openai", method="dpo").problems
    assert problem.message == "`non_preferred_output[0].content` is empty"
    two = checks.check_line(
        line(dpo(1, preferred_output=[A_, A_])), 4, provider="openai", method="dpo"
    )
    assert (
        two.problems[0].message
        == "`preferred_output` must be a list of one assistant message, got 2 items"
    )
    chat_line = checks.check_line(line(clean_example(1)), 4, provider="openai", method="dpo")
    assert "method dpo needs preference pairs" in chat_line.problems[0].message


def test_clean_dpo_file_passes_and_counts_both_conversations(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [line(dpo(i)) for i in range(12)])
    counter = tokens.OpenAIChatCounter(tokens.approx_lengths, name="~", exact=False, limit=None)
    report = data.validate_file(path, provider="openai", method="dpo", counter=counter)
    assert report.ok and report.counts == {} and report.format == "dpo"
    assert report.n_valid == 12 and report.stats is not None
    # each pair is two conversations: the input with the preferred, and with the other output
    conversations = []
    for i in range(12):
        value = checks.check_line(line(dpo(i)), 1, provider="openai", method="dpo").value
        assert value is not None
        pair = schema.to_example(value, 1)
        assert pair.messages[-1].content == f"short answer {i}"
        assert pair.non_preferred is not None
        rejected = (*pair.messages[:-1], pair.non_preferred)
        conversations += [pair, msgspec.structs.replace(pair, messages=rejected)]
    counts = counter.count(conversations)
    assert report.stats.total_tokens == sum(c.total for c in counts)
    assert report.stats.trained_tokens == sum(c.trained for c in counts) > 0


def test_dpo_limit_applies_to_each_conversation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [line(dpo(i)) for i in range(12)])
    counter = tokens.OpenAIChatCounter(tokens.approx_lengths, name="~", exact=False, limit=None)
    probe = data.validate_file(path, method="dpo", counter=counter)
    assert probe.stats is not None
    # a limit between one conversation and the pair's sum: nothing is too long
    report = data.validate_file(path, method="dpo", counter=counter, max_tokens=probe.stats.max - 1)
    assert report.ok and report.stats is not None and report.stats.n_over_limit == 0
    assert report.stats.billed_tokens_per_epoch == report.stats.total_tokens


def test_chat_file_is_refused_for_dpo_and_a_dpo_file_for_supervised(tmp_path: Path) -> None:
    chat_file = write_jsonl(tmp_path / "c.jsonl", [line(clean_example(i)) for i in range(12)])
    report = data.validate_file(chat_file, provider="openai", method="dpo")
    assert report.counts == {"format-not-dpo": 12} and not report.ok
    dpo_file = write_jsonl(tmp_path / "p.jsonl", [line(dpo(i)) for i in range(12)])
    report = data.validate_file(dpo_file, provider="openai")
    assert report.counts == {"messages-missing": 12}
    assert "validate with method dpo" in report.errors[0].message


def test_dpo_duplicates_are_found(tmp_path: Path) -> None:
    lines = [line(dpo(i)) for i in range(11)] + [line(dpo(4))]
    report = data.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), method="dpo")
    assert only(report) == {(Code.DUPLICATE, 12, None)}
