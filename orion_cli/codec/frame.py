"""The frame header: layout, packing, and the checks that make decoding safe.

Layout (little-endian; docs/codec.md has the table):

    0  magic b"\\x89OTF"   4  version   5  flags   6  header length (u16)
    8  codec   9  dtype   10  ndim   11  reserved (0)   12  int8 block size (u32)
    16 original bytes (u64)   24 payload bytes (u64)   32 payload xxh3-64 (u64)
    40 shape (ndim x u64)   [chunk: stream id u64, index u32, count u32,
    element offset u64, element count u64]   zero padding   CRC-32 of all before (u32)

The header length and the trailing CRC-32 sit where every version keeps them,
so a reader verifies the header before trusting its version or any field:
damage inside the header reads as corruption, never as a strange tensor.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from math import prod

from .dtypes import DType, from_code
from .errors import CorruptFrameError, ForeignFrameError, TruncatedFrameError, UnsupportedVersionError

MAGIC = b"\x89OTF"  # a high-bit first byte, like PNG's, so text channels that mangle bytes show up at once
VERSION = 1
FIXED_HEADER_BYTES = 40  # enough to learn a frame's full length: see frame_length()
MAX_NDIM = 64

_FIXED = struct.Struct("<4sBBHBBBBIQQQ")
_DIM = struct.Struct("<Q")
_CHUNK = struct.Struct("<QIIQQ")
_CRC = struct.Struct("<I")

FLAG_TORCH = 0x01  # decode to a torch.Tensor (else a numpy.ndarray)
FLAG_CHUNK = 0x02  # one chunk of a stream (encode_chunks); chunk fields follow the shape
_KNOWN_FLAGS = FLAG_TORCH | FLAG_CHUNK

# The codec byte: low nibble the transform, then two stage bits.
TRANSFORMS = {"raw": 0, "fp16": 1, "bf16": 2, "int8": 3, "json": 4}
_TRANSFORM_NAMES = {code: name for name, code in TRANSFORMS.items()}
CODEC_ZSTD = 0x10  # the payload is one zstd frame
CODEC_SHUFFLED = 0x20  # each payload section was byte-shuffled by its scalar width before zstd
_KNOWN_CODEC_BITS = 0x0F | CODEC_ZSTD | CODEC_SHUFFLED


def codec_name(codec_byte: int) -> str:
    """The user-facing name of a codec byte: 'raw', 'zstd', 'int8+zstd', ..."""
    transform = _TRANSFORM_NAMES[codec_byte & 0x0F]
    if not codec_byte & CODEC_ZSTD:
        return transform
    return "zstd" if transform == "raw" else f"{transform}+zstd"


@dataclass(frozen=True)
class ChunkInfo:
    stream_id: int
    index: int
    count: int
    element_offset: int
    element_count: int


@dataclass(frozen=True)
class FrameHeader:
    codec_byte: int
    dtype: DType
    shape: tuple[int, ...]
    torch: bool
    block_size: int
    original_nbytes: int
    payload_nbytes: int
    payload_checksum: int
    header_nbytes: int
    chunk: ChunkInfo | None = None

    @property
    def codec(self) -> str:
        return codec_name(self.codec_byte)

    @property
    def transform(self) -> str:
        return _TRANSFORM_NAMES[self.codec_byte & 0x0F]

    @property
    def zstd(self) -> bool:
        return bool(self.codec_byte & CODEC_ZSTD)

    @property
    def shuffled(self) -> bool:
        return bool(self.codec_byte & CODEC_SHUFFLED)

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return prod(self.shape)

    @property
    def element_count(self) -> int:
        """Elements this frame's payload carries (a chunk carries part of the tensor)."""
        return self.chunk.element_count if self.chunk else self.numel

    @property
    def frame_nbytes(self) -> int:
        return self.header_nbytes + self.payload_nbytes

    def describe(self) -> str:
        part = f" chunk {self.chunk.index + 1}/{self.chunk.count}" if self.chunk else ""
        return f"{self.codec} {self.dtype.name}{list(self.shape)}{part}"


def header_nbytes(ndim: int, chunked: bool) -> int:
    body = _FIXED.size + _DIM.size * ndim + (_CHUNK.size if chunked else 0) + _CRC.size
    return (body + 7) // 8 * 8  # keeps the payload 8-byte aligned for zero-copy views


def pack_header(header: FrameHeader) -> bytes:
    flags = (FLAG_TORCH if header.torch else 0) | (FLAG_CHUNK if header.chunk else 0)
    parts = [
        _FIXED.pack(MAGIC, VERSION, flags, header.header_nbytes, header.codec_byte, header.dtype.code,
                    len(header.shape), 0, header.block_size, header.original_nbytes, header.payload_nbytes,
                    header.payload_checksum),
        *(_DIM.pack(dim) for dim in header.shape),
    ]
    if header.chunk:
        c = header.chunk
        parts.append(_CHUNK.pack(c.stream_id, c.index, c.count, c.element_offset, c.element_count))
    body = b"".join(parts)
    body += bytes(header.header_nbytes - _CRC.size - len(body))
    return body + _CRC.pack(zlib.crc32(body))


def frame_length(prefix: bytes | bytearray | memoryview) -> int:
    """Total bytes of the frame that starts with `prefix` (at least FIXED_HEADER_BYTES of it).

    For reading frames off a byte stream; decode() still verifies everything.
    """
    view = memoryview(prefix)
    _check_magic(view)
    if len(view) < FIXED_HEADER_BYTES:
        raise TruncatedFrameError(f"frame header: {len(view)} bytes, need {FIXED_HEADER_BYTES} to read its length")
    fields = _FIXED.unpack_from(view)
    return fields[3] + fields[10]


def _check_magic(view: memoryview) -> None:
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise ForeignFrameError(f"not an orion tensor frame: starts with {head!r}, expected {MAGIC!r}")
    if len(head) < len(MAGIC):
        raise TruncatedFrameError(f"frame: {len(view)} bytes, too short to hold a header")


def parse_header(view: memoryview) -> FrameHeader:
    """Verify and read the header at the start of `view` (a byte memoryview of the whole frame)."""
    _check_magic(view)
    if len(view) < 8:
        raise TruncatedFrameError(f"frame: {len(view)} bytes, too short to hold a header")
    length = int.from_bytes(view[6:8], "little")
    if length < header_nbytes(0, False) or length % 8:
        raise CorruptFrameError(f"frame header: impossible header length {length}")
    if len(view) < length:
        raise TruncatedFrameError(f"frame: {len(view)} bytes, shorter than its {length}-byte header")
    (crc,) = _CRC.unpack_from(view, length - _CRC.size)
    if zlib.crc32(view[: length - _CRC.size]) != crc:
        raise CorruptFrameError("frame header: checksum mismatch (damaged in transit?)")

    (_, version, flags, _, codec_byte, dtype_code, ndim, reserved, block_size, original_nbytes,
     payload_nbytes, payload_checksum) = _FIXED.unpack_from(view)
    if version > VERSION:
        raise UnsupportedVersionError(f"frame format version {version}: this orion reads up to version {VERSION}; "
                                      "upgrade orion on this node")
    if version < 1:
        raise CorruptFrameError(f"frame header: invalid version {version}")
    if flags & ~_KNOWN_FLAGS or reserved:
        raise CorruptFrameError(f"frame header: unknown flag bits {flags:#04x} or reserved byte {reserved}")
    if ndim > MAX_NDIM:
        raise CorruptFrameError(f"frame header: {ndim} dimensions, at most {MAX_NDIM}")
    chunked = bool(flags & FLAG_CHUNK)
    if length != header_nbytes(ndim, chunked):
        raise CorruptFrameError(f"frame header: length {length} does not fit {ndim} dimensions")
    shape = tuple(_DIM.unpack_from(view, _FIXED.size + _DIM.size * i)[0] for i in range(ndim))
    end = _FIXED.size + _DIM.size * ndim
    chunk = ChunkInfo(*_CHUNK.unpack_from(view, end)) if chunked else None
    if chunked:
        end += _CHUNK.size
    if any(view[end : length - _CRC.size]):
        raise CorruptFrameError("frame header: non-zero padding")

    header = FrameHeader(codec_byte, from_code(dtype_code), shape, bool(flags & FLAG_TORCH), block_size,
                         original_nbytes, payload_nbytes, payload_checksum, length, chunk)
    _check_consistent(header)
    return header


def _check_consistent(h: FrameHeader) -> None:
    """Fields that only make sense together; a frame that fails came from a broken encoder."""
    transform = h.codec_byte & 0x0F
    if transform not in _TRANSFORM_NAMES or h.codec_byte & ~_KNOWN_CODEC_BITS:
        raise CorruptFrameError(f"frame header: unknown codec byte {h.codec_byte:#04x}")
    if h.shuffled and not h.zstd:
        raise CorruptFrameError("frame header: byte-shuffle flagged without zstd")
    if h.transform == "json" and h.zstd:
        raise CorruptFrameError("frame header: json frames are never compressed")
    if h.transform in ("fp16", "bf16", "int8") and not h.dtype.is_float:
        raise CorruptFrameError(f"frame header: codec {h.codec} on {h.dtype.name} elements")
    if (h.transform == "int8") != (h.block_size > 0):
        raise CorruptFrameError(f"frame header: block size {h.block_size} with codec {h.codec}")
    if h.chunk:
        c = h.chunk
        if not (c.index < c.count and c.element_offset + c.element_count <= h.numel):
            raise CorruptFrameError(f"frame header: chunk {c.index}/{c.count} covering elements "
                                    f"[{c.element_offset}, {c.element_offset + c.element_count}) of {h.numel}")
    if h.original_nbytes != h.element_count * h.dtype.itemsize:
        raise CorruptFrameError(f"frame header: original size {h.original_nbytes} bytes does not match "
                                f"{h.element_count} {h.dtype.name} elements")
