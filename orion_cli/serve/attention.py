"""Attention through orion's slot KV cache, as an attention function transformers' modules call.

Registered with transformers' AttentionInterface as "orion": a model built
with attn_implementation="orion" computes its own projections, norms and
rotary embeddings as transformers writes them, then hands (query, key, value)
here. This function writes the new keys and values into the slot cache of the
layer (module.layer_idx), and attends over the cached ones with the step's
mask. It honors what the model passes: `scaling`, per-layer `sliding_window`,
`softcap`, attention sinks (`s_aux`), and grouped or multi-query heads.

Every running request owns one slot (row) of each layer's cache, and the
running requests always fill slots 0..n-1, so a decode step attends over a
view and never gathers. A prefill writes rows [first_slot, first_slot + rows)
from position 0; a decode step writes one position per row.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "orion"
CACHE_GROWTH_START = 256  # cache length allocated first; doubled as requests grow


@dataclass
class Step:
    """What every layer needs to know about one step, computed once per step.

    A prefill starts every row at position 0 with `lengths` tokens (right-padded
    to the longest); a decode step adds one token per row at `starts[row]`.
    """

    prefill: bool
    first_slot: int
    lengths: list[int]
    positions: torch.Tensor  # [rows, width]
    key_length: int  # cache positions attended over
    write_positions: torch.Tensor | None  # decode: the cache position of each row's new token
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def make(cls, prefill: bool, first_slot: int, lengths: list[int], starts: list[int],
             device: torch.device) -> "Step":
        if prefill:
            width = max(lengths)
            # a row's padding repeats its last position, so nothing about the row looks longer than it is
            # (Phi-3's longrope picks its frequencies from the longest position)
            last = torch.tensor(lengths, device=device).unsqueeze(1) - 1
            positions = torch.minimum(torch.arange(width, device=device).unsqueeze(0), last)
            return cls(True, first_slot, lengths, positions, width, None)
        start = torch.tensor(starts, device=device)
        return cls(False, first_slot, lengths, start.unsqueeze(1), max(starts) + 1, start)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.positions.shape[1]

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[rows|1, 1, width, key_length], True where a query may attend a key; None: plain causal prefill."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = self._build_mask(sliding_window)
        return self._masks[sliding_window]

    def _build_mask(self, window: int | None) -> torch.Tensor | None:
        device = self.positions.device
        keys = torch.arange(self.key_length, device=device)
        if self.prefill:
            if window is None:
                return None  # SDPA's own causal mask
            queries = torch.arange(self.width, device=device).unsqueeze(1)
            allowed = (keys <= queries) & (keys > queries - window)
            return allowed.view(1, 1, self.width, self.key_length)
        if self.rows == 1 and window is None:
            return None  # one row attends every cached position
        queries = self.write_positions.unsqueeze(1)  # [rows, 1]
        allowed = keys.unsqueeze(0) <= queries
        if window is not None:
            allowed &= keys.unsqueeze(0) > queries - window
        return allowed.view(self.rows, 1, 1, self.key_length)


def grown_capacity(capacity: int, length: int, limit: int) -> int:
    """The cache length that holds `length` positions: `capacity` doubled until it does, at most `limit` (the
    onnxruntime engine's static cache grows the same way)."""
    while capacity < length:
        capacity *= 2
    return min(capacity, limit)


class SlotCache:
    """Keys and values [slots, kv_heads, length, head_dim] per layer, allocated on first use, grown on demand.
    A layer's values may have a head size of their own (DeepSeek's multi-head latent attention: keys of 192,
    values of 128).

    Every operation runs inside the inference mode its tensors were made in
    (the engine runs whole steps, slot moves included, under torch.inference_mode).
    """

    def __init__(self, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.slots = slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.capacity = min(CACHE_GROWTH_START, max_len)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (copying once per doubling)."""
        if length <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, length, self.max_len)
        for tensors in (self.keys, self.values):
            for layer, old in tensors.items():
                new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
                new[:, :, : self.capacity] = old
                tensors[layer] = new
        self.capacity = capacity

    def layer(self, index: int, kv_heads: int, key_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.keys:
            self.keys[index] = torch.zeros((self.slots, kv_heads, self.capacity, key_dim), dtype=self.dtype,
                                           device=self.device)
            self.values[index] = torch.zeros((self.slots, kv_heads, self.capacity, value_dim), dtype=self.dtype,
                                             device=self.device)
        return self.keys[index], self.values[index]

    def move(self, source: int, target: int) -> None:
        for tensors in (self.keys, self.values):
            for tensor in tensors.values():
                tensor[target] = tensor[source]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@dataclass
class Context:
    cache: SlotCache
    step: Step
    calls: list[tuple[int, bool]] | None = None  # when set: (layer index, whether its mask is plain causal) per call


# The stage running now: set by the stage model around each forward, read by every layer's attention.
CURRENT: contextvars.ContextVar[Context] = contextvars.ContextVar("orion_attention_context")


def orion_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None,
                    s_aux: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query and key [rows, heads or kv_heads, width, head_dim], value [rows, kv_heads, width, value head_dim]
    -> [rows, width, heads, value head_dim]."""
    context = CURRENT.get()
    step = context.step
    if context.calls is not None:
        context.calls.append((module.layer_idx, attention_mask is None or is_causal(attention_mask)))
    rows, kv_heads, width, head_dim = key.shape
    keys, values = context.cache.layer(module.layer_idx, kv_heads, head_dim, value.shape[-1])
    slots = slice(step.first_slot, step.first_slot + rows)
    if step.prefill:
        keys[slots, :, :width] = key
        values[slots, :, :width] = value
    else:
        row_slots = torch.arange(step.first_slot, step.first_slot + rows, device=key.device)
        keys[row_slots, :, step.write_positions] = key[:, :, 0]
        values[row_slots, :, step.write_positions] = value[:, :, 0]
    cached_keys = keys[slots, :, : step.key_length]
    cached_values = values[slots, :, : step.key_length]
    scale = _scale(module, head_dim) if scaling is None else scaling
    mask = step.mask(sliding_window)
    if softcap is None and s_aux is None:
        out = F.scaled_dot_product_attention(query, cached_keys, cached_values, attn_mask=mask,
                                             is_causal=step.prefill and mask is None, scale=scale,
                                             enable_gqa=query.shape[1] != kv_heads)
    else:
        out = _attend_explicitly(query, cached_keys, cached_values, mask, step, scale, softcap, s_aux)
    return out.transpose(1, 2).contiguous(), None


def is_causal(mask: torch.Tensor) -> bool:
    """Whether a mask a model hands over for one unpadded prompt (the load probe's) is the plain causal one the
    cache's own masking reproduces: boolean (True attends) or additive (0 attends, a large negative masks)."""
    width = mask.shape[-2]
    causal = torch.ones(width, mask.shape[-1], dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    allowed = mask > torch.finfo(mask.dtype).min / 2
    return bool((allowed == causal).all() and (mask[allowed] == 0).all())


def _scale(module: Any, head_dim: int) -> float:
    """What the module itself would scale by when it passes no `scaling` (GPT-2's attention attributes)."""
    scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def _attend_explicitly(query, keys, values, mask, step: Step, scale: float, softcap: float | None,
                       sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with what SDPA cannot do: logit softcapping (Gemma 2) and attention sinks."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and step.prefill:  # SDPA's is_causal, spelled out
        width = query.shape[2]
        mask = torch.ones(width, step.key_length, dtype=torch.bool, device=query.device).tril().view(1, 1, width, -1)
    if mask is not None:  # (a single row's decode step attends every cached position)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        probabilities = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
    else:
        probabilities = torch.softmax(scores.float(), dim=-1)
    return torch.matmul(probabilities.to(values.dtype), values)


AttentionInterface.register(ATTENTION, orion_attention)
