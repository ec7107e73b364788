"""Each weight site quantized straight from the checkpoint, in row blocks, at one or more widths.

A site's weight is read a block of output features at a time (tensors.py),
quantized, and the blocks joined: every method here treats output features
independently (GPTQ too, given the Hessian), so the result is the same as
for the whole tensor, and memory is one block's. While a block is in hand,
its output error is measured for q3's allocation: tr(D^T H D) / tr(W^T H W),
D the quantization error, H the Hessian of the layer's inputs (the identity
when there is none), i.e. how much of the layer's output on calibration
text the rounding changes.

Candidates of q3 (each site at 2 and at 4 bits) wait in a scratch file
(CandidateStore) until the allocation picks one per site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .blockwise import BlockQuantized, join_outputs, quantize_weight
from .gptq import GptqFactor, quantize_gptq
from .graph import ExternalData, WeightSite
from .tensors import ModelTensors, row_blocks


@dataclass
class Candidate:
    quantized: BlockQuantized
    relative_error: float  # output error on calibration inputs relative to the output's energy


def embedding_block_size(hidden: int, block_size: int) -> int:
    """GatherBlockQuantized needs whole blocks along the hidden axis: the largest power of two <= block_size
    dividing it."""
    size = block_size
    while size > 16 and hidden % size:
        size //= 2
    if hidden % size:
        raise ValueError(f"hidden size {hidden} is not a multiple of 16")
    return size


def quantize_site(tensors: ModelTensors, site: WeightSite, widths: tuple[int, ...], method: str, block_size: int,
                  hessian: torch.Tensor | None = None, measure: bool = False) -> dict[int, Candidate]:
    """The site quantized at each of `widths` bits with `method` (gptq needs `hessian`); with `measure`,
    each candidate's relative output error too."""
    factor: GptqFactor | None = None
    if method == "gptq":
        from .gptq import gptq_factor

        factor = gptq_factor(hessian)
    parts: dict[int, list[BlockQuantized]] = {bits: [] for bits in widths}
    error = {bits: 0.0 for bits in widths}
    energy = 0.0
    for start, stop in row_blocks(site.n, site.k):
        weight = tensors.weight_kn(site.param, site.stored_nk, start, stop)
        reference = torch.from_numpy(weight)
        if measure:
            energy += _energy(reference, hessian)
        for bits in widths:
            part = quantize_gptq(weight, factor, bits, block_size) if factor is not None \
                else quantize_weight(weight, bits, block_size, method)
            parts[bits].append(part)
            if measure:
                error[bits] += _energy(torch.from_numpy(part.dequantize()) - reference, hessian)
        del weight, reference
    return {bits: Candidate(join_outputs(parts[bits]), error[bits] / energy if energy > 0 else 0.0)
            for bits in widths}


def _energy(weight_kn: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(W^T H W) for a [K, n] block (H the identity when None)."""
    if hessian is None:
        return float(torch.sum(weight_kn.double() ** 2))
    return float(torch.sum((hessian @ weight_kn) * weight_kn, dtype=torch.float64))


class CandidateStore:
    """Quantized candidates in a scratch file, read back through a memory map."""

    FIELDS = ("packed", "scales", "zero_points")

    def __init__(self, path: Path):
        self.data = ExternalData(path)
        self.entries: dict[tuple[str, int], tuple[BlockQuantized, list[onnx.TensorProto]]] = {}

    def put(self, key: str, candidate: BlockQuantized) -> None:
        protos = [self.data.tensor(f"{key}.{field}", getattr(candidate, field)) for field in self.FIELDS]
        stub = BlockQuantized(*(None,) * 3, candidate.bits, candidate.block_size, candidate.k, candidate.n,
                              candidate.method)
        self.entries[(key, candidate.bits)] = (stub, protos)

    def get(self, key: str, bits: int) -> BlockQuantized:
        self.data.flush()
        stub, protos = self.entries[(key, bits)]
        arrays = []
        for proto in protos:
            where = {entry.key: entry.value for entry in proto.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
            arrays.append(np.memmap(self.data.path, dtype=dtype, mode="r", offset=int(where["offset"]),
                                    shape=tuple(proto.dims)))
        return BlockQuantized(*arrays, stub.bits, stub.block_size, stub.k, stub.n, stub.method)

    def close(self) -> None:
        self.data.close()
