"""encode() and decode(): one tensor to one self-describing frame and back."""

from __future__ import annotations

import time

import xxhash

from .errors import CodecError, CodecUsageError, CorruptFrameError, TruncatedFrameError
from .frame import (CODEC_SHUFFLED, CODEC_ZSTD, TRANSFORMS, ChunkInfo, FrameHeader, header_nbytes, pack_header,
                    parse_header)
from .metrics import METRICS, CodecMetrics
from .payload import applied_transform, compress, decode_sections, decompress, encode_sections, section_sizes
from .policy import LINK_CODECS, CodecPolicy, check_codec, check_settings, defaults, split_codec
from .tensors import Array, Source, as_source, to_kind


def encode(tensor, codec: str | CodecPolicy = "raw", *, metrics: CodecMetrics | None = None,
           int8_block_size: int | None = None, zstd_level: int | None = None) -> bytes:
    """A frame holding `tensor` (torch.Tensor or numpy.ndarray), encoded with `codec`.

    `codec` is a name from CODECS, 'auto' (raw when small, else zstd), or a
    CodecPolicy (auto with a link's codec and settings, which then override
    int8_block_size and zstd_level; None means the shipped config's). The frame records the codec it really
    carries: lossy codecs leave non-float tensors exact, and zstd is dropped
    when it does not shrink the payload.
    """
    started = time.perf_counter()
    source = as_source(tensor)
    name, block_size, level = resolve_codec(codec, source.nbytes, int8_block_size, zstd_level)
    frame, header = encode_elements(source, source.elements(0, source.numel), name, block_size, level)
    _record(metrics, "encode", header, started)
    return frame


def decode(frame: bytes | bytearray | memoryview, *, metrics: CodecMetrics | None = None) -> Array:
    """The tensor in `frame`, as the kind (torch or numpy), dtype and shape that was encoded.

    Raw payloads are not copied: the result views `frame` (read-only numpy arrays
    for `bytes`; torch tensors need writable memory, so they view a bytearray or
    writable memoryview and copy from `bytes`). Raises a CodecError subclass for
    anything it cannot vouch for.
    """
    started = time.perf_counter()
    try:
        view = byte_view_of(frame)
        header = parse_header(view)
        if header.chunk and not (header.chunk.count == 1 and header.element_count == header.numel):
            raise CodecUsageError(f"frame {header.describe()}: one chunk of a stream; "
                                  "decode the stream with decode_chunks() or StreamDecoder")
        result = to_kind(decode_payload(view, header), header.torch, header.shape)
    except CodecError as exc:
        (METRICS if metrics is None else metrics).record_error(exc)
        raise
    _record(metrics, "decode", header, started)
    return result


def inspect_frame(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """The verified header of `frame` (codec, dtype, shape, sizes) without decoding its payload."""
    return parse_header(byte_view_of(frame))


def resolve_codec(codec: str | CodecPolicy, nbytes: int, int8_block_size: int | None,
                  zstd_level: int | None) -> tuple[str, int, int]:
    if isinstance(codec, CodecPolicy):
        return codec.choose(nbytes), codec.int8_block_size, codec.zstd_level
    check_codec(codec, LINK_CODECS)
    shipped = defaults()
    int8_block_size = shipped.int8_block_size if int8_block_size is None else int8_block_size
    zstd_level = shipped.zstd_level if zstd_level is None else zstd_level
    check_settings(int8_block_size, zstd_level)
    if codec == "auto":
        codec = CodecPolicy().choose(nbytes)
    return codec, int8_block_size, zstd_level


def encode_elements(source: Source, flat: Array, name: str, block_size: int, zstd_level: int,
                    chunk: ChunkInfo | None = None) -> tuple[bytes, FrameHeader]:
    transform, use_zstd = split_codec(name)
    transform = applied_transform(transform, source.dtype)
    sections = encode_sections(flat, source.dtype, transform, block_size)
    codec_byte = TRANSFORMS[transform]
    parts = [data for data, _ in sections]
    if use_zstd and transform != "json":
        packed = compress(sections, zstd_level)
        if len(packed) < sum(part.nbytes for part in parts):
            parts, codec_byte = [packed], codec_byte | CODEC_ZSTD | CODEC_SHUFFLED
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    count = flat.shape[0]
    header = FrameHeader(
        codec_byte=codec_byte,
        dtype=source.dtype,
        shape=source.shape,
        torch=source.torch,
        block_size=block_size if transform == "int8" else 0,
        original_nbytes=count * source.dtype.itemsize,
        payload_nbytes=sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts),
        payload_checksum=digest.intdigest(),
        header_nbytes=header_nbytes(len(source.shape), chunk is not None),
        chunk=chunk,
    )
    return b"".join([pack_header(header), *parts]), header


def byte_view_of(frame) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        raise CodecUsageError(f"cannot decode a {type(frame).__name__}: pass bytes, bytearray or memoryview") from None
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view.cast("B")


def decode_payload(view: memoryview, header: FrameHeader) -> Array:
    """Check the payload's length and checksum, then turn it into the frame's flat elements."""
    end = header.frame_nbytes
    if len(view) < end:
        raise TruncatedFrameError(f"frame {header.describe()}: {len(view)} bytes, its header promises {end}")
    if len(view) > end:
        raise CorruptFrameError(f"frame {header.describe()}: {len(view) - end} stray bytes after its end")
    payload = view[header.header_nbytes : end]
    if xxhash.xxh3_64_intdigest(payload) != header.payload_checksum:
        raise CorruptFrameError(f"frame {header.describe()}: payload checksum mismatch (damaged in transit?)")
    if header.zstd:
        return decode_sections(header, decompress(header, payload))
    sizes = section_sizes(header)
    if sum(size for size, _ in sizes) != header.payload_nbytes:
        raise CorruptFrameError(f"frame {header.describe()}: payload of {header.payload_nbytes} bytes, "
                                f"expected {sum(size for size, _ in sizes)}")
    sections, offset = [], 0
    for size, _ in sizes:
        sections.append(payload[offset : offset + size])
        offset += size
    return decode_sections(header, sections)


def _record(metrics: CodecMetrics | None, direction: str, header: FrameHeader, started: float) -> None:
    (METRICS if metrics is None else metrics).record(
        direction, header.codec, header.original_nbytes, header.frame_nbytes, time.perf_counter() - started)

