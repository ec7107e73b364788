"""Each weight site quantized straight from the checkpoint, in row blocks, at one or more widths.

A site's weight is read a block of output features at a time (onnx_export/tensors.py),
quantized, and the blocks joined: every method here treats output features
independently (GPTQ too, given the Hessian), so the result is the same as
for the whole tensor, and memory is one block's. While a block is in hand,
its output error is measured for the allocation (sensitivity.py turns it into KL): tr(D^T H D) / tr(W^T H W),
D the quantization error, H the Hessian of the layer's inputs (the identity
when there is none), i.e. how much of the layer's output on calibration
text the rounding changes.

The candidates (each site in each of its level's formats) wait in a
scratch file (CandidateStore) until the allocation picks one per site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ..onnx_export.parameters import ExternalData
from ..onnx_export.tensors import ModelTensors, row_blocks
from .blockwise import BlockQuantized, join_outputs, quantize_weight
from .gptq import GptqFactor, quantize_gptq
from .graph import WeightSite
from .levels import Format


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


def quantize_site(tensors: ModelTensors, site: WeightSite, formats: tuple[Format, ...], method: str,
                  hessian: torch.Tensor | None = None) -> dict[Format, Candidate]:
    """The site quantized in each of `formats` with `method` (gptq needs `hessian`), each with its relative
    output error."""
    factor: GptqFactor | None = None
    if method == "gptq":
        from .gptq import gptq_factor

        factor = gptq_factor(hessian)
    parts: dict[Format, list[BlockQuantized]] = {f: [] for f in formats}
    error = {f: 0.0 for f in formats}
    energy = 0.0
    for start, stop in row_blocks(site.n, site.k):
        weight = tensors.weight_kn(site.param, site.stored_nk, start, stop)
        reference = torch.from_numpy(weight)
        energy += _energy(reference, hessian)
        for f in formats:
            # at 8 bits the rounding error is a 256th of a block's range: GPTQ's feedback buys nothing there
            # for a full pass, so 8-bit formats are onnxruntime's round-to-nearest
            part = quantize_gptq(weight, factor, f.bits, f.block) if factor is not None and f.bits < 8 \
                else quantize_weight(weight, f.bits, f.block, "rtn" if method == "gptq" else method)
            parts[f].append(part)
            error[f] += _energy(torch.from_numpy(part.dequantize()) - reference, hessian)
        del weight, reference
    return {f: Candidate(join_outputs(parts[f]), error[f] / energy if energy > 0 else 0.0) for f in formats}


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
        self.entries: dict[tuple[str, Format], tuple[BlockQuantized, list[onnx.TensorProto]]] = {}

    def put(self, key: str, candidate: BlockQuantized) -> None:
        protos = [self.data.tensor(f"{key}.{field}", getattr(candidate, field)) for field in self.FIELDS]
        stub = BlockQuantized(*(None,) * 3, candidate.bits, candidate.block_size, candidate.k, candidate.n,
                              candidate.method)
        self.entries[(key, Format(candidate.bits, candidate.block_size))] = (stub, protos)

    def nbytes(self, key: str, form: Format) -> int:
        return sum(int(np.prod(p.dims)) * onnx.helper.tensor_dtype_to_np_dtype(p.data_type).itemsize
                   for p in self.entries[(key, form)][1])

    def get(self, key: str, form: Format) -> BlockQuantized:
        self.data.flush()
        stub, protos = self.entries[(key, form)]
        arrays = []
        for proto in protos:
            where = {entry.key: entry.value for entry in proto.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
            arrays.append(np.memmap(self.data.path, dtype=dtype, mode="r", offset=int(where["offset"]),
                                    shape=tuple(proto.dims)))
        return BlockQuantized(*arrays, stub.bits, stub.block_size, stub.k, stub.n, stub.method)

    def close(self) -> None:
        self.data.close()
