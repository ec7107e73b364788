"""The element types a frame can carry, and how torch and numpy spell them.

Each dtype has a one-byte code in the frame. numpy has no bfloat16 of its own;
ml_dtypes (already required by onnx) supplies the one numpy users hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from .errors import CorruptFrameError, UnsupportedTensorError


@dataclass(frozen=True)
class DType:
    code: int
    name: str
    torch: torch.dtype
    numpy: np.dtype  # little-endian, the byte order of every payload
    is_float: bool  # real floating point: the only dtypes lossy codecs change

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def shuffle_width(self) -> int:
        """Bytes per scalar, the unit of zstd's byte-shuffle (a complex number is two scalars)."""
        return self.itemsize // 2 if self.numpy.kind == "c" else self.itemsize


def _dtype(code: int, name: str, torch_dtype: torch.dtype, numpy_dtype, is_float: bool = False) -> DType:
    return DType(code, name, torch_dtype, np.dtype(numpy_dtype).newbyteorder("<"), is_float)


DTYPES: tuple[DType, ...] = (
    _dtype(1, "bool", torch.bool, np.bool_),
    _dtype(2, "uint8", torch.uint8, np.uint8),
    _dtype(3, "int8", torch.int8, np.int8),
    _dtype(4, "int16", torch.int16, np.int16),
    _dtype(5, "uint16", torch.uint16, np.uint16),
    _dtype(6, "int32", torch.int32, np.int32),
    _dtype(7, "uint32", torch.uint32, np.uint32),
    _dtype(8, "int64", torch.int64, np.int64),
    _dtype(9, "uint64", torch.uint64, np.uint64),
    _dtype(10, "float16", torch.float16, np.float16, is_float=True),
    _dtype(11, "bfloat16", torch.bfloat16, ml_dtypes.bfloat16, is_float=True),
    _dtype(12, "float32", torch.float32, np.float32, is_float=True),
    _dtype(13, "float64", torch.float64, np.float64, is_float=True),
    _dtype(14, "complex64", torch.complex64, np.complex64),
    _dtype(15, "complex128", torch.complex128, np.complex128),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_NAME = {d.name: d for d in DTYPES}
_BY_TORCH = {d.torch: d for d in DTYPES}
_BY_NUMPY = {d.numpy.newbyteorder("="): d for d in DTYPES}


def from_torch(dtype: torch.dtype) -> DType:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise UnsupportedTensorError(f"tensor dtype {dtype}: not carried by orion frames; "
                                     f"supported: {', '.join(BY_NAME)}") from None


def from_numpy(dtype: np.dtype) -> DType:
    try:
        return _BY_NUMPY[dtype.newbyteorder("=")]
    except (KeyError, ValueError, TypeError):
        raise UnsupportedTensorError(f"array dtype {dtype}: not carried by orion frames; "
                                     f"supported: {', '.join(BY_NAME)}") from None


def from_code(code: int) -> DType:
    try:
        return BY_CODE[code]
    except KeyError:
        raise CorruptFrameError(f"frame header: unknown dtype code {code}") from None
