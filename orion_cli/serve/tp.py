"""Tensor-parallel building blocks in the gpt-fast manner: plain modules holding one rank's slice.

Column-parallel linears hold a share of the output features; row-parallel
linears a share of the input features and sum their partial outputs with one
all-reduce. The `_rep` styles of transformers' plans gather a column-parallel
output, or take a row-parallel input replicated. The vocabulary is split by
rows: the embedding sums masked lookups, the LM head gathers its logits.
Weights are read slice by slice from the checkpoint's memory map, never whole;
Conv1D weights (GPT-2, stored [in, out]) are sliced along the matching axis.
A block-quantized weight (an `orion quantize` output, read through
onnx_weights.OnnxWeights) is sliced the same way, by output rows or whole
input blocks. Each share is multiplied by its kernel (kernels.py): oneDNN's
packed layout, or torch's int4 kernel for quantized blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointReader
from ..onnx_weights import BlockWeight, OnnxWeights
from .kernels import BlockEmbedding, BlockMatmul, DenseMatmul, dense_kernel_takes
from .plans import Shape


@dataclass
class TPGroup:
    """This rank's place in its tensor-parallel group (a single rank when size is 1)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` (same shape on all) along the last dimension."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def share(self, total: int) -> tuple[int, int]:
        """This rank's [start, stop) of `total` items split evenly (the caller checked divisibility)."""
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part


class WeightLoader:
    """Reads whole tensors, or one rank's rows or columns of them, cast and placed."""

    def __init__(self, reader: CheckpointReader | OnnxWeights, dtype: torch.dtype, device: torch.device):
        self.reader = reader
        self.dtype = dtype
        self.device = device

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        # always a copy: a slice already in the served dtype would otherwise stay a view of the checkpoint's
        # memory map, keeping the map and every page read at load resident beside the rank's own weights
        return tensor.to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    def has(self, name: str) -> bool:
        return name in self.reader

    def full(self, name: str) -> torch.Tensor:
        return self.place(self.reader.get_slice(name)[:])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.place(self.reader.get_slice(name)[start:stop])

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.place(self.reader.get_slice(name)[:, start:stop])

    def is_quantized(self, name: str) -> bool:
        return isinstance(self.reader, OnnxWeights) and self.reader.is_quantized(name)

    def blocks(self, name: str) -> BlockWeight | None:
        """The block-quantized weight `name`, or None where it is stored as a float tensor."""
        return self.reader.blocks(name) if self.is_quantized(name) else None

    def matmul(self, weight: BlockWeight | torch.Tensor) -> BlockMatmul | DenseMatmul | torch.Tensor:
        """What multiplies by `weight` ([out, in] when a tensor): a kernel module, or the tensor itself where
        no kernel takes it (F.linear then)."""
        if isinstance(weight, BlockWeight):
            return BlockMatmul(weight, self.dtype)
        return DenseMatmul(weight) if dense_kernel_takes(weight) else weight

    def features(self, name: str, start: int, stop: int, out: bool, conv1d: bool) -> torch.Tensor:
        """Output (out=True) or input features [start, stop) of a linear weight, as an [out, in] tensor."""
        if conv1d:  # stored [in, out]
            sliced = self.columns(name, start, stop) if out else self.rows(name, start, stop)
            return sliced.t().contiguous()
        return self.rows(name, start, stop) if out else self.columns(name, start, stop)


class ParallelLinear(nn.Module):
    """One rank's share of a linear layer (nn.Linear or Conv1D) under a plan style ("replicate": all of it).

    The share is a float weight [out, in] (F.linear), or a kernel module (kernels.py) holding it.
    """

    def __init__(self, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None, style: str, tp: TPGroup,
                 input_share: tuple[int, int] | None = None):
        super().__init__()
        self.style = style
        self.tp = tp
        if isinstance(weight, nn.Module):
            self.weight, self.matmul = None, weight
        else:
            self.weight, self.matmul = nn.Parameter(weight, requires_grad=False), None
        keep_bias = bias is not None and (not style.startswith("rowwise") or tp.rank == 0)
        self.bias = nn.Parameter(bias, requires_grad=False) if keep_bias else None  # a summed bias: rank 0 only
        self.input_share = input_share  # rowwise_rep: the input features this rank takes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_share is not None:
            x = x[..., self.input_share[0]:self.input_share[1]]
        if self.matmul is None:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = self.matmul(x, self.bias)
        if self.style == "colwise_rep":
            return self.tp.all_gather_last(out)
        if self.style.startswith("rowwise"):
            return self.tp.all_reduce(out)
        return out


def parallel_linear(module: nn.Module, name: str, style: str, tp: TPGroup, load: WeightLoader,
                    shape: Shape) -> ParallelLinear:
    """`module` (on the meta device) as this rank's ParallelLinear, its weights read from checkpoint `name`."""
    conv1d = type(module).__name__ == "Conv1D"
    in_features, out_features = (module.weight.shape if conv1d else module.weight.shape[::-1])
    weight_name, bias_name = f"{name}.weight", f"{name}.bias"
    has_bias = getattr(module, "bias", None) is not None
    blocks = load.blocks(weight_name)
    if style == "replicate":
        weight = blocks or load.features(weight_name, 0, out_features, True, conv1d)
        return ParallelLinear(load.matmul(weight), load.full(bias_name) if has_bias else None, style, tp)
    if style.startswith("colwise"):
        start, stop = _output_share(out_features, style, tp, shape)
        if blocks:
            weight = load.matmul(blocks.rows(start, stop))
        else:
            weight = load.matmul(load.features(weight_name, start, stop, out=True, conv1d=conv1d))
        bias = load.rows(bias_name, start, stop) if has_bias else None
        return ParallelLinear(weight, bias, style, tp)
    start, stop = tp.share(in_features)
    if blocks:
        weight = load.matmul(blocks.columns(start, stop, weight_name))
    else:
        weight = load.matmul(load.features(weight_name, start, stop, out=False, conv1d=conv1d))
    bias = load.full(bias_name) if has_bias else None
    return ParallelLinear(weight, bias, style, tp, (start, stop) if style == "rowwise_rep" else None)


def _output_share(out_features: int, style: str, tp: TPGroup, shape: Shape) -> tuple[int, int]:
    """A key/value projection with fewer heads than ranks gives each rank the head its queries use
    (a gathered projection is split evenly whatever it holds)."""
    if style == "colwise" and out_features == shape.num_kv_heads * shape.head_dim and shape.num_kv_heads < tp.size:
        first = shape.kv_head_start(tp.size, tp.rank)
        return first * shape.head_dim, (first + 1) * shape.head_dim
    return tp.share(out_features)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the vocabulary; other ids look up zeros and the group sums.

    `embed_scale` is kept from an embedding that scales its own output (Gemma 3).
    The rows are a float weight, or a BlockEmbedding of quantized blocks.
    """

    def __init__(self, weight: torch.Tensor | BlockEmbedding, start: int, tp: TPGroup,
                 embed_scale: float | None = None):
        super().__init__()
        self.tp = tp
        self.start = start
        if isinstance(weight, BlockEmbedding):
            self.weight, self.table, self.rows = None, weight, weight.num_embeddings
        else:
            self.weight, self.table, self.rows = nn.Parameter(weight, requires_grad=False), None, weight.shape[0]
        self.embed_scale = embed_scale

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) if self.table is None else self.table(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = self._lookup(ids)
        else:
            local = ids - self.start
            inside = (local >= 0) & (local < self.rows)
            out = self._lookup(local.clamp(0, self.rows - 1))
            out = self.tp.all_reduce(out * inside.unsqueeze(-1).to(out.dtype))
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype)
        return out


class VocabParallelLMHead(nn.Module):
    """Logits for vocabulary rows [start, stop); the group gathers the full row of logits."""

    def __init__(self, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None, vocab_size: int,
                 rows_per_rank: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = rows_per_rank
        if isinstance(weight, nn.Module):
            self.weight, self.matmul = None, weight
        else:  # a Parameter is the embedding's own (tied weights): shared, not copied
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            self.matmul = None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.matmul is None:
            logits = F.linear(hidden, self.weight, self.bias)
        else:
            logits = self.matmul(hidden, self.bias)
        if self.tp.size == 1:
            return logits
        missing = self.rows_per_rank - logits.shape[-1]
        if missing:  # the last rank's share of a vocabulary that does not divide evenly
            logits = F.pad(logits, (0, missing))
        return self.tp.all_gather_last(logits)[..., : self.vocab_size]


def vocab_share(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(start, stop, rows per rank) of this rank's vocabulary rows; the last share may be short."""
    per_rank = -(-vocab_size // tp.size)
    start = min(tp.rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank
