"""Micro-batches from tokenised examples: padding-free packing, or padding for comparison.

:func:`pack` concatenates a micro-batch's examples into one row of shape ``[1, total]`` with
per-example ``position_ids`` (0, 1, 2, … restarting at every example) and no attention mask.
transformers (``masking_utils.find_packed_sequence_indices``) turns position ids that restart
into a block-diagonal causal mask for the ``sdpa`` and ``eager`` kernels, and flash-attention
turns them into varlen boundaries, so examples never attend to each other and no compute is
spent on padding. The first label of every example is set to ``-100``: a causal LM predicts
token ``i+1`` from position ``i``, so without that the last token of one example would be
trained to predict the first token of the next, which the unpacked batch never does. With that,
the packed loss equals the unpacked loss (``tests/unit/trainer/test_packing.py``).

:func:`pad` is the classic right-padded batch with an attention mask, used when ``packing`` is
off and by the benchmark's baseline. Both count real tokens as ``num_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubetune.trainer.chat import IGNORE_INDEX

Feature = dict[str, Any]
"""One example as the dataset yields it: ``input_ids`` and ``labels`` (lists of ints)."""


def pack(features: Sequence[Feature]) -> dict[str, Any]:
    """One padding-free row holding every example of the micro-batch."""
    import torch

    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for feature in features:
        ids = list(feature["input_ids"])
        example_labels = list(feature["labels"])
        if not ids:
            continue
        example_labels[0] = IGNORE_INDEX
        input_ids += ids
        labels += example_labels
        position_ids += range(len(ids))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }


def pad(features: Sequence[Feature], pad_token_id: int) -> dict[str, Any]:
    """A right-padded ``[batch, longest]`` batch with ``attention_mask``."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class Collator:
    """The trainer's ``data_collator``: :func:`pack` or :func:`pad`, chosen once."""

    def __init__(self, *, packing: bool, pad_token_id: int) -> None:
        self.packing = packing
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Feature]) -> dict[str, Any]:
        if self.packing:
            return pack(features)
        return pad(features, self.pad_token_id)


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the batch that are not padding."""
    mask = batch.get("attention_mask")
    if mask is None:
        return int(batch["input_ids"].numel())
    return int(mask.sum().item())
