"""The exported graph's parameters become initializers in one external data file.

The graph comes without weights (graph.py): every parameter is a graph input
named as in the checkpoint. ExternalData writes tensor bytes to one file,
tensor by tensor, so no step holds more than the tensor at hand; the helpers
below turn parameter inputs into initializers that point into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper

GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")


def parameter_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The graph inputs that are parameters, and their shapes."""
    params = {}
    for value in model.graph.input:
        if value.name in GRAPH_INPUTS or value.name.startswith("past_key_values"):
            continue
        params[value.name] = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
    return params


class ExternalData:
    """One external data file written tensor by tensor; each tensor is an initializer that points into it."""

    ALIGN = 64  # onnxruntime memory-maps external data; aligned offsets keep every tensor aligned

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")
        self.bytes = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        return self.tensor_from_blocks(name, array.shape, array.dtype, [array])

    def tensor_from_blocks(self, name: str, shape, dtype, blocks) -> onnx.TensorProto:
        """A tensor written from consecutive blocks of its rows (C order), never whole in memory."""
        pad = -self.bytes % self.ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.bytes += pad
        offset = self.bytes
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            self._file.write(block.tobytes())
            self.bytes += block.nbytes
        length = self.bytes - offset
        if length != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: blocks hold {length} bytes, not the {tuple(shape)} {np.dtype(dtype)} declared")
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        proto.dims.extend(shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def parameters_left(model: onnx.ModelProto) -> list[str]:
    """Parameter inputs some node still reads: they become fp32 initializers."""
    used = {name for node in model.graph.node for name in node.input}
    return [name for name in parameter_inputs(model) if name in used]


def parameters_to_initializers(model: onnx.ModelProto, initializers: list[onnx.TensorProto]) -> None:
    """Parameter inputs become these initializers (same names); parameter inputs nothing reads go."""
    graph = model.graph
    graph.initializer.extend(initializers)
    used = {n for node in graph.node for n in node.input}
    taken = {init.name for init in initializers} | {p for p in parameter_inputs(model) if p not in used}
    for value in [v for v in graph.input if v.name in taken]:
        graph.input.remove(value)


def symbolic_cache_dims(model: onnx.ModelProto) -> None:
    """Declare the head and head-size axes of every past_key_values input symbolic.

    optimum's ORTModelForCausalLM starts generation with an empty cache it
    sizes itself: hidden ÷ heads per head, and all attention heads, unless the
    model type is on its lists. For Qwen3, Gemma 2 and OLMo2 that is wrong
    (head_dim is not hidden ÷ heads; grouped-query attention), and onnxruntime
    refuses the empty tensor against a declared size. With these axes symbolic
    the empty tensor passes, the graph's Concat with the first real keys gives
    the right shape, and every later step feeds that shape back. The present
    outputs keep their declared sizes, which the runner reads.
    """
    for value in model.graph.input:
        if value.name.startswith("past_key_values") and len(value.type.tensor_type.shape.dim) == 4:
            dims = value.type.tensor_type.shape.dim
            for axis, label in ((1, "num_key_value_heads"), (3, "head_size")):
                if dims[axis].HasField("dim_value"):
                    dims[axis].ClearField("dim_value")
                    dims[axis].dim_param = label
