"""Sources other than a file, reading examples for training, and memory that does not grow.

The 1,000,000-line test runs the validator in a fresh interpreter and compares its peak RSS
(``ru_maxrss``) before and after; the limit below is the contract.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from data_helpers import chat, clean_example, write_jsonl

from kubetune import data
from kubetune.data import Code, validate
from kubetune.data.dedupe import BYTES_AT_CEILING, MAX_ENTRIES

MEMORY_LIMIT_MIB = 64
"""Peak RSS growth allowed while validating 1,000,000 lines (a ~150 MB file): the duplicate
table at 1M entries (24 MiB, briefly 36 MiB while it doubles) plus slack."""


@pytest.mark.slow
def test_a_million_lines_stream_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    template = json.dumps(
        chat(("system", "Answer briefly."), ("user", "question NNN"), ("assistant", "answer NNN"))
    )
    head, mid, tail = template.split("NNN")
    with path.open("w", encoding="utf-8") as f:
        for i in range(1_000_000):
            f.write(f"{head}{i}{mid}{i}{tail}\n")
    assert path.stat().st_size > 2 * (MEMORY_LIMIT_MIB << 20)  # twice the limit: not read whole
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from kubetune import data
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = data.validate_file({str(path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"kib": after - before, "n": report.n_valid, "ok": report.ok}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(out.stdout)
    assert result["n"] == 1_000_000 and result["ok"]
    assert result["kib"] < MEMORY_LIMIT_MIB * 1024, f"grew {result['kib'] / 1024:.0f} MiB"


def test_duplicate_table_bound_is_what_the_docs_say() -> None:
    assert MAX_ENTRIES == 2_097_152 and BYTES_AT_CEILING == 48 << 20


class BatchRecorder:
    """A stand-in tokenizer (a token per character) that records each batch it is handed."""

    name, exact, limit = "chars", True, None

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def count(self, examples: list[data.Example]) -> list[data.TokenCount]:
        sizes = [sum(len(m.content or "") for m in ex.messages) for ex in examples]
        self.batches.append(sizes)
        return [data.TokenCount(n, n // 2) for n in sizes]


@pytest.mark.parametrize("chat_format", [True, False], ids=["chat", "prompt-completion"])
def test_long_examples_are_counted_in_batches_bounded_by_bytes(
    tmp_path: Path, chat_format: bool
) -> None:
    """256 examples of 200 KB would hold 50 MB of messages (and their token ids) at once."""
    long = "道" * 70_000  # 210 KB as UTF-8
    lines = [  # chat lines take the validator's fast path, prompt/completion its other one
        chat(("user", f"q{i}"), ("assistant", long)) if chat_format
        else {"prompt": f"q{i}", "completion": long}
        for i in range(60)
    ]  # fmt: skip
    counter = BatchRecorder()
    report = data.validate_file(write_jsonl(tmp_path / "long.jsonl", lines), counter=counter)
    assert report.ok and report.n_valid == 60
    assert sum(len(b) for b in counter.batches) == 60
    per_line = 3 * len(long)
    assert len(counter.batches) >= 60 * per_line // validate.COUNT_BATCH_BYTES
    assert max(len(b) for b in counter.batches) <= validate.COUNT_BATCH_BYTES // per_line + 1


def test_text_lines_and_file_give_the_same_report(tmp_path: Path) -> None:
    lines = [json.dumps(clean_example(i)) for i in range(11)] + ["not json", ""]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    by_file = data.validate_file(path, provider="openai")
    by_text = data.validate_text(text, provider="openai")
    by_bytes = data.validate_text(text.encode(), provider="openai")
    by_lines = data.validate_lines(lines, provider="openai")
    for r in (by_text, by_bytes, by_lines):
        assert (r.errors, r.warnings, r.counts, r.n_examples) == (
            by_file.errors,
            by_file.warnings,
            by_file.counts,
            by_file.n_examples,
        )
    assert by_file.counts == {"blank-line": 1, "not-json": 1}


def test_to_json_round_trips_and_says_ok(tmp_path: Path) -> None:
    report = data.validate_text(b"[1]\n", provider="local")
    doc = json.loads(report.to_json())
    assert doc["ok"] is False
    assert doc["errors"][0] == {
        "code": "not-object",
        "message": doc["errors"][0]["message"],
        "line": 1,
        "message_index": None,
    }
    assert doc["counts"] == {"not-object": 1} and doc["stats"] is None


def test_progress_is_called_on_long_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(validate, "PROGRESS_EVERY", 4)
    path = write_jsonl(tmp_path / "d.jsonl", [clean_example(i) for i in range(10)])
    calls: list[tuple[int, int]] = []
    data.validate_file(path, progress=lambda n, b: calls.append((n, b)))
    assert [n for n, _ in calls] == [4, 8]
    assert all(0 < b <= path.stat().st_size for _, b in calls)


def test_read_examples_normalises_and_keeps_weights(tmp_path: Path) -> None:
    lines = [
        b"\xef\xbb\xbf"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "draft", "weight": 0},
                    {"role": "assistant", "content": "final"},
                ]
            }
        ).encode(),
        b"",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ],
                "id": 1,
            }
        ).encode(),
    ]
    examples = list(data.read_examples(write_jsonl(tmp_path / "d.jsonl", lines)))
    assert [e.line for e in examples] == [1, 3]
    first = examples[0].messages
    assert [(m.role, m.content, m.weight, m.trained) for m in first] == [
        ("user", "hi", None, False),
        ("assistant", "draft", 0, False),
        ("assistant", "final", None, True),
    ]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    (ex,) = data.read_examples(pc)
    assert ex.format == "prompt-completion"
    assert [(m.role, m.content) for m in ex.messages] == [("user", "p"), ("assistant", "c")]


def test_read_examples_raises_on_a_bad_line(tmp_path: Path) -> None:
    lines = [clean_example(0), chat(("user", "no answer"))]
    with pytest.raises(data.InvalidExample) as exc:
        list(data.read_examples(write_jsonl(tmp_path / "d.jsonl", lines)))
    assert exc.value.problems[0].code is Code.NO_ASSISTANT and exc.value.problems[0].line == 2
