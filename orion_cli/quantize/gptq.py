"""GPTQ (Frantar et al., 2022) into the MatMulNBits block layout.

Why orion carries its own: the GPTQ shipped in onnxruntime 1.31
(onnxruntime/quantization/neural_compressor/weight_only.py, gptq()) stores its
weight as [K, N] but reads the error-feedback coefficients from the column of
the *upper* Cholesky factor of H^-1 (Hinv[i:, i]), which is zero below the
diagonal, so no error is ever propagated and the result equals round-to-nearest;
and it only emits 4-bit MatMulNBits. docs/quantization.md has the measurements.

This version follows the paper's reference implementation, in float32 torch
as that one is: the weight is processed input feature by input feature, each
rounding error is spread over the features not yet quantized through the
upper Cholesky factor of the damped inverse Hessian, in lazy batches. Scales
and zero points are asymmetric min-max per block of `block_size` input
features (with zero inside the range, so the integer zero point is exact).
With act_order the features are visited by decreasing Hessian diagonal and
each block's scale is fixed up front from the original weights ("static
groups"), so the block layout MatMulNBits needs is kept.

Output features are independent of each other given the Hessian, so a large
weight (a 128k-row LM head) is quantized in row blocks that share one
GptqFactor: memory is a block's, not the tensor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .blockwise import BlockQuantized, pack

LAZY_BATCH = 128  # input features per lazy update (a multiple of every block size used)
OUTPUT_CHUNK = 8192  # output features quantized together: fewer, larger steps (measured: 4096 to 16384 about level)
DAMP = 0.01


@dataclass
class GptqFactor:
    """What GPTQ needs from a Hessian, computed once per input tensor."""

    order: torch.Tensor  # the order features are visited in
    upper: torch.Tensor  # upper Cholesky factor of the damped inverse Hessian, in that order
    dead: torch.Tensor  # features never active in calibration (their weights are zeroed)
    act_order: bool


def gptq_factor(hessian: np.ndarray | torch.Tensor, act_order: bool = True, damp: float = DAMP) -> GptqFactor:
    h = torch.as_tensor(hessian, dtype=torch.float32).clone()
    k = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(-torch.diag(h), stable=True) if act_order else torch.arange(k)
    h = h[order][:, order]
    mean_diagonal = torch.mean(torch.diag(h))
    for attempt in range(4):  # float32 Cholesky of an ill-conditioned matrix: damp harder until it factors
        damped = h + torch.eye(k) * damp * (10 ** attempt) * mean_diagonal
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return GptqFactor(order, upper, dead, act_order)
    raise ValueError("the Hessian is not positive definite even with 10x the damping")


def _block_params(block: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output feature scale and integer zero point of a [block, n] slice of input features."""
    low = torch.clamp(block.min(dim=0).values, max=0.0)
    high = torch.clamp(block.max(dim=0).values, min=0.0)
    flat = (low == 0) & (high == 0)
    low[flat], high[flat] = -1.0, 1.0
    scale = (high - low) / maxq
    zero = torch.clamp(torch.round(-low / scale), 0, maxq)
    return scale, zero


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray | GptqFactor, bits: int, block_size: int,
                  act_order: bool = True) -> BlockQuantized:
    """GPTQ-quantize a [K, N] weight given the [K, K] Hessian of its inputs (or its GptqFactor)."""
    factor = hessian if isinstance(hessian, GptqFactor) else gptq_factor(hessian, act_order)
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    codes = np.zeros((k_blocks * block_size, n), dtype=np.uint8)
    scales = np.zeros((k_blocks, n), dtype=np.float32)
    zeros = np.zeros((k_blocks, n), dtype=np.float32)
    for start in range(0, n, OUTPUT_CHUNK):
        stop = min(start + OUTPUT_CHUNK, n)
        chunk = torch.from_numpy(np.ascontiguousarray(weight[:, start:stop], dtype=np.float32))
        chunk_codes, chunk_scales, chunk_zeros = _gptq_chunk(chunk, factor, bits, block_size)
        codes[:, start:stop], scales[:, start:stop], zeros[:, start:stop] = chunk_codes, chunk_scales, chunk_zeros
    codes_nk = np.ascontiguousarray(codes.T)
    zeros_nk = np.ascontiguousarray(zeros.T).astype(np.uint8)
    padding = np.arange(k, k_blocks * block_size)
    if len(padding):  # padded features decode to exactly zero
        codes_nk[:, padding] = zeros_nk[:, padding // block_size]
    packed = pack(codes_nk.reshape(n, k_blocks, block_size), bits)
    return BlockQuantized(packed, np.ascontiguousarray(scales.T), pack(zeros_nk, bits), bits, block_size, k, n, "gptq")


def _gptq_chunk(w: torch.Tensor, factor: GptqFactor, bits: int, block_size: int):
    """GPTQ of a [K, n] slice of output features: (codes [K_padded, n], scales and zeros [k_blocks, n]).

    Features are rows here, so every update touches contiguous memory, and n
    is bounded (OUTPUT_CHUNK) so a lazy batch of rows stays a few MiB.
    """
    k, n = w.shape
    maxq = (1 << bits) - 1
    k_blocks = -(-k // block_size)
    w = w.clone()
    w[factor.dead] = 0.0
    scales = torch.zeros((k_blocks, n), dtype=torch.float32)
    zeros = torch.zeros((k_blocks, n), dtype=torch.float32)
    if factor.act_order:
        for b in range(k_blocks):
            scales[b], zeros[b] = _block_params(w[b * block_size : (b + 1) * block_size], maxq)
    order, upper = factor.order, factor.upper
    w = w[order]
    order_list = order.tolist()
    codes = torch.zeros((k_blocks * block_size, n), dtype=torch.uint8)
    lazy = max(LAZY_BATCH, block_size)
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        w1 = w[start:stop].clone()
        errors = torch.empty_like(w1)
        u1 = upper[start:stop, start:stop]
        for i in range(stop - start):
            feature = order_list[start + i]
            block = feature // block_size
            if not factor.act_order and feature % block_size == 0:
                scales[block], zeros[block] = _block_params(w1[i : i + block_size], maxq)
            scale, zero = scales[block], zeros[block]
            row = w1[i]
            code = torch.clamp(torch.round(row / scale) + zero, 0, maxq)
            codes[feature] = code.to(torch.uint8)
            error = (row - (code - zero) * scale) / u1[i, i]
            if i + 1 < stop - start:
                w1[i + 1 :].addr_(u1[i, i + 1 :], error, alpha=-1.0)
            errors[i] = error
        if stop < k:
            w[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1.0)
    return codes.numpy(), scales.numpy(), zeros.numpy()
