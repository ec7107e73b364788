"""What encode() accepts, normalised: a torch tensor or numpy array, its dtype, shape and kind.

Numbers move between torch and numpy without copying where both can share the
memory. The exception is read-only memory (numpy views of `bytes`): torch has no
read-only tensors, so such arrays are copied before torch sees them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from math import prod

import ml_dtypes
import numpy as np
import torch

from . import dtypes
from .dtypes import DType
from .errors import UnsupportedTensorError

if sys.byteorder != "little":  # payloads are little-endian and are viewed in place
    raise ImportError("orion_cli.codec needs a little-endian machine")

Array = torch.Tensor | np.ndarray


@dataclass(frozen=True, slots=True)
class Source:
    data: Array  # detached torch tensor (any device) or native-endian numpy array
    dtype: DType
    torch: bool  # the caller gave a torch tensor (decode will return one)
    shape: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def elements(self, start: int, stop: int) -> Array:
        """Elements [start, stop) of the C-order flattening, contiguous, copying no more than those."""
        return _contiguous_range(self.data, start, stop)


def as_source(obj) -> Source:
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized or obj.is_meta:
            raise UnsupportedTensorError(f"tensor with layout {obj.layout}"
                                         f"{' (quantized)' if obj.is_quantized else ''}"
                                         f"{' on meta' if obj.is_meta else ''}: only dense tensors are carried")
        return Source(obj.detach(), dtypes.from_torch(obj.dtype), True, tuple(obj.shape), obj.numel())
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        dtype = dtypes.from_numpy(array.dtype)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return Source(array, dtype, False, array.shape, array.size)
    raise UnsupportedTensorError(f"cannot encode a {type(obj).__module__}.{type(obj).__qualname__}: "
                                 "pass a torch.Tensor or a numpy.ndarray")


def _contiguous_range(x: Array, start: int, stop: int) -> Array:
    is_torch = isinstance(x, torch.Tensor)
    if (x.is_contiguous() if is_torch else x.flags.c_contiguous) or x.ndim <= 1:
        flat = x.reshape(-1)[start:stop]
        return flat.contiguous() if is_torch else np.ascontiguousarray(flat)
    # Non-contiguous: gather whole rows of the first dimension (recursing into a
    # partial first or last row), so a chunk never copies the whole tensor.
    row = prod(x.shape[1:])
    if stop <= start or row == 0:
        return x.new_empty(0) if is_torch else np.empty(0, x.dtype)
    first, last = start // row, (stop - 1) // row
    if first == last:
        return _contiguous_range(x[first], start - first * row, stop - first * row)
    pieces = [_contiguous_range(x[first], start - first * row, row)]
    if last > first + 1:
        pieces.append(x[first + 1 : last].reshape(-1))
    pieces.append(_contiguous_range(x[last], 0, stop - last * row))
    return torch.cat(pieces) if is_torch else np.concatenate(pieces)


def byte_view(flat: Array) -> np.ndarray:
    """The bytes of a contiguous 1-D tensor or array as a uint8 numpy array (no copy on the CPU)."""
    if flat.shape[0] == 0:
        return np.empty(0, np.uint8)  # empty views may carry stride 0, which a dtype view refuses
    if isinstance(flat, torch.Tensor):
        flat = flat.cpu()
        if flat.stride(0) != 1:  # a one-element slice counts as contiguous whatever its stride
            flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
        return flat.view(torch.uint8).numpy()
    if flat.strides[0] != flat.itemsize:
        flat = flat.copy()
    return flat.view(np.uint8)


def to_torch(x: Array) -> torch.Tensor:
    """A torch view of a numpy array (bfloat16 through its int16 bits; read-only arrays copied first)."""
    if isinstance(x, torch.Tensor):
        return x
    if not (x.flags.writeable and x.flags.aligned):
        x = x.copy()
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy(x: Array) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.cpu()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def to_kind(x: Array, want_torch: bool, shape: tuple[int, ...]) -> Array:
    """The decoded elements as the kind the sender had, reshaped (see to_torch for when torch copies)."""
    return (to_torch(x) if want_torch else to_numpy(x)).reshape(shape)
