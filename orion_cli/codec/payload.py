"""Elements <-> payload bytes: the transforms (raw, fp16, bf16, int8, json) and the zstd stage.

A payload is a list of sections, each a run of scalars of one width: raw and
cast payloads have one, int8 has two (bfloat16 scales, then int8 values). The
zstd stage byte-shuffles each section by its width (all first bytes, then all
second bytes, ...) and compresses the sections into one zstd frame, ending a
zstd block between sections. Shuffling groups float exponents together, which
zstd compresses; mantissas stay noise. Sizes are derived from the header, so a
payload that decompresses to any other length is rejected.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch
import zstandard

from .dtypes import DType
from .errors import CodecRangeError, CorruptFrameError
from .frame import FrameHeader
from .tensors import Array, byte_view, to_numpy, to_torch

Section = tuple[np.ndarray, int]  # (uint8 bytes, scalar width in bytes)

INT8_LEVELS = 127  # symmetric: q in [-127, 127], so 0 is exact and no level is wasted on -128
_SMALLEST_BF16 = 2.0**-133  # smallest positive (subnormal) bfloat16
_BF16_INFINITY_BITS = 0x7F80  # positive finite bfloat16 values are exactly the bit patterns below this
_CAST_TARGETS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def applied_transform(transform: str, dtype: DType) -> str:
    """The transform encode really applies: lossy ones touch only floats, and never cast to the same dtype."""
    if transform in ("fp16", "bf16", "int8") and not dtype.is_float:
        return "raw"
    if transform in _CAST_TARGETS and _CAST_TARGETS[transform] == dtype.torch:
        return "raw"
    return transform


def encode_sections(flat: Array, dtype: DType, transform: str, block_size: int) -> list[Section]:
    if transform == "raw":
        return [(byte_view(flat), dtype.shuffle_width)]
    if transform == "json":
        return [(np.frombuffer(_json_text(flat, dtype), np.uint8), 1)]
    tensor = to_torch(flat)
    if transform == "int8":
        scales, values = quantize_int8(tensor, block_size)
        return [(byte_view(scales), 2), (byte_view(values), 1)]
    target = _CAST_TARGETS[transform]
    cast = tensor.to(target)
    _check_cast(tensor, cast, transform)
    return [(byte_view(cast), 2)]


def section_sizes(header: FrameHeader) -> list[tuple[int, int]]:
    """(bytes, width) of each section of a payload before zstd, from the header alone."""
    n = header.element_count
    if header.transform == "raw":
        return [(n * header.dtype.itemsize, header.dtype.shuffle_width)]
    if header.transform == "int8":
        return [(_num_blocks(n, header.block_size) * 2, 2), (n, 1)]
    if header.transform == "json":
        return [(header.payload_nbytes, 1)]
    return [(n * 2, 2)]


def decode_sections(header: FrameHeader, sections: list[memoryview | np.ndarray]) -> Array:
    """The frame's elements, flat, in the original dtype (numpy for raw and json, torch otherwise)."""
    dtype, n = header.dtype, header.element_count
    if header.transform == "raw":
        values = np.frombuffer(sections[0], dtype.numpy)
        if dtype.name == "bool" and n and values.view(np.uint8).max() > 1:
            raise CorruptFrameError(f"frame {header.describe()}: bool payload holds bytes other than 0 and 1")
        return values
    if header.transform == "json":
        return _from_json(header, bytes(sections[0]))
    if header.transform == "int8":
        bits = np.frombuffer(sections[0], np.uint16)
        if bits.size and bits.max() >= _BF16_INFINITY_BITS:
            raise CorruptFrameError(f"frame {header.describe()}: int8 scales are negative or not finite")
        scales = to_torch(bits.view(np.int16)).view(torch.bfloat16)
        values = to_torch(np.frombuffer(sections[1], np.int8))
        return dequantize_int8(scales, values, header.block_size).to(dtype.torch)
    bits = to_torch(np.frombuffer(sections[0], np.int16))
    return bits.view(_CAST_TARGETS[header.transform]).to(dtype.torch)


# int8: blockwise absmax. Each run of `block_size` consecutive elements (C order)
# gets the scale absmax/127, stored as bfloat16 (fp32's range in two bytes).

def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def quantize_int8(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    n = x.numel()
    blocks = _num_blocks(n, block_size)
    if n % block_size:
        padded = x.new_zeros(blocks * block_size)
        padded[:n] = x
        x = padded
    grid = x.view(blocks, block_size)
    absmax = grid.abs().amax(dim=1) if blocks else x.new_zeros(0)
    if blocks and not absmax.max() < float("inf"):  # NaN fails the comparison too
        raise CodecRangeError("codec int8: the tensor holds NaN or infinity, which int8 cannot carry; "
                              "use raw, zstd, fp16 or bf16")
    scales = (absmax / INT8_LEVELS).to(torch.bfloat16).clamp_min_(_SMALLEST_BF16)
    # bfloat16 rounding can make a scale slightly small, so |x/scale| may reach 127.25: clamp.
    q = torch.div(grid, scales.float().unsqueeze(1)).round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
    return scales, q.to(torch.int8).view(-1)[:n]


def dequantize_int8(scales: torch.Tensor, values: torch.Tensor, block: int) -> torch.Tensor:
    scales = scales.float()
    n = values.numel()
    out = values.float()  # then scaled in place: torch's int8*float kernel is several times slower
    full = n // block * block
    out[:full].view(-1, block).mul_(scales[: full // block].unsqueeze(1))
    if full < n:
        out[full:].mul_(scales[-1])
    return out


def _check_cast(source: torch.Tensor, cast: torch.Tensor, codec: str) -> None:
    limit = torch.finfo(cast.dtype).max
    if not source.numel() or source.abs().amax() <= limit:  # the usual case, one fast pass
        return
    # Something is large, infinite or NaN: only values that were finite and became infinite are lost.
    if (torch.isinf(cast) & torch.isfinite(source)).any():
        raise CodecRangeError(f"codec {codec}: values beyond ±{limit:.6g} would become infinity; "
                              "use bf16, int8 or an exact codec")


# json: debugging only. A flat JSON array of the elements (complex numbers as
# [re, im] pairs flattened); floats print with repr, so the round trip is exact.

def _json_text(flat: Array, dtype: DType) -> bytes:
    values = to_numpy(flat)
    if dtype.numpy.kind == "c":
        values = values.view(values.real.dtype)
    return json.dumps(values.tolist(), separators=(",", ":")).encode()


def _from_json(header: FrameHeader, text: bytes) -> np.ndarray:
    dtype = header.dtype
    try:
        values = json.loads(text)
        scalar = dtype.numpy if dtype.numpy.kind != "c" else np.dtype(f"<f{dtype.itemsize // 2}")
        array = np.array(values, dtype=scalar)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CorruptFrameError(f"frame {header.describe()}: unreadable JSON payload ({exc})") from None
    scalars = header.element_count * (2 if dtype.numpy.kind == "c" else 1)
    if array.ndim != 1 or array.size != scalars:
        raise CorruptFrameError(f"frame {header.describe()}: JSON payload holds {array.size} values, "
                                f"expected {scalars}")
    return array.view(dtype.numpy)


# The zstd stage. Contexts are per thread: zstandard's are not safe to share.

_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _contexts.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_contexts, "decompressor"):
        _contexts.decompressor = zstandard.ZstdDecompressor()
    return _contexts.decompressor


def shuffle(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    planes = np.empty((width, data.size // width), np.uint8)
    scalars = data.reshape(-1, width)
    for k in range(width):  # plane by plane: numpy's strided copy is ~6x faster than a transpose here
        planes[k] = scalars[:, k]
    return planes.reshape(-1)


def unshuffle(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    scalars = np.empty((data.size // width, width), np.uint8)
    planes = data.reshape(width, -1)
    for k in range(width):
        scalars[:, k] = planes[k]
    return scalars.reshape(-1)


def compress(sections: list[Section], level: int) -> bytes:
    total = sum(data.nbytes for data, _ in sections)
    stream = _compressor(level).compressobj(size=total)
    out = []
    for i, (data, width) in enumerate(sections):
        out.append(stream.compress(shuffle(data, width)))
        last = i == len(sections) - 1
        out.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH if last else zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    return b"".join(out)


def decompress(header: FrameHeader, payload: memoryview) -> list[np.ndarray]:
    sizes = section_sizes(header)
    total = sum(size for size, _ in sizes)
    try:
        if zstandard.frame_content_size(payload) != total:
            raise CorruptFrameError(f"frame {header.describe()}: zstd payload declares the wrong size")
        data = _decompressor().decompress(payload, max_output_size=max(total, 1))
    except zstandard.ZstdError as exc:
        raise CorruptFrameError(f"frame {header.describe()}: zstd payload does not decompress ({exc})") from None
    if len(data) != total:
        raise CorruptFrameError(f"frame {header.describe()}: zstd payload holds {len(data)} bytes, expected {total}")
    flat = np.frombuffer(data, np.uint8)
    sections, offset = [], 0
    for size, width in sizes:
        part = flat[offset : offset + size]
        sections.append(unshuffle(part, width) if header.shuffled else part)
        offset += size
    return sections
