"""Tensor-parallel building blocks in the gpt-fast manner: plain modules holding one rank's slice.

Column-parallel linears hold a slice of the output features and need no
communication; row-parallel linears hold a slice of the input features and sum
their partial outputs with one all-reduce. The vocabulary is split by rows, so
the embedding sums masked lookups and the LM head gathers its logits. Weights
are read slice by slice from the checkpoint's memory map, never whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointReader
from .architectures import Proj


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
    """Reads the rows or columns of checkpoint tensors that one rank holds, cast and placed."""

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype, device: torch.device):
        self.reader = reader
        self.dtype = dtype
        self.device = device

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def full(self, name: str) -> torch.Tensor:
        return self._place(self.reader.get_slice(name)[:])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._place(self.reader.get_slice(name)[start:stop])

    def has(self, name: str | None) -> bool:
        return name is not None and name in self.reader

    def out_features(self, proj: Proj, start: int, stop: int) -> torch.Tensor:
        """Output features [start, stop) of a projection as a [out, in] weight."""
        lo, hi = proj.offset + start, proj.offset + stop
        if proj.conv1d:
            return self._place(self.reader.get_slice(proj.weight)[:, lo:hi].t())
        return self.rows(proj.weight, lo, hi)

    def in_features(self, proj: Proj, start: int, stop: int) -> torch.Tensor:
        """Input features [start, stop) of a projection as a [out, in] weight."""
        if proj.conv1d:
            return self._place(self.reader.get_slice(proj.weight)[start:stop].t())
        return self._place(self.reader.get_slice(proj.weight)[:, start:stop])

    def bias(self, proj: Proj, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
        if not self.has(proj.bias):
            return None
        if start is None:
            return self.full(proj.bias)
        return self.rows(proj.bias, proj.offset + start, proj.offset + stop)


class ColumnParallelLinear(nn.Module):
    """Holds output features of one or more projections (fused: q|k|v, gate|up); no communication."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds input features; partial outputs are summed across the group.

    The bias is held by rank 0 only, so the sum adds it once.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight, requires_grad=False)
        keep_bias = bias is not None and tp.rank == 0
        self.bias = nn.Parameter(bias, requires_grad=False) if keep_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight, self.bias))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the vocabulary; other ids look up zeros and the group sums."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.start = start
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class VocabParallelLMHead(nn.Module):
    """Logits for vocabulary rows [start, stop); the group gathers the full row of logits."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, rows_per_rank: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = rows_per_rank
        # a Parameter is the embedding's own (tied weights): shared, not copied
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
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
