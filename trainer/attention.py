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

On a GPU, a call per segment costs kernel launches (and as many again in the backward pass),
and an 8B model's packed step was bound by them: 0.38× the real tokens/s of padded batches on
an H200, and 1.28× with one call (``bench/results/trainer_throughput.json``). There, a row of up to
:data:`ONE_CALL_MAX_TOKENS` tokens is one SDPA call under the same layout as a boolean
mask (:func:`layout_mask`): its ``L × L`` work is small next to the projections of such a
model, while on CPU that work is what the per-segment calls avoid.
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

ONE_CALL_DEVICES: frozenset[str] = frozenset({"cuda"})
"""Device types on which a packed row's attention is one masked SDPA call."""

ONE_CALL_MAX_TOKENS = 8192
"""Longer rows take a call per segment on every device: the mask and the attention over the
whole row grow with the square of its length."""


_last: tuple[weakref.ref[torch.Tensor], list[Segment] | None] | None = None
_last_mask: tuple[list[Segment], torch.Tensor] | None = None


def segments_of(position_ids: torch.Tensor) -> list[Segment] | None:
    """:func:`segments`, computed once per forward pass: every layer gets the same tensor."""
    global _last
    if _last is not None and _last[0]() is position_ids:
        return _last[1]
    parts = segments(position_ids)
    _last = (weakref.ref(position_ids), parts)
    return parts


def layout_mask(parts: list[Segment], device: torch.device) -> torch.Tensor:
    """``[L, L]``, True where a token of the row may attend to a column: causally within its
    own segment and, for a continuation, to the first ``shared`` tokens of its leader."""
    lengths = torch.tensor([part.end - part.start for part in parts], device=device)

    def per_token(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device).repeat_interleave(lengths)[:, None]

    own = per_token([part.start for part in parts])
    leader = per_token([parts[part.leader].start for part in parts])
    shared = per_token([part.shared for part in parts])
    rows = torch.arange(parts[-1].end, device=device)
    columns = rows[None, :]
    causal = (columns >= own) & (columns <= rows[:, None])
    return causal | ((columns >= leader) & (columns < leader + shared))


def mask_of(parts: list[Segment], device: torch.device) -> torch.Tensor:
    """:func:`layout_mask` as ``[1, 1, L, L]``, built once per forward pass (every layer gets
    the same ``parts`` from :func:`segments_of`)."""
    global _last_mask
    if _last_mask is not None and _last_mask[0] is parts:
        return _last_mask[1]
    mask = layout_mask(parts, device)[None, None]
    _last_mask = (parts, mask)
    return mask


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

    if query.device.type in ONE_CALL_DEVICES and query.shape[2] <= ONE_CALL_MAX_TOKENS:
        output = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask_of(parts, query.device),
            dropout_p=dropout,
            scale=scaling,
        )
        return output.transpose(1, 2).contiguous(), None

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
