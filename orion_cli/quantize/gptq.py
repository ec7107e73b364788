"""GPTQ (Frantar et al., 2022) into the MatMulNBits block layout.

Why orion carries its own: the GPTQ shipped in onnxruntime 1.31
(onnxruntime/quantization/neural_compressor/weight_only.py, gptq()) stores its
weight as [K, N] but reads the error-feedback coefficients from the column of
the *upper* Cholesky factor of H^-1 (Hinv[i:, i]), which is zero below the
diagonal, so no error is ever propagated and the result equals round-to-nearest;
and it only emits 4-bit MatMulNBits. docs/quantization.md has the measurements.

This version follows the paper's reference implementation: the weight is
processed input feature by input feature, each rounding error is spread over
the features not yet quantized through the upper Cholesky factor of the damped
inverse Hessian, in lazy batches. Scales and zero points are asymmetric min-max
per block of `block_size` input features (with zero inside the range, so the
integer zero point is exact), taken from the weights as updated when the block
starts. With act_order the features are visited by decreasing Hessian diagonal
and each block's scale is fixed up front from the original weights ("static
groups"), so the block layout MatMulNBits needs is kept.

The Hessian of a linear layer is 2/n * sum(x x^T) over its n calibration
inputs; hessians.py collects them by running the fp32 ONNX model.
"""

from __future__ import annotations

import numpy as np

from .blockwise import BlockQuantized, pack

LAZY_BATCH = 128  # input features per lazy update (a multiple of every block size used)


def _block_params(block: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (output feature) scale and integer zero point of a [N, block] slice."""
    low = np.minimum(block.min(axis=1), 0.0)
    high = np.maximum(block.max(axis=1), 0.0)
    flat = (low == 0) & (high == 0)
    low[flat], high[flat] = -1.0, 1.0
    scale = (high - low) / maxq
    zero = np.clip(np.round(-low / scale), 0, maxq)
    return scale.astype(np.float32), zero.astype(np.float32)


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int,
                  act_order: bool = True, damp: float = 0.01) -> BlockQuantized:
    """GPTQ-quantize a [K, N] weight given the [K, K] Hessian of its inputs."""
    k, n = weight.shape
    maxq = (1 << bits) - 1
    k_blocks = -(-k // block_size)
    w = np.array(weight.T, dtype=np.float64)  # [N, K]: columns are input features
    h = np.array(hessian, dtype=np.float64)

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zeros = np.zeros((n, k_blocks), dtype=np.float32)
    if act_order:
        for b in range(k_blocks):
            scales[:, b], zeros[:, b] = _block_params(w[:, b * block_size : (b + 1) * block_size], maxq)
        order = np.argsort(-np.diag(h), kind="stable")
    else:
        order = np.arange(k)
    w = w[:, order]
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U

    codes = np.zeros((n, k_blocks * block_size), dtype=np.uint8)
    lazy = max(LAZY_BATCH, block_size)
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        w1 = w[:, start:stop].copy()
        errors = np.zeros_like(w1)
        u1 = upper[start:stop, start:stop]
        for i in range(stop - start):
            feature = order[start + i]
            block = feature // block_size
            if not act_order and feature % block_size == 0:
                scales[:, block], zeros[:, block] = _block_params(w1[:, i : i + block_size], maxq)
            scale, zero = scales[:, block].astype(np.float64), zeros[:, block].astype(np.float64)
            column = w1[:, i]
            code = np.clip(np.round(column / scale) + zero, 0, maxq)
            codes[:, feature] = code
            error = (column - (code - zero) * scale) / u1[i, i]
            w1[:, i:] -= np.outer(error, u1[i, i:])
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]

    padding = np.arange(k, k_blocks * block_size)
    if len(padding):  # padded features decode to exactly zero
        codes[:, padding] = zeros[:, padding // block_size].astype(np.uint8)
    packed = pack(codes.reshape(n, k_blocks, block_size), bits)
    zero_points = pack(zeros.astype(np.uint8), bits)
    return BlockQuantized(packed, scales, zero_points, bits, block_size, k, n, "gptq")
