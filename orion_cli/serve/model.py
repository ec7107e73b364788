"""One pipeline stage of a decoder, holding one tensor-parallel rank's slice of it.

A stage owns a contiguous range of layers; the first stage also owns the
embeddings, the last the final norm and LM head. Attention runs over a slot
cache: every running request owns one slot (row) of each layer's key/value
tensors, and the running requests always fill slots 0..n-1, so a decode step
attends over a view and never gathers. Rotary embeddings come from the
architecture's own transformers module, so rope variants (scaling, Phi-3's
partial rotary) are computed as transformers computes them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .architectures import LayerNames, ModelShape
from .tp import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    WeightLoader,
    vocab_share,
)

CACHE_GROWTH_START = 256  # cache length allocated first; doubled as requests grow


class SlotCache:
    """Key/value tensors [slots, kv_heads, length, head_dim] per layer, grown on demand."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_len = max_len
        self.capacity = min(CACHE_GROWTH_START, max_len)
        shape = (slots, kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (copying once per doubling)."""
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_len)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = old.new_zeros(old.shape[:2] + (capacity,) + old.shape[3:])
                new[:, :, : self.capacity] = old
                tensors[i] = new
        self.capacity = capacity

    def move(self, source: int, target: int) -> None:
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target] = tensor[source]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class Batch:
    """What every layer of every stage needs to know about one step, computed once per step.

    Rows occupy slots [first_slot, first_slot + rows). A prefill starts every
    row at position 0 with `lengths` tokens (right-padded to the longest); a
    decode step adds one token per row at position `starts[row]`.
    """

    prefill: bool
    first_slot: int
    rows: int
    width: int  # tokens per row in this step (padded)
    key_length: int  # cache positions attended over
    positions: torch.Tensor  # [rows, width]
    write_slots: torch.Tensor | None  # decode: slot index per row
    write_positions: torch.Tensor | None  # decode: cache position per row
    last_index: torch.Tensor  # per row, the index in `width` whose logits are sampled
    mask: torch.Tensor | None  # [rows|1, 1, width, key_length], True = attend
    causal: bool  # let SDPA apply the causal mask itself
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def make_batch(prefill: bool, first_slot: int, lengths: list[int], starts: list[int],
               sliding_window: int | None, device: torch.device) -> Batch:
    rows = len(lengths)
    if prefill:
        width = max(lengths)
        positions = torch.arange(width, device=device).unsqueeze(0).expand(rows, width)
        key_length = width
        mask = None
        causal = sliding_window is None
        if not causal:
            q = torch.arange(width, device=device).unsqueeze(1)
            k = torch.arange(width, device=device).unsqueeze(0)
            mask = ((k <= q) & (k > q - sliding_window)).view(1, 1, width, width)
        return Batch(True, first_slot, rows, width, key_length, positions, None, None,
                     torch.tensor([n - 1 for n in lengths], device=device), mask, causal)
    start_tensor = torch.tensor(starts, device=device)
    key_length = max(starts) + 1
    mask = None
    if rows > 1 or sliding_window is not None:
        k = torch.arange(key_length, device=device).unsqueeze(0)
        q = start_tensor.unsqueeze(1)
        allowed = k <= q
        if sliding_window is not None:
            allowed &= k > q - sliding_window
        mask = allowed.view(rows, 1, 1, key_length)
    return Batch(False, first_slot, rows, 1, key_length, start_tensor.unsqueeze(1),
                 torch.arange(first_slot, first_slot + rows, device=device), start_tensor,
                 torch.zeros(rows, dtype=torch.long, device=device), mask, False)


class RMSNorm(nn.Module):
    """As transformers' Llama computes it: in float32, scaled after casting back."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, names: LayerNames, layer_index: int, tp: TPGroup,
                 load: WeightLoader, apply_rotary: Any):
        super().__init__()
        d = shape.head_dim
        self.heads = shape.num_heads // tp.size
        self.kv_heads = shape.kv_heads_per_rank(tp.size)
        self.head_dim = d
        q0, q1 = tp.rank * self.heads * d, (tp.rank + 1) * self.heads * d
        kv_first = shape.kv_head_start(tp.size, tp.rank)
        k0, k1 = kv_first * d, (kv_first + self.kv_heads) * d
        weight = torch.cat([load.out_features(names.q, q0, q1), load.out_features(names.k, k0, k1),
                            load.out_features(names.v, k0, k1)])
        biases = [load.bias(names.q, q0, q1), load.bias(names.k, k0, k1), load.bias(names.v, k0, k1)]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        self.qkv = ColumnParallelLinear(weight, bias)
        self.o = RowParallelLinear(load.in_features(names.o, q0, q1), load.bias(names.o), tp)
        self.scale = shape.attention_scale / (layer_index + 1 if shape.scale_by_layer else 1)
        self.apply_rotary = apply_rotary

    def forward(self, x: torch.Tensor, batch: Batch, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        rows, width, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(rows, width, self.heads, d).transpose(1, 2)
        k = k.view(rows, width, self.kv_heads, d).transpose(1, 2)
        v = v.view(rows, width, self.kv_heads, d).transpose(1, 2)
        if batch.rotary is not None:
            cos, sin = batch.rotary
            q, k = self.apply_rotary(q, k, cos, sin)
        slots = slice(batch.first_slot, batch.first_slot + rows)
        if batch.prefill:
            keys[slots, :, :width] = k
            values[slots, :, :width] = v
        else:
            keys[batch.write_slots, :, batch.write_positions] = k[:, :, 0]
            values[batch.write_slots, :, batch.write_positions] = v[:, :, 0]
        out = F.scaled_dot_product_attention(
            q, keys[slots, :, : batch.key_length], values[slots, :, : batch.key_length],
            attn_mask=batch.mask, is_causal=batch.causal, scale=self.scale,
            enable_gqa=self.heads != self.kv_heads,
        )
        return self.o(out.transpose(1, 2).reshape(rows, width, self.heads * d))


class MLP(nn.Module):
    """SwiGLU (gate and up fused into one column-parallel linear) or GPT-2's plain MLP."""

    def __init__(self, shape: ModelShape, names: LayerNames, tp: TPGroup, load: WeightLoader):
        super().__init__()
        i0, i1 = tp.share(shape.intermediate_size)
        self.gated = names.gate is not None
        if self.gated:
            weight = torch.cat([load.out_features(names.gate, i0, i1), load.out_features(names.up, i0, i1)])
            biases = [load.bias(names.gate, i0, i1), load.bias(names.up, i0, i1)]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
        else:
            weight, bias = load.out_features(names.up, i0, i1), load.bias(names.up, i0, i1)
        self.up = ColumnParallelLinear(weight, bias)
        self.down = RowParallelLinear(load.in_features(names.down, i0, i1), load.bias(names.down), tp)
        self.act = ACT2FN[shape.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, index: int, tp: TPGroup, load: WeightLoader, apply_rotary: Any):
        super().__init__()
        names = shape.layer(index, load.has)
        self.attn_norm = _norm(shape, load, names.attn_norm, names.attn_norm_bias)
        self.attn = Attention(shape, names, index, tp, load, apply_rotary)
        self.mlp_norm = _norm(shape, load, names.mlp_norm, names.mlp_norm_bias)
        self.mlp = MLP(shape, names, tp, load)

    def forward(self, x, batch: Batch, keys, values):
        x = x + self.attn(self.attn_norm(x), batch, keys, values)
        return x + self.mlp(self.mlp_norm(x))


def _norm(shape: ModelShape, load: WeightLoader, weight: str, bias: str | None) -> nn.Module:
    if shape.family == "gpt2":
        return LayerNorm(load.full(weight), load.full(bias) if load.has(bias) else None, shape.norm_eps)
    return RMSNorm(load.full(weight), shape.norm_eps)


def _rotary(shape: ModelShape, hf_config: Any, device: torch.device):
    """transformers' rotary module and apply function for this architecture (None for GPT-2)."""
    if shape.family != "rotary":
        return None, None
    module = importlib.import_module(f"transformers.models.{shape.model_type}.modeling_{shape.model_type}")
    rotary_cls = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding")
                      and not name.startswith("_") and getattr(module, name).__module__ == module.__name__)
    return rotary_cls(config=hf_config, device=device), module.apply_rotary_pos_emb


class StageModel(nn.Module):
    """Layers `layer_range` of the model, as rank `tp.rank` of its tensor-parallel group holds them."""

    def __init__(self, shape: ModelShape, hf_config: Any, layer_range: range, first: bool, last: bool,
                 tp: TPGroup, load: WeightLoader, max_slots: int, max_len: int):
        super().__init__()
        self.shape = shape
        self.first, self.last = first, last
        self.device = load.device
        self.rotary, apply_rotary = _rotary(shape, hf_config, load.device)
        v0, v1, per_rank = vocab_share(shape.vocab_size, tp)
        if first:
            self.embed = VocabParallelEmbedding(load.rows(shape.embed, v0, v1), v0, tp)
            self.position_embed = (nn.Parameter(load.full(shape.position_embed), requires_grad=False)
                                   if shape.position_embed else None)
        self.layers = nn.ModuleList(DecoderLayer(shape, i, tp, load, apply_rotary) for i in layer_range)
        if last:
            weight, bias = shape.final_norm
            self.norm = _norm(shape, load, weight, bias)
            tied = first and shape.tie_word_embeddings
            head = self.embed.weight if tied else load.rows(shape.lm_head, v0, v1)
            self.lm_head = VocabParallelLMHead(head, shape.vocab_size, per_rank, tp)
        self.cache = SlotCache(len(self.layers), max_slots, shape.kv_heads_per_rank(tp.size), shape.head_dim,
                               max_len, load.dtype, load.device)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def prepare(self, batch: Batch, dtype: torch.dtype) -> Batch:
        """Grow the cache and compute the step's rotary angles once for all layers."""
        if batch.prefill:
            self.cache.reserve(batch.width)
        else:
            self.cache.reserve(batch.key_length)
        if self.rotary is not None:
            probe = torch.empty(0, dtype=dtype, device=self.device)
            batch.rotary = self.rotary(probe, batch.positions)
        return batch

    def embed_tokens(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        hidden = self.embed(ids)
        if self.position_embed is not None:
            hidden = hidden + F.embedding(batch.positions, self.position_embed)
        return hidden

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        for layer, keys, values in zip(self.layers, self.cache.keys, self.cache.values):
            hidden = layer(hidden, batch, keys, values)
        return hidden

    def logits(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits [rows, vocab] at each row's last real token."""
        last = hidden[torch.arange(batch.rows, device=hidden.device), batch.last_index]
        return self.lm_head(self.norm(last)).float()
