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


@pytest.mark.parametrize("attn", ["sdpa", "eager", attention.NAME])
def test_packed_loss_equals_unpacked_loss(attn: str) -> None:
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


def test_collator_switches_on_packing() -> None:
    examples = make_examples()
    assert "position_ids" in packing.Collator(packing=True, pad_token_id=0)(examples)
    assert "attention_mask" in packing.Collator(packing=False, pad_token_id=0)(examples)
