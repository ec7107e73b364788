"""Chunked frames for large tensors: the sender never holds the whole encoded tensor,
the receiver holds the output tensor and one chunk.

Each chunk is a complete frame (own checksums) carrying a run of elements of the
C-order flattening, plus the stream's id, the chunk's index and the chunk count,
so a lost, repeated, reordered or foreign chunk is detected.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Iterator

import numpy as np

from .core import byte_view_of, decode_payload, encode_elements, resolve_codec
from .errors import CodecError, CodecUsageError, CorruptFrameError, TruncatedFrameError
from .frame import ChunkInfo, FrameHeader, parse_header
from .metrics import METRICS, CodecMetrics
from .policy import CodecPolicy, defaults
from .tensors import Array, as_source, to_kind, to_numpy


def encode_chunks(tensor, codec: str | CodecPolicy = "raw", chunk_bytes: int | None = None, *,
                  metrics: CodecMetrics | None = None, int8_block_size: int | None = None,
                  zstd_level: int | None = None) -> Iterator[bytes]:
    """Frames of about `chunk_bytes` tensor bytes each (at least one frame, even for an empty tensor).

    Settings left None take configs/default.yaml's `codec:` values.

    Arguments are checked at the call; frames are produced as the iterator is consumed.
    """
    source = as_source(tensor)
    name, block_size, level = resolve_codec(codec, source.nbytes, int8_block_size, zstd_level)
    chunk_bytes = defaults().stream_chunk_bytes if chunk_bytes is None else chunk_bytes
    if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
        raise CodecUsageError(f"chunk_bytes {chunk_bytes!r}: must be a positive number of bytes")
    per_chunk = max(1, chunk_bytes // source.dtype.itemsize)
    if name.startswith("int8"):  # whole blocks per chunk, so chunking does not change the numbers
        per_chunk = max(block_size, per_chunk // block_size * block_size)
    count = max(1, -(-source.numel // per_chunk))
    stream_id = int.from_bytes(os.urandom(8), "little")

    def frames() -> Iterator[bytes]:
        for index in range(count):
            started = time.perf_counter()
            start = index * per_chunk
            stop = min(source.numel, start + per_chunk)
            chunk = ChunkInfo(stream_id, index, count, start, stop - start)
            frame, header = encode_elements(source, source.elements(start, stop), name, block_size, level, chunk)
            (METRICS if metrics is None else metrics).record(
                "encode", header.codec, header.original_nbytes, header.frame_nbytes, time.perf_counter() - started)
            yield frame

    return frames()


class StreamDecoder:
    """Reassembles a tensor from encode_chunks() frames fed in order: feed() each, then result()."""

    def __init__(self, *, metrics: CodecMetrics | None = None) -> None:
        self.metrics = METRICS if metrics is None else metrics
        self._first: FrameHeader | None = None
        self._out: np.ndarray | None = None
        self._next_index = 0
        self._next_offset = 0

    @property
    def done(self) -> bool:
        return self._first is not None and self._next_index == self._first.chunk.count

    def feed(self, frame: bytes | bytearray | memoryview) -> None:
        started = time.perf_counter()
        try:
            view = byte_view_of(frame)
            header = parse_header(view)
            self._check_order(header)
            flat = decode_payload(view, header)
            if self._out is None:
                self._out = np.empty(header.numel, header.dtype.numpy)
            offset = header.chunk.element_offset
            self._out[offset : offset + header.element_count] = to_numpy(flat)
        except CodecError as exc:
            self.metrics.record_error(exc)
            raise
        self._first = self._first or header
        self._next_index += 1
        self._next_offset += header.element_count
        self.metrics.record("decode", header.codec, header.original_nbytes, header.frame_nbytes,
                            time.perf_counter() - started)

    def result(self) -> Array:
        if not self.done:
            got, of = self._next_index, self._first.chunk.count if self._first else "?"
            error = TruncatedFrameError(f"chunk stream: ended after {got} of {of} chunks")
            self.metrics.record_error(error)
            raise error
        first = self._first
        return to_kind(self._out, first.torch, first.shape)

    def _check_order(self, header: FrameHeader) -> None:
        chunk, first = header.chunk, self._first
        if chunk is None:
            raise CorruptFrameError(f"chunk stream: frame {header.describe()} is a whole frame, not a chunk")
        if first is None:
            if chunk.index != 0 or chunk.element_offset != 0:
                raise CorruptFrameError(f"chunk stream: starts with chunk {chunk.index + 1}/{chunk.count}; "
                                        "earlier chunks missing")
        else:
            if chunk.stream_id != first.chunk.stream_id:
                raise CorruptFrameError(f"chunk stream: frame {header.describe()} belongs to another stream")
            if self.done:
                raise CorruptFrameError(f"chunk stream: frame {header.describe()} after the last chunk")
            same = (header.dtype, header.shape, header.torch, chunk.count) == (
                first.dtype, first.shape, first.torch, first.chunk.count)
            if not same or chunk.index != self._next_index or chunk.element_offset != self._next_offset:
                raise CorruptFrameError(f"chunk stream: got {header.describe()} at element {chunk.element_offset}, "
                                        f"expected chunk {self._next_index + 1}/{first.chunk.count} "
                                        f"at element {self._next_offset} (missing, repeated or reordered)")
        if chunk.index == chunk.count - 1 and chunk.element_offset + chunk.element_count != header.numel:
            raise CorruptFrameError(f"chunk stream: the last chunk ends at element "
                                    f"{chunk.element_offset + chunk.element_count} of {header.numel}")


def decode_chunks(frames: Iterable[bytes | bytearray | memoryview], *, metrics: CodecMetrics | None = None) -> Array:
    """The tensor sent by encode_chunks(), read frame by frame."""
    decoder = StreamDecoder(metrics=metrics)
    for frame in frames:
        decoder.feed(frame)
    return decoder.result()
