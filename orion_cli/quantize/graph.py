"""The exported graph's weights: where each is used, and what replaces it.

The graph comes without weights (export.py): every parameter is a graph input
named as in the checkpoint. A weight site is a parameter read as a matmul
operand (MatMul through a Transpose for nn.Linear's [out, in] layout, Gemm
for GPT-2's Conv1D [in, out]) or as the token embedding (a Gather of
input_ids). Sites become com.microsoft MatMulNBits and GatherBlockQuantized
nodes; every other parameter (norms, biases, position tables) becomes an fp32
initializer. All tensor bytes go to one external data file, written tensor by
tensor (ExternalData), so no step holds more than the tensor at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper

from .blockwise import BlockQuantized

MS_DOMAIN = "com.microsoft"
GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class WeightSite:
    """One quantizable use of a parameter: the node, and the weight's [K, N] shape as a matmul operand."""

    node: str
    op: str  # MatMul | Gemm | Gather
    param: str  # the parameter (checkpoint tensor) name
    stored_nk: bool  # the checkpoint stores it [N, K] (nn.Linear; the embedding [vocab, hidden])
    transpose_node: str | None  # the Transpose between the parameter and its MatMul
    k: int
    n: int
    role: str  # embedding | lm_head | linear

    @property
    def elements(self) -> int:
        return self.k * self.n

    @property
    def name(self) -> str:
        """A readable id: the module path (model.layers.3.mlp.down_proj), or the parameter for the head."""
        module = self.param.rsplit(".", 1)[0]
        return "lm_head" if self.role == "lm_head" else module


def parameter_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The graph inputs that are parameters, and their shapes."""
    params = {}
    for value in model.graph.input:
        if value.name in GRAPH_INPUTS or value.name.startswith("past_key_values"):
            continue
        params[value.name] = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
    return params


def find_weight_sites(model: onnx.ModelProto, excluded: set[str] = frozenset()) -> list[WeightSite]:
    """Quantizable uses of parameters, in graph order (`excluded` parameters, e.g. MoE routers, are left out)."""
    graph = model.graph
    params = parameter_inputs(model)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sites: list[WeightSite] = []
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in params and _attr(node, "axis", 0) == 0:
            rows, cols = params[node.input[0]]
            if _reads_input_ids(node.input[1], producers):
                sites.append(WeightSite(node.name, "Gather", node.input[0], True, None, cols, rows, "embedding"))
        elif node.op_type == "MatMul" and node.input[1] in producers:
            transpose = producers[node.input[1]]
            param = transpose.input[0] if transpose.op_type == "Transpose" else None
            if param in params and len(params[param]) == 2 and list(_attr(transpose, "perm", [1, 0])) == [1, 0] \
                    and param not in excluded:
                rows, cols = params[param]
                role = "lm_head" if _reaches_logits(node, consumers) else "linear"
                sites.append(WeightSite(node.name, "MatMul", param, True, transpose.name, cols, rows, role))
        elif node.op_type == "Gemm" and node.input[1] in params and node.input[1] not in excluded:
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            rows, cols = params[node.input[1]]
            trans_b = bool(_attr(node, "transB", 0))
            k, n = (cols, rows) if trans_b else (rows, cols)
            sites.append(WeightSite(node.name, "Gemm", node.input[1], trans_b, None, k, n, "linear"))
    return sites


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _reads_input_ids(indices: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """True when a Gather's indices are the input_ids (perhaps reshaped): the token embedding, not positions."""
    for _ in range(6):
        if indices == "input_ids":
            return True
        node = producers.get(indices)
        if node is None or node.op_type not in ("Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten"):
            return False
        indices = node.input[0]
    return False


def _reaches_logits(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True for the matmul whose result becomes the 'logits' output through elementwise or shape-only ops."""
    frontier = list(node.output)
    for _ in range(6):
        if "logits" in frontier:
            return True
        frontier = [o for name in frontier for c in consumers.get(name, [])
                    if c.op_type in ("Reshape", "Add", "Cast", "Identity", "Squeeze", "Unsqueeze", "Div", "Mul", "Tanh")
                    for o in c.output]
    return "logits" in frontier


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


def quantized_node(model: onnx.ModelProto, site: WeightSite, quantized: BlockQuantized, data: ExternalData,
                   accuracy_level: int) -> None:
    """Swap the site's node for its quantized operator, its tensors written to `data`."""
    graph = model.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == site.node)
    # Named after the module (model.layers.3.mlp.down_proj.weight.q4), as a checkpoint names it,
    # so tools that order tensors by layer (orion shard) read them like safetensors names.
    prefix = f"{site.name}.weight.q{quantized.bits}"
    if any(init.name == prefix for init in graph.initializer):
        prefix = f"{prefix}.{site.role}"
    if site.op == "Gather":
        packed = quantized.packed.reshape(quantized.n, -1)
        new_node = helper.make_node(
            "GatherBlockQuantized", [prefix, node.input[1], f"{prefix}.scales", f"{prefix}.zero_points"],
            list(node.output), name=f"{node.name}_q{quantized.bits}", domain=MS_DOMAIN,
            bits=quantized.bits, block_size=quantized.block_size, gather_axis=0, quantize_axis=1,
        )
    else:
        inputs = [node.input[0], prefix, f"{prefix}.scales", f"{prefix}.zero_points"]
        if site.op == "Gemm" and len(node.input) > 2 and node.input[2]:
            inputs += ["", node.input[2]]  # g_idx unused, then bias
        attrs = dict(K=quantized.k, N=quantized.n, bits=quantized.bits, block_size=quantized.block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new_node = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_q{quantized.bits}",
                                    domain=MS_DOMAIN, **attrs)
        packed = quantized.packed
    graph.initializer.extend([data.tensor(prefix, packed), data.tensor(f"{prefix}.scales", quantized.scales),
                              data.tensor(f"{prefix}.zero_points", quantized.zero_points)])
    graph.node.remove(node)
    graph.node.insert(index, new_node)
    if site.transpose_node:
        _remove_if_unused(graph, site.transpose_node)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _remove_if_unused(graph: onnx.GraphProto, node_name: str) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in list(graph.node):
        if node.name == node_name and not any(out in used for out in node.output):
            graph.node.remove(node)


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
