"""Variable-length attention for packed rows without flash-attention: SDPA per example.

transformers already keeps packed examples apart on its ``sdpa`` path: position ids that
restart become a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``).
But a mask tensor takes SDPA off its fused causal kernels, and the attention is then computed
over the whole ``L × L`` row, so a row of eight 100-token examples costs 8× the attention of
the examples themselves. On CPU (and on GPUs without the ``flash_attn`` package) that made
packing slower than padding (``bench/trainer_throughput.py``).

:data:`NAME` is registered as an attention implementation through transformers' public
``AttentionInterface``: for a packed row (one row whose position ids restart), it runs causal
SDPA on each example's slice of the row, which is what flash-attention's varlen kernel does in
one call; anything else (padded batches, generation) goes to the stock SDPA function with its
mask. The mask function registered beside it is the stock SDPA one, so padded batches are
masked exactly as with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kubetune_packed_sdpa"


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """``[(start, end), ...]`` of the examples packed in a one-row batch; None if not packed."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) <= 1 or starts[0] != 0:
        return None
    ends = [*starts[1:], position_ids.shape[1]]
    return list(zip(starts, ends, strict=True))


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    bounds = None
    if position_ids is not None and query.shape[2] == key.shape[2]:  # training, no cache
        bounds = segment_bounds(position_ids)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
        )
        for start, end in bounds
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` usable as ``attn_implementation``; returns it."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
