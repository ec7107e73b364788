"""Bytes of tensors, copied from where they lie into a new shard file.

A tensor is a byte range of a source file (safetensors, ONNX external data) or,
for pytorch_model.bin and inline ONNX initializers, bytes produced on demand.
Byte ranges are copied by the kernel (os.copy_file_range, as cp does: no copy
through user space) window by window, and each window is hashed from a
reusable buffer while it is still in the CPU cache; memory stays at one buffer
per writer whatever the tensors' sizes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import ModelDirError

# Large enough that syscalls cost nothing next to the copy, small enough that a
# window just copied is still in the CPU cache when it is hashed.
COPY_CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class SourceTensor:
    """One tensor to place in a shard, and where its bytes come from."""

    name: str
    dtype: str  # safetensors dtype name ("F32", "BF16", ...) or ONNX data type name
    shape: tuple[int, ...]
    nbytes: int
    layer: int | None
    group: int  # shard_plan.GROUP_*
    file: Path | None = None  # bytes are file[start:start + nbytes] ...
    start: int = 0
    load: Callable[[], memoryview] | None = field(default=None, compare=False)  # ... or load()'s result


class SourceFiles:
    """Open, unbuffered handles on source files, one per file, for one writer thread."""

    def __init__(self) -> None:
        self._handles: dict[Path, io.FileIO] = {}

    def get(self, path: Path) -> io.FileIO:
        if path not in self._handles:
            self._handles[path] = io.FileIO(path, "r")
        return self._handles[path]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "SourceFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensor_chunks(tensor: SourceTensor, buffer: bytearray, files: SourceFiles) -> Iterator[memoryview]:
    """The tensor's bytes in pieces; a piece is valid until the next one is asked for."""
    if tensor.load is not None:
        data = tensor.load().cast("B")
        if data.nbytes != tensor.nbytes:
            raise ModelDirError(f"tensor {tensor.name}: {data.nbytes} bytes where {tensor.nbytes} were expected")
        for offset in range(0, tensor.nbytes, len(buffer)):
            yield data[offset:offset + len(buffer)]
        return
    assert tensor.file is not None
    handle = files.get(tensor.file)
    view = memoryview(buffer)
    handle.seek(tensor.start)
    left = tensor.nbytes
    while left:
        count = handle.readinto(view[:min(left, len(view))])
        if not count:
            raise ModelDirError(
                f"{tensor.file}: ends before the bytes of tensor {tensor.name}; the file is truncated"
            )
        left -= count
        yield view[:count]


def write_shard(
    path: Path, prefix: bytes, tensors: Sequence[SourceTensor], advance: Callable[[float], None]
) -> tuple[int, str]:
    """Write `prefix` then each tensor's bytes to `path`; return (bytes written, sha256)."""
    hasher = hashlib.sha256(prefix)
    buffer = bytearray(COPY_CHUNK_BYTES)
    in_kernel = hasattr(os, "copy_file_range")
    with SourceFiles() as files, io.FileIO(path, "w") as out:
        _write_all(out, memoryview(prefix))
        for tensor in tensors:
            if tensor.file is not None and in_kernel:
                if _copy_range(files.get(tensor.file), out, tensor, buffer, hasher, advance):
                    continue
                in_kernel = False  # refused for this pair of files: copy through the buffer from now on
            for chunk in tensor_chunks(tensor, buffer, files):
                hasher.update(chunk)
                _write_all(out, chunk)
                advance(chunk.nbytes)
        written = out.seek(0, os.SEEK_END)
    return written, hasher.hexdigest()


# Errors with which copy_file_range refuses a pair of files (across some filesystems, old kernels).
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def _copy_range(source: io.FileIO, out: io.FileIO, tensor: SourceTensor, buffer: bytearray, hasher,
                advance: Callable[[float], None]) -> bool:
    """Copy a tensor's byte range in the kernel, hashing it; False if the kernel refuses before any byte."""
    view = memoryview(buffer)
    position, end = tensor.start, tensor.start + tensor.nbytes
    while position < end:
        try:
            copied = os.copy_file_range(source.fileno(), out.fileno(), min(len(buffer), end - position), position)
        except OSError as exc:
            if position == tensor.start and exc.errno in _NO_COPY_FILE_RANGE:
                return False
            raise
        if not copied:
            raise ModelDirError(f"{tensor.file}: ends before the bytes of tensor {tensor.name}; the file is truncated")
        # Hash what was just copied while it is still in the page cache and the CPU cache.
        if os.preadv(source.fileno(), [view[:copied]], position) != copied:
            raise ModelDirError(f"{tensor.file}: changed while it was being read")
        hasher.update(view[:copied])
        position += copied
        advance(copied)
    return True


class _Stopped(Exception):
    """Another writer failed or the user interrupted: this one stops at its next window."""


def write_shards(
    jobs: Sequence[tuple[Path, bytes, Sequence[SourceTensor]]],
    advance: Callable[[float], None],
    threads: int,
) -> list[tuple[int, str]]:
    """Write shards on `threads` threads; (bytes, sha256) of each.

    On any failure, or Ctrl-C, every writer stops within one copy window.
    """
    stop = threading.Event()

    def advance_unless_stopped(count: float) -> None:
        if stop.is_set():
            raise _Stopped()
        advance(count)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="orion-shard-writer")
    futures = [pool.submit(write_shard, path, prefix, tensors, advance_unless_stopped) for path, prefix, tensors in jobs]
    try:
        return [future.result() for future in futures]
    except BaseException:
        stop.set()
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)  # quick: writers stop within one window once `stop` is set


def same_bytes(first: SourceTensor, second: SourceTensor) -> bool:
    """Whether two tensors hold identical bytes (read in chunks, never whole)."""
    if (first.nbytes, first.dtype, first.shape) != (second.nbytes, second.dtype, second.shape):
        return False
    size = min(COPY_CHUNK_BYTES, max(first.nbytes, 1))
    with SourceFiles() as files_a, SourceFiles() as files_b:
        pieces_a = _rechunk(tensor_chunks(first, bytearray(size), files_a), size)
        pieces_b = _rechunk(tensor_chunks(second, bytearray(size), files_b), size)
        return all(a == b for a, b in zip(pieces_a, pieces_b, strict=True))


def _rechunk(chunks: Iterator[memoryview], size: int) -> Iterator[bytes]:
    """Fixed-size pieces (the last may be shorter), so two streams can be compared piece by piece."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)


def _write_all(out: io.FileIO, data: memoryview) -> None:
    while data.nbytes:
        count = out.write(data)
        data = data[count:]
