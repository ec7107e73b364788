"""Quantized projections that read the same input fused into one MatMulNBits, for the onnxruntime engine.

A decoder layer's query, key and value projections all multiply the same
normed hidden state, and so do a gated MLP's gate and up projections. Run
as one MatMulNBits with their blocks side by side, a layer makes four
quantized products instead of seven: fewer dispatches to onnxruntime's
thread pool, one quantization of the input to int8 (accuracy level 4)
instead of one per member, and longer rows for the kernel. On the 88M
Llama of benchmarks/serve_peer.py in orion's q4, a one-row decode step
spent 2.75 ms in MatMulNBits instead of 3.45 (onnxruntime's profiler, 100
steps), and its median went from 3.78 to 3.56 ms (blocks of steps of each
graph alternating in one process; at 8 rows, 11.63 to 11.45 ms).

Only the graph changes. The fused weights are Concat nodes over the
existing initializers, which onnxruntime's constant folding turns into one
initializer at load; the originals, no longer read, are dropped there. So
no file is rewritten, nothing is copied in Python, and a session's resident
set is what it was (TinyLlama-1.1B in orion's q4: 1183 against 1177 MiB
after load, the same peak). The fused product is Split back into the
members' output names, so every consumer is untouched; where
GroupQueryAttention reads exactly the query, keys and values, in that
order, it takes the fused product as its packed input and the Split goes.

Blocks fuse only where they are laid out alike: the same input width, bits,
block size, accuracy level and set of optional inputs (quantize's
per-tensor choice may give the query its own block size; then only keys
and values fuse). Each output row is computed as before, so the logits are
equal to the bit (checked on TinyLlama's q4 and the 88M Llama's).

Float MatMuls are left alone: fused the same way (Concat of their
Transposes), the 88M Llama's fp32 step gained 1.5-3%, inside this
machine's noise, and its session held 120 MiB more.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# MatMulNBits' inputs that are concatenated along their first (output row) axis: B, scales, zero points, bias.
# g_idx (input 4, act-order) maps input channels to groups and cannot be stacked; nodes with it stay alone.
_STACKED_INPUTS = (1, 2, 3, 5)


def fuse_projections(graph: onnx.GraphProto) -> int:
    """Fuse, in place, every group of MatMulNBits nodes reading one input alike; returns how many groups."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        key = _layout(node, initializers)
        if key is not None:
            groups[key].append(node)
    fused = [nodes for nodes in groups.values() if len(nodes) > 1]
    if not fused:
        return 0
    replaced = {id(node) for nodes in fused for node in nodes}
    placed = {id(nodes[0]): _fused(graph, nodes) for nodes in fused}  # in the first member's place
    rewritten = []
    for node in graph.node:
        rewritten.extend(placed.get(id(node), []))
        if id(node) not in replaced:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    _read_packed(graph)
    return len(fused)


def _layout(node: onnx.NodeProto, initializers: dict) -> tuple | None:
    """What a quantized projection must share with its siblings to be fused with them; None for other nodes."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
        return None
    present = [index for index, name in enumerate(node.input) if name][1:]
    if any(index not in _STACKED_INPUTS or node.input[index] not in initializers for index in present):
        return None  # act-order's g_idx, or a weight computed at run time
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tensors = [initializers[node.input[index]] for index in present]
    return (node.input[0], attrs.get("K"), attrs.get("bits", 4), attrs.get("block_size"),
            attrs.get("accuracy_level", 0), tuple(present), tuple((len(t.dims), t.data_type) for t in tensors))


def _fused(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes computing all of `nodes`' outputs at once: their inputs stacked (Concat nodes, which onnxruntime
    folds at load), one MatMulNBits, and a Split back into the members' outputs."""
    first = nodes[0]
    name = f"{first.name}/orion_fused"
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    widths = [next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N") for node in nodes]
    attrs["N"] = sum(widths)
    stacks, inputs = [], [first.input[0]]
    for index, source in enumerate(first.input[1:], start=1):
        if not source:
            inputs.append("")
            continue
        stacked = f"{name}/input{index}"
        stacks.append(helper.make_node("Concat", [node.input[index] for node in nodes], [stacked],
                                       name=f"{stacked}/concat", axis=0))
        inputs.append(stacked)
    product = helper.make_node("MatMulNBits", inputs, [f"{name}/output"], name=name, domain=MS_DOMAIN, **attrs)
    sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}/sizes")
    graph.initializer.append(sizes)
    split = helper.make_node("Split", [product.output[0], sizes.name], [node.output[0] for node in nodes],
                             name=f"{name}/split", axis=-1)
    return stacks + [product, split]


def _read_packed(graph: onnx.GraphProto) -> None:
    """GroupQueryAttention reading exactly a Split's three outputs (query, keys, values) and nothing else reading
    them: the attention takes the unsplit product as its packed input, and the Split goes."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    unneeded = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 3:
            continue
        split = producer.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]) or \
                any(readers[out] != 1 for out in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        unneeded.add(split.name)
    kept = [node for node in graph.node if node.name not in unneeded]
    del graph.node[:]
    graph.node.extend(kept)
