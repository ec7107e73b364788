"""Which tensor goes to which shard: execution order and byte-balanced splits.

Pure functions over names and sizes, so the rules can be checked exhaustively
without writing a byte: tensors keep execution order (embeddings, then layers by
number, then final norms, then the head), a shard is a contiguous run of that
order, and no tensor is ever split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# A decoder layer's index as transformers (model.layers.3., transformer.h.3.) and
# ONNX exporters (/model/layers.3/...) spell it.
_LAYER = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks|block)[./](\d+)(?=[./]|$)")
_EMBEDDING = re.compile(r"embed|(?:^|[./])(?:wte|wpe)(?:[./]|$)")
_HEAD = re.compile(r"(?:^|[./])(?:lm_head|embed_out)(?:[./]|$)|^output\.weight$")

GROUP_EMBEDDINGS, GROUP_LAYERS, GROUP_FINAL, GROUP_HEAD = range(4)
GROUP_NAMES = ("embeddings", "layers", "final", "head")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def tensor_group(name: str) -> int:
    """Where a tensor runs: embeddings, a decoder layer, the final norm, or the head."""
    if layer_index(name) is not None:
        return GROUP_LAYERS
    if _HEAD.search(name):
        return GROUP_HEAD
    if _EMBEDDING.search(name):
        return GROUP_EMBEDDINGS
    return GROUP_FINAL


def execution_order(names: Sequence[str]) -> list[str]:
    """`names` sorted as a forward pass uses them; ties keep their given order.

    Layers sort by number (layers.10 after layers.9), not by string.
    """
    position = {name: i for i, name in enumerate(names)}

    def key(name: str) -> tuple[int, int, int]:
        group = tensor_group(name)
        layer = layer_index(name) if group == GROUP_LAYERS else None
        return group, layer or 0, position[name]

    return sorted(names, key=key)


def split_into(sizes: Sequence[int], count: int) -> list[range]:
    """`count` contiguous, non-empty runs of `sizes`, balanced by their sums.

    Each shard aims at an equal share of the bytes still to place, and takes the
    next tensor while the tensor's midpoint falls before that share, so every
    shard lands within half a tensor of its target; the share is recomputed after
    each shard so early rounding does not pile up on the last one.
    """
    total_tensors = len(sizes)
    if not 1 <= count <= total_tensors:
        raise ValueError(f"cannot split {total_tensors} tensors into {count} shards")
    runs: list[range] = []
    start = 0
    remaining = sum(sizes)
    for shards_left in range(count, 0, -1):
        if shards_left == 1:
            runs.append(range(start, total_tensors))
            break
        target = remaining / shards_left
        end, size = start + 1, sizes[start]
        last_end = total_tensors - (shards_left - 1)  # leave one tensor per later shard
        while end < last_end and size + sizes[end] / 2 <= target:
            size += sizes[end]
            end += 1
        runs.append(range(start, end))
        remaining -= size
        start = end
    return runs


@dataclass(frozen=True)
class SizeSplit:
    runs: list[range]
    oversized: list[int]  # indexes of tensors that alone exceed the limit


def split_by_limit(costs: Sequence[int], limit: int, fixed_cost: int = 0) -> SizeSplit:
    """Contiguous runs whose `fixed_cost + sum(costs)` stays within `limit`.

    A tensor that cannot fit even alone gets a run of its own and is reported.
    """
    runs: list[range] = []
    oversized: list[int] = []
    start, used = 0, fixed_cost
    for index, cost in enumerate(costs):
        if fixed_cost + cost > limit:
            if index > start:
                runs.append(range(start, index))
            runs.append(range(index, index + 1))
            oversized.append(index)
            start, used = index + 1, fixed_cost
            continue
        if used + cost > limit:
            runs.append(range(start, index))
            start, used = index, fixed_cost
        used += cost
    if start < len(costs):
        runs.append(range(start, len(costs)))
    return SizeSplit(runs, oversized)
