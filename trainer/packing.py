"""Micro-batches from tokenised examples: padding-free packing, or padding for comparison.

:func:`pack` concatenates a micro-batch's examples into one row of shape ``[1, total]`` with
per-example ``position_ids`` (0, 1, 2, … restarting at every example) and no attention mask.
transformers (``masking_utils.find_packed_sequence_indices``) turns position ids that restart
into a block-diagonal causal mask for the ``sdpa`` and ``eager`` kernels, and flash-attention
turns them into varlen boundaries, so examples never attend to each other and no compute is
spent on padding. The first label of every example is set to ``-100``: a causal LM predicts
token ``i+1`` from position ``i``, so without that the last token of one example would be
trained to predict the first token of the next, which the unpacked batch never does. With that,
the packed loss equals the unpacked loss (``tests/unit/trainer/test_trainer_packing.py``).

With ``share_prefix``, examples that begin with the same untrained tokens (chat data usually
repeats one system prompt in every example) share them: the prefix is computed once, and the
other examples continue it with position ids that start where the prefix ends
(:mod:`kubetune.trainer.attention` reads that layout). Every example still sees exactly its
own tokens, so loss and gradients equal the unpacked batch's; the shared tokens are just not
computed again. Only tokens before the one preceding an example's first target are shared, so
no shared position has to predict different tokens for different examples.

:func:`pad` is the classic right-padded batch with an attention mask, used when ``packing`` is
off and by the benchmark's baseline. :func:`real_tokens` counts the examples' tokens for all
three layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from kubetune.trainer.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

Feature = dict[str, Any]
"""One example as the dataset yields it: ``input_ids`` and ``labels`` (lists of ints)."""

MIN_SHARED_TOKENS = 16
"""Shorter common prefixes are not shared: each continuation re-reads its prefix in attention,
and a chat template's first few tokens are common to every example anyway."""


def shareable_head(feature: Feature) -> list[int]:
    """The tokens an example can share: all before the token preceding its first target."""
    labels = feature["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(feature["input_ids"][: max(first - 1, 0)])


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(
    features: Sequence[Feature], minimum: int = MIN_SHARED_TOKENS
) -> list[tuple[int, list[Feature]]]:
    """``(shared tokens, examples)`` groups; examples sorted so that common prefixes meet."""
    groups: list[tuple[list[int], list[Feature]]] = []
    heads = sorted(((shareable_head(f), f) for f in features), key=lambda pair: pair[0])
    for head, feature in heads:
        if groups:
            prefix, members = groups[-1]
            shared = common_length(prefix, head)
            if shared >= minimum:
                groups[-1] = (prefix[:shared], [*members, feature])
                continue
        groups.append((head, [feature]))
    return [(len(prefix) if len(members) > 1 else 0, members) for prefix, members in groups]


def pack(features: Sequence[Feature], *, share_prefix: bool = False) -> dict[str, Any]:
    """One padding-free row holding every example of the micro-batch."""
    import torch

    features = [f for f in features if f["input_ids"]]
    groups = prefix_groups(features) if share_prefix else [(0, list(features))]
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for shared, members in groups:
        for index, feature in enumerate(members):
            skip = shared if index else 0
            ids = list(feature["input_ids"])
            example_labels = list(feature["labels"][skip:])
            example_labels[0] = IGNORE_INDEX
            input_ids += ids[skip:]
            labels += example_labels
            position_ids += range(skip, len(ids))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }


class Segment(NamedTuple):
    """``row[start:end]``; with ``shared > 0``, it continues the first ``shared`` tokens of
    segment number ``leader`` (its own index when it continues nothing)."""

    start: int
    end: int
    leader: int
    shared: int


def segments(position_ids: torch.Tensor) -> list[Segment] | None:
    """The layout :func:`pack` wrote, read back from a one-row batch's position ids: a segment
    starts wherever a position is not its predecessor plus one; one that starts at ``p > 0``
    continues the first ``p`` tokens of the last segment that started at 0. None if the row
    holds a single sequence."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    positions = position_ids[0]
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    if breaks.numel() == 0 or int(positions[0]) != 0:
        return None
    starts = [0, *breaks.tolist()]
    firsts = positions[starts].tolist()
    ends = [*starts[1:], positions.shape[0]]
    result, leader, leader_length = [], 0, 0
    for index, (start, end, first) in enumerate(zip(starts, ends, firsts, strict=True)):
        if first == 0:
            leader, leader_length = index, end - start
        elif first > leader_length:
            raise ValueError(f"packed segment at {start} continues {first} tokens of a shorter one")
        result.append(Segment(start, end, leader, first))
    return result


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

    def __init__(self, *, packing: bool, pad_token_id: int, share_prefix: bool = False) -> None:
        self.packing = packing
        self.pad_token_id = pad_token_id
        self.share_prefix = share_prefix

    def __call__(self, features: Sequence[Feature]) -> dict[str, Any]:
        if self.packing:
            return pack(features, share_prefix=self.share_prefix)
        return pad(features, self.pad_token_id)


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the batch's examples: padding excluded, shared prefixes counted per example."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum().item())
    tokens = int(batch["input_ids"].numel())
    positions = batch.get("position_ids")
    parts = None if positions is None else segments(positions)
    return tokens + sum(part.shared for part in parts or ())
