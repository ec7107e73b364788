"""The weights of an exported decoder graph, and swapping them for quantized operators.

A weight site is a node whose weight is a float initializer: every linear layer
(MatMul, or Gemm for GPT-2's Conv1D, including the LM head, which tied models
reach through a Transpose of the embedding) and the token embedding (Gather).
Linear sites become com.microsoft MatMulNBits and the embedding becomes
GatherBlockQuantized; both read the same block layout (see blockwise.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .blockwise import BlockQuantized

MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = (onnx.TensorProto.FLOAT,)


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight: where it is used and its [K, N] shape as a matmul operand."""

    node: str
    op: str  # MatMul | Gemm | Gather
    initializer: str
    transposed: bool  # stored as [N, K] (Gemm transB, or MatMul fed by a Transpose of the initializer)
    transpose_node: str | None  # that Transpose, for tied LM heads
    k: int
    n: int
    role: str  # embedding | lm_head | linear

    @property
    def elements(self) -> int:
        return self.k * self.n

    @property
    def name(self) -> str:
        """A readable id: the node name without the exporter's slashes and op suffix."""
        return self.node.strip("/").rsplit("/", 1)[0].replace("/", ".") if "/" in self.node else self.node


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _float_2d(init: onnx.TensorProto | None) -> bool:
    return init is not None and init.data_type in FLOAT_TYPES and len(init.dims) == 2


def find_weight_sites(model: onnx.ModelProto, vocab_size: int | None) -> list[WeightSite]:
    """Quantizable weights in graph order; the token embedding is the Gather of input_ids over a [vocab, hidden] table."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sites: list[WeightSite] = []
    for node in graph.node:
        if node.op_type == "Gather" and _float_2d(inits.get(node.input[0])) and _attr(node, "axis", 0) == 0:
            rows, cols = inits[node.input[0]].dims
            if (vocab_size is None or rows == vocab_size) and _reads_input_ids(node.input[1], producers):
                sites.append(WeightSite(node.name, "Gather", node.input[0], True, None, cols, rows, "embedding"))
        elif node.op_type == "MatMul":
            weight, transpose = node.input[1], None
            if weight not in inits and weight in producers and producers[weight].op_type == "Transpose":
                candidate = producers[weight]
                if _float_2d(inits.get(candidate.input[0])) and list(_attr(candidate, "perm", [1, 0])) == [1, 0]:
                    transpose, weight = candidate, candidate.input[0]
            if not _float_2d(inits.get(weight)):
                continue
            rows, cols = inits[weight].dims
            k, n = (cols, rows) if transpose else (rows, cols)
            role = "lm_head" if _reaches_logits(node, consumers) else "linear"
            sites.append(WeightSite(node.name, "MatMul", weight, transpose is not None,
                                    transpose.name if transpose else None, k, n, role))
        elif node.op_type == "Gemm" and _float_2d(inits.get(node.input[1])):
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            rows, cols = inits[node.input[1]].dims
            trans_b = bool(_attr(node, "transB", 0))
            k, n = (cols, rows) if trans_b else (rows, cols)
            sites.append(WeightSite(node.name, "Gemm", node.input[1], trans_b, None, k, n, "linear"))
    return sites


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
    """True for the matmul whose result becomes the 'logits' output through shape-only ops."""
    frontier = list(node.output)
    for _ in range(4):
        if "logits" in frontier:
            return True
        frontier = [o for name in frontier for c in consumers.get(name, [])
                    if c.op_type in ("Reshape", "Add", "Cast", "Identity", "Squeeze", "Unsqueeze") for o in c.output]
    return "logits" in frontier


def stored_array(init: onnx.TensorProto, base_dir: str | Path | None) -> np.ndarray:
    """An initializer's values as stored; external data is memory-mapped, not read, and the proto is left as is."""
    if init.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in init.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        return np.memmap(Path(base_dir or ".") / info["location"], dtype=dtype, mode="r",
                         offset=int(info.get("offset", 0)), shape=tuple(init.dims))
    return numpy_helper.to_array(init)


def read_weight(model: onnx.ModelProto, site: WeightSite, base_dir: str | Path | None = None) -> np.ndarray:
    """The site's weight as a [K, N] float32 array (external data is read for this tensor only)."""
    init = next(i for i in model.graph.initializer if i.name == site.initializer)
    array = np.asarray(stored_array(init, base_dir), dtype=np.float32)
    return np.ascontiguousarray(array.T) if site.transposed else np.array(array)


def embedding_block_size(hidden: int, block_size: int) -> int:
    """GatherBlockQuantized needs whole blocks along the hidden axis: the largest power of two <= block_size dividing it."""
    size = block_size
    while size > 16 and hidden % size:
        size //= 2
    if hidden % size:
        raise ValueError(f"hidden size {hidden} is not a multiple of 16")
    return size


def replace_site(model: onnx.ModelProto, site: WeightSite, quantized: BlockQuantized, accuracy_level: int = 0) -> None:
    """Swap the site's node for its quantized operator; its fp32 weight goes once nothing else reads it."""
    graph = model.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == site.node)
    # Named after the module (model.layers.3.mlp.down_proj.weight.q4), as a checkpoint names it,
    # so tools that order tensors by layer (orion shard) read them like safetensors names.
    prefix = f"{site.name}.weight.q{quantized.bits}"
    if any(init.name == prefix for init in graph.initializer):
        prefix = f"{prefix}.{index}"
    packed_name, scales_name, zero_name = prefix, f"{prefix}.scales", f"{prefix}.zero_points"

    if site.op == "Gather":
        packed = quantized.packed.reshape(quantized.n, -1)
        new_node = helper.make_node(
            "GatherBlockQuantized", [packed_name, node.input[1], scales_name, zero_name], list(node.output),
            name=f"{node.name}_q{quantized.bits}", domain=MS_DOMAIN,
            bits=quantized.bits, block_size=quantized.block_size, gather_axis=0, quantize_axis=1,
        )
    else:
        inputs = [node.input[0], packed_name, scales_name, zero_name]
        if site.op == "Gemm" and len(node.input) > 2 and node.input[2]:
            inputs += ["", node.input[2]]  # g_idx unused, then bias
        attrs = dict(K=quantized.k, N=quantized.n, bits=quantized.bits, block_size=quantized.block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new_node = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_q{quantized.bits}",
                                    domain=MS_DOMAIN, **attrs)
        packed = quantized.packed
    graph.initializer.extend([
        numpy_helper.from_array(packed, packed_name),
        numpy_helper.from_array(quantized.scales, scales_name),
        numpy_helper.from_array(quantized.zero_points, zero_name),
    ])
    graph.node.remove(node)
    graph.node.insert(index, new_node)
    if site.transpose_node:
        _remove_if_unused(graph, site.transpose_node)
    _drop_unused_initializers(graph, [site.initializer])
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _remove_if_unused(graph: onnx.GraphProto, node_name: str) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in list(graph.node):
        if node.name == node_name and not any(out in used for out in node.output):
            graph.node.remove(node)
            dead = set(node.output)
            for info in [v for v in graph.value_info if v.name in dead]:
                graph.value_info.remove(info)


def _drop_unused_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name in set(names) and i.name not in used]:
        graph.initializer.remove(init)


def symbolic_cache_heads(model: onnx.ModelProto) -> int:
    """Declare the head axis of every past_key_values input symbolic; return how many were changed.

    optimum-onnx 0.1.0's ORTModelForCausalLM starts generation with an empty
    cache of num_attention_heads heads for model types it does not know use
    grouped-query attention (phi3 among them), which onnxruntime refuses against a
    declared num_key_value_heads. With the axis symbolic the empty tensor passes
    and the graph's Concat with the first real keys gives the right shape.
    """
    changed = 0
    for value in model.graph.input:
        if value.name.startswith("past_key_values") and len(value.type.tensor_type.shape.dim) == 4:
            dim = value.type.tensor_type.shape.dim[1]
            if dim.HasField("dim_value"):
                dim.ClearField("dim_value")
                dim.dim_param = "num_key_value_heads"
                changed += 1
    return changed
