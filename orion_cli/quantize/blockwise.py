"""Block-wise weight quantization into onnxruntime's MatMulNBits layout.

A weight W of shape [K, N] (K input features, N outputs, as an ONNX MatMul
holds it) is cut into blocks of `block_size` along K for every output column;
each block stores `bits`-bit codes, one float scale and one zero point, and
decodes as (code - zero_point) * scale. The codes, scales and zero points come
from onnxruntime's own quantization routines:

- rtn:    onnxruntime's C++ min-max round-to-nearest (what MatMulNBitsQuantizer
          does by default), asymmetric, integer zero points.
- kquant: the k-quant search of llama.cpp as onnxruntime ships it (a weighted
          least-squares fit of scale and minimum per block), integer zero points.
- hqq:    Half-Quadratic Quantization as onnxruntime ships it, float zero points
          (one more float per block, so more bytes than the other two).

The packed arrays are laid out exactly as MatMulNBits reads its B, scales and
zero_points inputs; GatherBlockQuantized reads the same layout for an embedding
table quantized along its hidden axis, so one representation serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..onnx_weights import unpack_codes

SUPPORTED_BITS = (2, 4, 8)
METHODS = ("rtn", "kquant", "hqq")
HQQ_BITS = (2, 4)  # MatMulNBits runs float zero points only on its unpacked 2/4-bit path


@dataclass
class BlockQuantized:
    """A [K, N] weight in MatMulNBits layout."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray  # uint8 packed [N, ceil(k_blocks * bits / 8)] or float32 [N, k_blocks]
    bits: int
    block_size: int
    k: int
    n: int
    method: str

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points.dtype != np.uint8

    def codes(self) -> np.ndarray:
        """The integer codes, [N, k_blocks * block_size] (padding included)."""
        return unpack_codes(self.packed.reshape(self.n, -1), self.bits)

    def dequantize(self) -> np.ndarray:
        """The weight as the runtime sees it, [K, N] float32."""
        return self.dequantize_outputs(0, self.n)

    def dequantize_outputs(self, start: int = 0, stop: int | None = None, ids: np.ndarray | None = None) -> np.ndarray:
        """Output features start:stop (or `ids`) as the runtime sees them, [K, n] float32."""
        pick = ids if ids is not None else slice(start, self.n if stop is None else stop)
        packed, scales, zero_points = self.packed[pick], self.scales[pick], self.zero_points[pick]
        n = len(scales)
        codes = unpack_codes(np.asarray(packed).reshape(n, -1), self.bits)
        codes = codes.reshape(n, self.k_blocks, self.block_size).astype(np.float32)
        if self.float_zero_points:
            zero = np.asarray(zero_points, dtype=np.float32)
        else:
            zero = unpack_codes(np.asarray(zero_points), self.bits)[:, : self.k_blocks].astype(np.float32)
        values = (codes - zero[:, :, None]) * scales[:, :, None]
        return np.ascontiguousarray(values.reshape(n, -1)[:, : self.k].T)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis, lowest bits first (the MatMulNBits order)."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8)
    width = -(-codes.shape[-1] // per_byte)
    if codes.shape[-1] != width * per_byte:
        pad = [(0, 0)] * (codes.ndim - 1) + [(0, width * per_byte - codes.shape[-1])]
        codes = np.pad(codes, pad)
    grouped = codes.reshape(*codes.shape[:-1], width, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def _padded_columns(weight: np.ndarray, block_size: int) -> np.ndarray:
    """W.T padded with zeros along K to whole blocks: [N, k_blocks * block_size]."""
    k = weight.shape[0]
    k_pad = -(-k // block_size) * block_size
    columns = np.ascontiguousarray(weight.T, dtype=np.float32)
    if k_pad != k:
        columns = np.pad(columns, ((0, 0), (0, k_pad - k)))
    return columns


def _from_codes(codes, scales, zero, weight, bits, block_size, method) -> BlockQuantized:
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    codes = np.asarray(codes).reshape(n, k_blocks, block_size)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k_blocks)
    if np.asarray(zero).dtype.kind == "f" and method == "hqq":
        zero_points = np.asarray(zero, dtype=np.float32).reshape(n, k_blocks)
    else:
        zero_points = pack(np.asarray(zero).reshape(n, k_blocks), bits)
    return BlockQuantized(pack(codes, bits), scales, zero_points, bits, block_size, k, n, method)


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    from onnxruntime.capi._pybind_state import quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits

    kernel = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    per_byte = 8 // bits
    padded = np.ascontiguousarray(weight, dtype=np.float32)
    if k_blocks * block_size != k:
        padded = np.pad(padded, ((0, k_blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-k_blocks // per_byte)), dtype=np.uint8)
    kernel(packed, padded, scales, zero_points, block_size, n, k, False)
    return BlockQuantized(packed, scales, zero_points, bits, block_size, k, n, "rtn")


def quantize_kquant(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    with np.errstate(invalid="ignore", divide="ignore"):  # constant blocks: onnxruntime then keeps its min-max fit
        codes, scales, zero = quant_tensor_k_quant_cpu(_padded_columns(weight, block_size), bits, block_size)
    return _from_codes(codes, scales, zero.astype(np.uint8), weight, bits, block_size, "kquant")


def quantize_hqq(weight: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    columns = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    codes, scales, zero = quantizer.quantize_internal(columns, bits=bits, group_size=block_size)
    return _from_codes(codes.numpy(), scales.numpy(), zero.numpy(), weight, bits, block_size, "hqq")


QUANTIZERS: dict[str, Callable[[np.ndarray, int, int], BlockQuantized]] = {
    "rtn": quantize_rtn,
    "kquant": quantize_kquant,
    "hqq": quantize_hqq,
}


def quantize_weight(weight: np.ndarray, bits: int, block_size: int, method: str) -> BlockQuantized:
    """Quantize a [K, N] float weight block-wise along K."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if method == "hqq" and bits not in HQQ_BITS:
        raise ValueError(f"hqq's float zero points run only at {HQQ_BITS} bits in MatMulNBits, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return QUANTIZERS[method](np.asarray(weight, dtype=np.float32), bits, block_size)


def join_outputs(parts: list[BlockQuantized]) -> BlockQuantized:
    """One weight from blocks of its output features quantized apart (every array is laid out by output)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return BlockQuantized(
        np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]), first.bits, first.block_size, first.k,
        sum(p.n for p in parts), first.method,
    )
