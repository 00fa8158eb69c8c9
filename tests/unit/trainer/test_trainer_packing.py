"""Padding-free packing: examples share a row without seeing each other, same loss as unpacked."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubetune.trainer import attention, engine, packing
from kubetune.trainer.chat import IGNORE_INDEX

LENGTHS = [(11, 4), (23, 9), (7, 7), (16, 5)]
"""(tokens, of which trained at the end) per example: different lengths, as in chat data."""


def make_examples(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, trained in LENGTHS:
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n - trained) + ids[n - trained :]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def make_model(attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A wide init makes attention sharp, so any leak between packed examples shows in the loss.
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, initializer_range=0.5,
        max_position_embeddings=256, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_pack_builds_one_row_with_restarting_positions() -> None:
    examples = make_examples()
    batch = packing.pack(examples)
    total = sum(n for n, _ in LENGTHS)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, total)
    assert "attention_mask" not in batch
    starts, offset = [], 0
    for n, _ in LENGTHS:
        assert batch["position_ids"][0, offset : offset + n].tolist() == list(range(n))
        starts.append(offset)
        offset += n
    # The first label of each example is never a target: the previous example must not be
    # trained to predict it.
    assert all(batch["labels"][0, s].item() == IGNORE_INDEX for s in starts)
    assert packing.real_tokens(batch) == total


def test_pad_masks_padding() -> None:
    batch = packing.pad(make_examples(), pad_token_id=0)
    longest = max(n for n, _ in LENGTHS)
    assert batch["input_ids"].shape == (len(LENGTHS), longest)
    assert batch["attention_mask"].sum().item() == sum(n for n, _ in LENGTHS)
    assert packing.real_tokens(batch) == sum(n for n, _ in LENGTHS)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def mean_loss(model: Any, batch: dict[str, Any]) -> float:
    batch = dict(batch)
    labels = batch.pop("labels")
    with torch.no_grad():
        loss_sum, count, _ = engine.target_only_loss(model, batch, labels)
    return float(loss_sum / count)


@pytest.fixture(params=["per-segment", "one-call"])
def packed_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways :data:`attention.NAME` computes a packed row: a call per segment (CPU), and
    one call under the layout's mask (GPU), here made to run on CPU."""
    devices = frozenset({"cpu"}) if request.param == "one-call" else frozenset()
    monkeypatch.setattr(attention, "ONE_CALL_DEVICES", devices)
    return str(request.param)


@pytest.mark.parametrize(
    ("attn", "packed_path"),
    [("sdpa", ""), ("eager", ""), (attention.NAME, "per-segment"), (attention.NAME, "one-call")],
    indirect=["packed_path"],
)
def test_packed_loss_equals_unpacked_loss(attn: str, packed_path: str) -> None:
    attention.register()
    model = make_model(attn)
    examples = make_examples()
    packed = mean_loss(model, packing.pack(examples))
    padded = mean_loss(model, packing.pad(examples, pad_token_id=0))
    # Each example alone: the token-weighted mean over all of them.
    sums, counts = 0.0, 0
    for example in examples:
        single = packing.pad([example], pad_token_id=0)
        labels = single.pop("labels")
        with torch.no_grad():
            s, c, _ = engine.target_only_loss(model, single, labels)
        sums, counts = sums + float(s), counts + int(c)
    alone = sums / counts
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert padded == pytest.approx(alone, rel=1e-5, abs=1e-5)

    # The same row with positions that do not restart lets examples attend to each other:
    # the loss moves far beyond the tolerance above, so the comparison can fail.
    leaky = packing.pack(examples)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).unsqueeze(0)
    assert abs(mean_loss(model, leaky) - alone) > 1e-2


def test_target_only_loss_matches_the_models_own_loss() -> None:
    model = make_model("sdpa")
    batch = packing.pad(make_examples(), pad_token_id=0)
    with torch.no_grad():
        reference = model(**batch).loss.item()  # logits everywhere, HF's ForCausalLMLoss
    assert mean_loss(model, batch) == pytest.approx(reference, rel=1e-5)


def make_chat_like(seed: int = 1) -> list[dict[str, list[int]]]:
    """Examples as chat data has them: most start with one system prompt (24 tokens), then a
    question (untrained) and an answer (trained); one has a system prompt of its own."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 64, (n,), generator=g).tolist()

    system, other = tokens(24), tokens(20)
    examples = []
    for prompt, question, answer in [(system, 5, 6), (system, 3, 9), (other, 4, 4), (system, 7, 2)]:
        ids = prompt + tokens(question) + tokens(answer)
        examples.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:]}
        )
    return examples


def test_examples_with_one_system_prompt_share_it_once() -> None:
    examples = make_chat_like()
    groups = packing.prefix_groups(examples)
    assert sorted((shared, len(members)) for shared, members in groups) == [(0, 1), (24, 3)]
    for shared, members in groups:
        for member in members:  # never past the token before the first target
            assert shared <= len(packing.shareable_head(member))
    batch = packing.pack(examples, share_prefix=True)
    total = sum(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape[1] == total - 2 * 24
    assert packing.real_tokens(batch) == total
    parts = packing.segments(batch["position_ids"])
    assert parts is not None
    assert sorted(p.shared for p in parts) == [0, 0, 24, 24]
    continued = [p for p in parts if p.shared]
    assert all(batch["labels"][0, p.start].item() == IGNORE_INDEX for p in parts)
    assert all(batch["position_ids"][0, p.start].item() == 24 for p in continued)


def test_prefixes_shorter_than_the_minimum_are_not_shared() -> None:
    examples = make_chat_like()
    assert all(shared == 0 for shared, _ in packing.prefix_groups(examples, minimum=25))
    plain = packing.pack(examples)
    assert packing.real_tokens(plain) == plain["input_ids"].shape[1]


def test_segments_of_unpacked_and_inconsistent_rows() -> None:
    assert packing.segments(torch.arange(10).unsqueeze(0)) is None
    assert packing.segments(torch.arange(10).repeat(2, 1)) is None
    with pytest.raises(ValueError, match="continues 5 tokens"):
        packing.segments(torch.tensor([[0, 1, 2, 5, 6]]))


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    batch = dict(batch)
    labels = batch.pop("labels")
    loss_sum, count, _ = engine.target_only_loss(model, batch, labels)
    loss = loss_sum / count
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_shared_prefix_gives_the_loss_and_gradients_of_unpacked_examples(packed_path: str) -> None:
    attention.register()
    model = make_model(attention.NAME).train()
    examples = make_chat_like()
    shared_loss, shared_grads = loss_and_grads(model, packing.pack(examples, share_prefix=True))
    padded_loss, padded_grads = loss_and_grads(model, packing.pad(examples, pad_token_id=0))
    assert shared_loss == pytest.approx(padded_loss, rel=1e-5)
    for shared, padded in zip(shared_grads, padded_grads, strict=True):
        torch.testing.assert_close(shared, padded, rtol=1e-4, atol=1e-5)

    # Continuations that do not see their prefix (positions restart at 0 instead) change the
    # loss well beyond the tolerance, so the comparison above can fail.
    blind = packing.pack(examples, share_prefix=True)
    parts = packing.segments(blind["position_ids"])
    assert parts is not None
    for part in parts:
        if part.shared:
            blind["position_ids"][0, part.start : part.end] -= part.shared
    assert abs(loss_and_grads(model, blind)[0] - padded_loss) > 1e-2


def test_layout_mask_is_causal_per_segment_and_lets_continuations_see_their_prefix() -> None:
    # Example A (4 tokens), B continuing A's first 2 (2 tokens of its own), C alone (2 tokens).
    parts = packing.segments(torch.tensor([[0, 1, 2, 3, 2, 3, 0, 1]]))
    assert parts is not None
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert torch.equal(attention.layout_mask(parts, torch.device("cpu")), expected)


def test_rows_longer_than_the_one_call_limit_take_a_call_per_segment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attention.register()
    monkeypatch.setattr(attention, "ONE_CALL_DEVICES", frozenset({"cpu"}))
    built: list[int] = []
    layout_mask = attention.layout_mask
    monkeypatch.setattr(
        attention,
        "layout_mask",
        lambda parts, device: built.append(1) or layout_mask(parts, device),
    )
    model, batch = make_model(attention.NAME), packing.pack(make_examples())
    expected = mean_loss(model, batch)
    assert built, "a short row on a one-call device is one masked call"
    built.clear()
    monkeypatch.setattr(attention, "ONE_CALL_MAX_TOKENS", batch["input_ids"].shape[1] - 1)
    assert mean_loss(model, packing.pack(make_examples())) == pytest.approx(expected, rel=1e-5)
    assert not built


def test_collator_switches_on_packing() -> None:
    examples = make_examples()
    assert "position_ids" in packing.Collator(packing=True, pad_token_id=0)(examples)
    assert "attention_mask" in packing.Collator(packing=False, pad_token_id=0)(examples)
    chat_like = make_chat_like()
    shared = packing.Collator(packing=True, pad_token_id=0, share_prefix=True)(chat_like)
    assert shared["input_ids"].numel() < packing.pack(chat_like)["input_ids"].numel()
