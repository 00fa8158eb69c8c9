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

import pytest
from data_helpers import chat, clean_example, write_jsonl

from kubetune import data
from kubetune.data import Code, checks, schema, validate
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
