"""The matrix products of a rank's linear layers: float weights in oneDNN's layout, quantized blocks on torch's
int4 kernel.

Float32 weights on CPU are reordered once into oneDNN's blocked layout
(DenseMatmul) and multiplied by its packed kernel: on the 88M-parameter Llama
of benchmarks/serve_peer.py, one decode step's linears took 23 ms instead of
37 ms with MKL on the checkpoint's layout at batch 1, and 46 ms instead of 94
at batch 8. Half-precision weights take the same kernel where oneDNN runs that
dtype on this CPU: bfloat16 linears of the 88M model at batch 1 took 7.4 ms
packed against 13.8 with F.linear (whose result they equal bit for bit).

Block-quantized weights (orion quantize's MatMulNBits layout) run on torch's
CPU int4 kernel. `_weight_int4pack_mm_for_cpu` multiplies bfloat16
activations by 4-bit codes in groups along K, each group decoded as
(code - 8) * scale + zero. onnxruntime's blocks decode as
(code - zero_point) * scale, the same with zero = (8 - zero_point) * scale;
2-bit codes, shifted by their zero point into the 4-bit range (_recentred),
run on the same kernel, so q2 and q3 do too. Weights the kernel cannot take
(8 bits, outputs not a multiple of 16, a block size it lacks) are dequantized
to float: correct, without the memory saving.

Numerics: the kernel computes in bfloat16 where onnxruntime (accuracy_level
4) quantizes activations to int8, so logits differ slightly; the tests hold
the two to a next-token KL divergence, not to equal floats.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..onnx_weights import BlockWeight

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_N_MULTIPLE = 16
INNER_K_TILES = 2  # how the CPU kernel packs K; 2 is what torch's own int4 CPU recipes use


# whether oneDNN's packed matmul runs each dtype on this CPU (half precision needs AVX-512 at least)
_PACKED_DTYPES = {
    torch.float32: lambda: True,
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
}


def dense_kernel_takes(weight: torch.Tensor) -> bool:
    supported = _PACKED_DTYPES.get(weight.dtype)
    return (weight.device.type == "cpu" and supported is not None and torch.backends.mkldnn.is_available()
            and supported())


class DenseMatmul(nn.Module):
    """x @ W.T (+ bias) for a float W [N, K] on CPU, W held only in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # batch-size hint None: packed for any number of rows (a hint of 1 was slower at 8 rows, measured)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None),
                             persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def int4_kernel_takes(weight: BlockWeight) -> bool:
    return (weight.bits <= 4 and weight.block_size in KERNEL_GROUP_SIZES and weight.n % KERNEL_N_MULTIPLE == 0
            and weight.k % weight.block_size == 0)


class BlockMatmul(nn.Module):
    """x @ W.T for a block-quantized W [N, K]: on the int4 kernel where it takes W, else dequantized."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.n, weight.k
        self.group_size = weight.block_size
        self.on_kernel = int4_kernel_takes(weight)
        # buffers, so the stage counts them among its weights
        if self.on_kernel:
            codes, zeros = _recentred(weight)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES),
                                 persistent=False)
            # [K / group, N, 2]: (scale, zero) per group and output, the kernel's layout
            scales = torch.from_numpy(np.array(weight.scales))
            self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1)
                                 .to(torch.bfloat16).contiguous(), persistent=False)
        else:
            self.register_buffer("dense", torch.from_numpy(weight.dequantize()).to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.on_kernel:
            return F.linear(x, self.dense, bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias


def _recentred(weight: BlockWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes [N, K] (int32) and float zeros [N, k_blocks] such that (code - 8) * scale + zero decodes
    each block as onnxruntime does.

    The kernel keeps zeros in bfloat16 (8 significant bits), so they must stay small next to the scale: 4-bit
    blocks, whose zero points sit near 8, keep their codes (zero = (8 - zero_point) * scale); narrower codes are
    shifted by their rounded zero point into the kernel's range, (code - t + 8), leaving zero = (t - zero_point)
    * scale, which is 0 for integer zero points. Without the shift, 2-bit zeros of 5-8 scales lost 1e-2 in KL.
    """
    zeros = torch.from_numpy(np.array(weight.zeros))
    scales = torch.from_numpy(np.array(weight.scales))
    codes = torch.from_numpy(weight.codes().astype(np.int32))
    if weight.bits == 4:
        shift = torch.full_like(zeros, 8.0)
    else:
        shift = zeros.round().clamp(0, 2 ** weight.bits - 1)
    per_column = (8 - shift).to(torch.int32).repeat_interleave(weight.block_size, dim=1)
    return (codes + per_column[:, : codes.shape[1]])[:, : weight.k].contiguous(), (shift - zeros) * scales


class BlockEmbedding(nn.Module):
    """Rows of a block-quantized embedding table, decoded only for the ids looked up."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype):
        super().__init__()
        self.bits, self.block_size, self.hidden = weight.bits, weight.block_size, weight.k
        self.register_buffer("packed", torch.from_numpy(np.array(weight.packed)), persistent=False)
        self.register_buffer("scales", torch.from_numpy(np.array(weight.scales)), persistent=False)
        self.register_buffer("zeros", torch.from_numpy(np.array(weight.zeros)), persistent=False)
        self.dtype = dtype
        self.shifts = torch.arange(8 // self.bits, dtype=torch.uint8) * self.bits

    @property
    def num_embeddings(self) -> int:
        return self.packed.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed[ids]  # [..., bytes]
        codes = (packed.unsqueeze(-1) >> self.shifts) & ((1 << self.bits) - 1)
        codes = codes.reshape(*ids.shape, -1, self.block_size).to(torch.float32)
        values = (codes - self.zeros[ids].unsqueeze(-1)) * self.scales[ids].unsqueeze(-1)
        return values.reshape(*ids.shape, -1)[..., : self.hidden].to(self.dtype)
