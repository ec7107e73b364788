"""The source checkpoint's tensors under the names transformers' model gives its parameters.

The exported graph and the meta-device model name parameters as the model's
state_dict does (model.layers.0.mlp.up_proj.weight); a checkpoint usually
uses the same names, but some were saved from the base model alone, without
its prefix (GPT-2's h.0.attn.c_attn.weight for transformer.h.0...).

Reads from safetensors files are plain positioned reads (os.pread) of just
the bytes asked for, converted to float32 at once: a memory map would leave
every page it touched mapped into the process, so resident memory would grow
with the checkpoint however little of it is in use, while read pages stay in
the kernel's page cache, which is not the process's. A 128k-row embedding
is read a row block at a time and never whole in fp32. PyTorch .bin
checkpoints go through CheckpointReader (torch's memory map).

An expert of a stack [experts, out, in] (GraniteMoE's, split into one linear
layer per expert by experts.split_stacked_experts) is named
`<stack>.experts.<e>.weight` and read as row e of `<stack>.weight`.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from ..checkpoint import CheckpointReader
from ..errors import ModelDirError

ROW_BLOCK_BYTES = 64 << 20  # fp32 bytes of one row block read at a time
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


STACKED_EXPERT = re.compile(r"(.+)\.experts\.(\d+)\.weight")


class ModelTensors:
    def __init__(self, reader: CheckpointReader, base_prefix: str = "", flag: str = "--model"):
        self.reader = reader
        self.base_prefix = base_prefix
        self.flag = flag

    def key(self, name: str) -> str:
        """The checkpoint's name for parameter `name` (for an expert of a stack: the stack's)."""
        return self._locate(name)[0]

    def _locate(self, name: str) -> tuple[str, int | None]:
        """(the checkpoint's name for `name`, the expert's index where `name` is one expert of a stack)."""
        key = self._checkpoint_name(name)
        if key is not None:
            return key, None
        stacked = STACKED_EXPERT.fullmatch(name)
        if stacked:
            key = self._checkpoint_name(stacked.group(1) + ".weight")
            if key is not None and len(self._stored_shape(key)) == 3:
                return key, int(stacked.group(2))
        raise ModelDirError(f"{self.flag} {self.reader.model_dir}: the checkpoint has no tensor {name}, "
                            "which the model's config calls for")

    def _checkpoint_name(self, name: str) -> str | None:
        if name in self.reader:
            return name
        prefix = f"{self.base_prefix}." if self.base_prefix else ""
        if prefix and name.startswith(prefix) and name[len(prefix):] in self.reader:
            return name[len(prefix):]
        if prefix and prefix + name in self.reader:
            return prefix + name
        return None

    def __contains__(self, name: str) -> bool:
        try:
            self.key(name)
        except ModelDirError:
            return False
        return True

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        info = self.reader.info(key)
        return info.shape if info is not None else tuple(self.reader.get_slice(key).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        key, expert = self._locate(name)
        shape = self._stored_shape(key)
        return shape if expert is None else shape[1:]

    def full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if not shape:
            return self.reader.get_tensor(self.key(name)).to(torch.float32)
        return self.rows(name, 0, shape[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along its first axis), in float32."""
        key, expert = self._locate(name)
        info = self.reader.info(key)
        if info is None or info.dtype not in DTYPES:
            stored = self.reader.get_slice(key)
            return (stored[start:stop] if expert is None else stored[expert, start:stop]).to(torch.float32)
        shape = info.shape if expert is None else info.shape[1:]
        first = start if expert is None else expert * shape[0] + start  # row of the stack seen as [experts*out, in]
        dtype = DTYPES[info.dtype]
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * torch.empty((), dtype=dtype).element_size()
        length = (stop - start) * row_bytes
        buffer = bytearray(length)
        with open(info.file, "rb", buffering=0) as handle:
            view, done = memoryview(buffer), 0
            while done < length:  # pread may return less than asked on large reads
                got = os.preadv(handle.fileno(), [view[done:]], info.start + first * row_bytes + done)
                if got <= 0:
                    raise ModelDirError(f"{info.file}: ends inside tensor {key}")
                done += got
        values = torch.frombuffer(buffer, dtype=dtype) if length else torch.empty(0, dtype=dtype)
        return values.reshape(stop - start, *shape[1:]).to(torch.float32)

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.full(name)[:, start:stop]

    def weight_kn(self, name: str, stored_nk: bool, start: int, stop: int) -> np.ndarray:
        """Output features [start, stop) of a weight as a [K, stop - start] float32 matmul operand."""
        if stored_nk:
            return np.ascontiguousarray(self.rows(name, start, stop).numpy().T)
        return np.ascontiguousarray(self.columns(name, start, stop).numpy())


def row_blocks(n: int, k: int, budget_bytes: int = ROW_BLOCK_BYTES) -> list[tuple[int, int]]:
    """[start, stop) blocks of `n` output features of length `k`, each at most `budget_bytes` in fp32."""
    size = max(1, budget_bytes // (4 * max(k, 1)))
    return [(start, min(start + size, n)) for start in range(0, n, size)]
