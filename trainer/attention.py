"""Variable-length attention for packed rows without flash-attention: SDPA per example.

transformers already keeps packed examples apart on its ``sdpa`` path: position ids that
restart become a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``).
But a mask tensor takes SDPA off its fused causal kernels, and the attention is then computed
over the whole ``L × L`` row, so a row of eight 100-token examples costs 8× the attention of
the examples themselves. On CPU (and on GPUs without the ``flash_attn`` package) that made
packing slower than padding (``bench/trainer_throughput.py``).

:data:`NAME` is registered as an attention implementation through transformers' public
``AttentionInterface``: for a packed row (one row whose position ids jump), it runs causal
SDPA on each segment's slice of the row, which is what flash-attention's varlen kernel does in
one call; anything else (padded batches, generation) goes to the stock SDPA function with its
mask. The mask function registered beside it is the stock SDPA one, so padded batches are
masked exactly as with ``attn_implementation="sdpa"``.

A row is cut into segments wherever a position id is not its predecessor plus one. A segment
whose positions start at 0 is an example (or a shared prompt prefix followed by the first of
the examples that share it). A segment that starts at ``p > 0`` continues the shared prefix:
it attends to the first ``p`` tokens of the last segment that started at 0, then to itself
(:func:`kubetune.trainer.packing.pack` with ``share_prefix`` writes that layout and
:func:`kubetune.trainer.packing.segments` reads it). That layout means nothing to
flash-attention's varlen path, so the trainer shares prefixes only with this implementation.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kubetune.trainer.packing import Segment, segments

NAME = "kubetune_packed_sdpa"


_last: tuple[weakref.ref[torch.Tensor], list[Segment] | None] | None = None


def segments_of(position_ids: torch.Tensor) -> list[Segment] | None:
    """:func:`segments`, computed once per forward pass: every layer gets the same tensor."""
    global _last
    if _last is not None and _last[0]() is position_ids:
        return _last[1]
    parts = segments(position_ids)
    _last = (weakref.ref(position_ids), parts)
    return parts


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
    parts = None
    if position_ids is not None and query.shape[2] == key.shape[2]:  # training, no cache
        parts = segments_of(position_ids)
    if parts is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    # One split per tensor, not a slice per segment: a slice's backward writes its gradient
    # into a zeroed tensor of the whole row, which made the backward pass quadratic in the
    # number of examples per row.
    lengths = [part.end - part.start for part in parts]
    pieces = [torch.split(tensor, lengths, dim=2) for tensor in (query, key, value)]

    def rows(which: int, index: int) -> torch.Tensor:
        part, own = parts[index], pieces[which][index]
        if not part.shared:
            return own
        return torch.cat([pieces[which][part.leader][:, :, : part.shared], own], dim=2)

    # A continuation recomputes the prefix's own query rows (cheap next to the projections)
    # so that one fused causal call covers prefix + segment; only its own rows are kept.
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            rows(0, index),
            rows(1, index),
            rows(2, index),
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
        )[:, :, part.shared :]
        for index, part in enumerate(parts)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` usable as ``attn_implementation``; returns it."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
