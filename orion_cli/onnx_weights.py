"""The weights of an ONNX model `orion quantize` wrote, read by checkpoint name, without onnxruntime.

orion quantize names every initializer after the checkpoint tensor it comes
from: float tensors (norms, biases, position tables) keep their checkpoint
names; a weight that became a MatMulNBits or GatherBlockQuantized node is
stored as `NAME.q4` (or .q2, .q8) with `NAME.q4.scales` and
`NAME.q4.zero_points`, in onnxruntime's block layout (quantize/blockwise.py
writes it). This module reads both kinds lazily: the graph is parsed without
its external data, and tensors come from a memory map of the data file, so
a tensor-parallel rank reads only the bytes of its own rows or blocks.

The LM head is named after its role ("lm_head.weight") whatever the model
calls the module, since quantize names head sites that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelDirError

HEAD_WEIGHT = "lm_head.weight"
_QUANTIZED_SUFFIX = re.compile(r"\.q(\d)(\.[a-z_]+)?$")  # NAME.q4, or NAME.q4.lm_head where two sites share NAME


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes from bytes packed along the last axis, lowest bits first (onnxruntime's order)."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class BlockWeight:
    """A [K, N] matmul weight (or [N=vocab, K=hidden] embedding table) quantized in blocks along K.

    Decodes as (code - zero) * scale per block. `zeros` are float: integer zero
    points as stored, or HQQ's float ones. Output rows and whole input blocks
    can be cut out, which is all tensor parallelism needs; the packed bytes of
    a memory map stay unread until codes() or dequantize() is called.
    """

    packed: np.ndarray  # uint8 [N, k_blocks * block_size * bits / 8], lowest bits first
    scales: np.ndarray  # float32 [N, k_blocks]
    zeros: np.ndarray  # float32 [N, k_blocks]
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def rows(self, start: int, stop: int) -> "BlockWeight":
        """Outputs [start, stop)."""
        return BlockWeight(self.packed[start:stop], self.scales[start:stop], self.zeros[start:stop], self.bits,
                           self.block_size, self.k)

    def columns(self, start: int, stop: int, name: str) -> "BlockWeight":
        """Inputs [start, stop): whole blocks only, since a block shares one scale."""
        if start % self.block_size or (stop % self.block_size and stop != self.k):
            raise ModelDirError(f"MODEL_DIR: {name} is quantized in blocks of {self.block_size} inputs; the input "
                                f"features [{start}, {stop}) of this rank cut a block (choose another --tp)")
        first, last = start // self.block_size, -(-stop // self.block_size)
        block_bytes = self.block_size * self.bits // 8
        return BlockWeight(self.packed[:, first * block_bytes: last * block_bytes], self.scales[:, first:last],
                           self.zeros[:, first:last], self.bits, self.block_size, stop - start)

    def codes(self) -> np.ndarray:
        """uint8 [N, k_blocks * block_size], padding included."""
        return unpack_codes(np.asarray(self.packed), self.bits)

    def dequantize(self) -> np.ndarray:
        """[N, K] float32, as the runtime sees it."""
        codes = self.codes().astype(np.float32).reshape(self.n, self.k_blocks, self.block_size)
        values = (codes - self.zeros[:, :, None]) * self.scales[:, :, None]
        return np.ascontiguousarray(values.reshape(self.n, -1)[:, : self.k])

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, float32 scales, packed zero points."""
        return self.packed.nbytes + self.scales.nbytes + self.n * -(-self.k_blocks * self.bits // 8)


@dataclass(frozen=True)
class _Site:
    packed: str
    scales: str
    zero_points: str | None
    bits: int
    block_size: int
    k: int


class _Lazy:
    """A memory-mapped array behind the interface of safetensors' lazy slice (what WeightLoader reads)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def get_shape(self) -> list[int]:
        return list(self.array.shape)

    def __getitem__(self, index):
        import torch

        return torch.from_numpy(np.array(self.array[index]))


class OnnxWeights:
    """Initializers of one ONNX file by name; block-quantized weights by the checkpoint name they replace."""

    def __init__(self, model_file: str | Path):
        import onnx
        from onnx import helper, numpy_helper

        self.path = Path(model_file)
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
            raise ModelDirError(f"{self.path}: not a readable ONNX model ({type(exc).__name__})") from None
        self._arrays: dict[str, np.ndarray] = {}
        maps: dict[str, np.memmap] = {}
        for tensor in model.graph.initializer:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                self._arrays[tensor.name] = numpy_helper.to_array(tensor)
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = self.path.parent / info["location"]
            if location.name not in maps:
                maps[location.name] = np.memmap(location, dtype=np.uint8, mode="r")
            offset = int(info.get("offset", 0))
            count = int(np.prod(tensor.dims, dtype=np.int64))
            raw = maps[location.name][offset: offset + count * dtype.itemsize]
            self._arrays[tensor.name] = raw.view(dtype).reshape(tuple(tensor.dims))
        self._blocks: dict[str, _Site] = {}
        self.foreign: list[str] = []  # quantized nodes whose weights are not named after a checkpoint tensor
        # a tied embedding reads the head's blocks through a Reshape (quantize/graph.py: tied_embedding_node)
        reshaped = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Reshape"}
        for node in model.graph.node:
            if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            gather = node.op_type == "GatherBlockQuantized"
            packed, scales = node.input[0 if gather else 1], node.input[2]
            zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
            match = _QUANTIZED_SUFFIX.search(packed)
            if match is None:  # not named after a checkpoint tensor: not orion quantize's output
                self.foreign.append(packed)
                continue
            name = HEAD_WEIGHT if match.group(2) == ".lm_head" else packed[: match.start()]
            block_size = int(attrs["block_size"])
            k = int(attrs["K"]) if not gather else self._arrays[scales].shape[-1] * block_size
            stored = packed if packed in self._arrays else reshaped.get(packed, packed)
            self._blocks[name] = _Site(stored, scales, zero_points, int(attrs.get("bits", 4)), block_size, k)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self._blocks

    def get_slice(self, name: str) -> _Lazy:
        if name in self._blocks:
            raise ModelDirError(f"MODEL_DIR: {name} is stored quantized; it has no float tensor to read")
        return _Lazy(self._arrays[name])

    def is_quantized(self, name: str) -> bool:
        return name in self._blocks

    def block_sizes(self) -> dict[str, int]:
        """Inputs per quantization block of every block-quantized weight, by checkpoint name."""
        return {name: site.block_size for name, site in self._blocks.items()}

    def blocks(self, name: str) -> BlockWeight:
        """The quantized weight `name` ([N, ...] rows: outputs, or an embedding's vocabulary)."""
        site = self._blocks[name]
        packed = self._arrays[site.packed]
        n = packed.shape[0]
        scales = np.asarray(self._arrays[site.scales], dtype=np.float32).reshape(n, -1)
        if site.zero_points is None:  # symmetric: onnxruntime's default zero point, the middle code
            zeros = np.full(scales.shape, 2 ** (site.bits - 1), dtype=np.float32)
        elif (stored := self._arrays[site.zero_points]).dtype == np.uint8:
            zeros = unpack_codes(np.asarray(stored).reshape(n, -1), site.bits)[:, : scales.shape[1]]
            zeros = zeros.astype(np.float32)
        else:
            zeros = np.asarray(stored, dtype=np.float32).reshape(n, -1)
        return BlockWeight(packed.reshape(n, -1), scales, zeros, site.bits, site.block_size, site.k)

    def close(self) -> None:
        self._arrays.clear()

    def __enter__(self) -> "OnnxWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
