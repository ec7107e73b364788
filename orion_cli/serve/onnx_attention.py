"""The exported graph's attention replaced by onnxruntime's GroupQueryAttention over a static KV cache.

optimum's export computes attention as torch decomposed it: each layer
concatenates its past keys and values with the new position (the presents
are new tensors every step, so a step copies the whole cache), repeats the
key/value heads, and runs MatMul, mask, Softmax, MatMul. On the 88M model of
benchmarks/serve_peer.py, 8 rows at 2000 cached positions took 149 ms a step
against 17.5 ms at 40. com.microsoft's GroupQueryAttention (stock
onnxruntime) writes the new positions into a cache buffer bound as both past
and present, and attends with each row's own length (`seqlens_k`), so a
step's cost no longer grows with copying.

The rewrite works on the graph alone (no weights are read), layer by layer,
anchored on what every decoder-with-past export has: the Concat producing
`present.N.key` / `present.N.value`. From there it finds the scores MatMul
(query times the repeated keys), the Softmax after it (with the mask Add and
nothing else between), the MatMul with the values, and the Transpose and
Reshape back to [batch, positions, hidden] that the output projection reads.
The scale is the product of the scalar constants multiplying query and keys.
Anything else on that path (logit softcapping, say) and the model keeps its
exported attention. The mask Add is dropped for the op's own causal mask, so
the rewrite is only for rotary models (onnx_serving.py checks the config):
ALiBi's bias, for one, rides on that Add. Sliding windows become the node's local_window_size,
layer by layer. The rotary embedding is folded into the node where
onnx_rotary.py recognizes it (the op rotates query and keys itself, from the
graph's own cos/sin tables); elsewhere it stays as exported and the node
takes the rotated query and keys. Where query, keys or values are a
projection's output split into heads and nothing else, the op reads the
projection's output itself (its own layout), so the split and its undoing
go too. Positions come from position_ids (a graph
without that input derives them from the cache's length, which a static
buffer no longer gives, and keeps its exported attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import SLICE_TO_END, declared_dims, nodes_computing, unsqueezed
from .onnx_rotary import find_rotation, rotary_tables, table_initializers

SEQLENS = "seqlens_k"  # int32 [batch]: each row's length after this step, minus one
TOTAL = "total_sequence_length"  # int32 scalar: the longest row's length after this step
_PASS_THROUGH = {"Unsqueeze", "Expand", "Reshape", "Transpose", "Mul"}  # repeat_kv, the keys' transpose, scaling
_BSH_SHAPE = np.array([0, 0, -1], dtype=np.int64)  # Reshape's 0 keeps batch and positions: [B, S, heads*head_dim]


_SCALAR_OPS = {"Cast": lambda a: a, "Sqrt": math.sqrt, "Reciprocal": lambda a: 1 / a, "Div": lambda a, b: a / b,
               "Mul": lambda a, b: a * b}


class NotRewritten(Exception):
    """Why a graph keeps its exported attention."""


@dataclass
class Heads:
    query: int
    key_value: int
    size: int


def rewrite_attention(model: onnx.ModelProto, heads: Heads, windows: dict[int, int] | None = None,
                      rotary_positions: int | None = None, base_dir: Path | None = None) -> onnx.ModelProto:
    """A copy of `model` (loaded without its external data) with every layer's attention one GroupQueryAttention
    node, `windows[layer]` its sliding window where it has one; raises NotRewritten saying why not. With
    `rotary_positions`, layers whose rotary embedding is recognized have it folded into the node, with tables
    for that many positions (onnx_rotary.py), computed with the weights in `base_dir` where they need any."""
    if heads.size % 8:
        raise NotRewritten(f"a head size of {heads.size}: GroupQueryAttention takes multiples of 8")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    names = {i.name for i in graph.input}
    layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
    if not layers:
        raise NotRewritten("the graph has no past key/value inputs")
    if "position_ids" not in names:
        raise NotRewritten("the graph takes no position_ids")
    key_dims, value_dims = (declared_dims(graph, f"present.{layers[0]}.{what}") for what in ("key", "value"))
    key_size, value_size = (dims[-1] if dims else None for dims in (key_dims, value_dims))
    if key_size and value_size and key_size != value_size:
        raise NotRewritten(f"keys of head size {key_size} and values of {value_size} (multi-head latent "
                           "attention): GroupQueryAttention takes one head size")
    graph_view = _Graph(graph)
    if rotary_positions:
        graph_view.fold_rotary(model, layers, rotary_positions, base_dir)
    for layer in layers:
        graph_view.replace_layer(layer, heads, (windows or {}).get(layer))
    graph.input.extend([helper.make_tensor_value_info(SEQLENS, onnx.TensorProto.INT32, ["batch_size"]),
                        helper.make_tensor_value_info(TOTAL, onnx.TensorProto.INT32, [])])
    graph.initializer.append(numpy_helper.from_array(_BSH_SHAPE, "orion_gqa_bsh_shape"))
    _prune(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {i.name: i for i in graph.initializer}
        self.rotary_tables: dict[tuple[str, str], tuple[str, str, int]] = {}  # (cos, sin) -> names and width

    def fold_rotary(self, model: onnx.ModelProto, layers: list[int], positions: int, base_dir: Path | None) -> None:
        """Tables for the cos/sin pairs the layers' keys are rotated with, where they are positional."""
        pairs = []
        for layer in layers:
            rotation = find_rotation(self._concat_of(f"present.{layer}.key", f"past_key_values.{layer}.key").input[1],
                                     self.producer)
            if rotation is not None and (rotation.cos, rotation.sin) not in pairs:
                pairs.append((rotation.cos, rotation.sin))
        self.rotary_tables, initializers = table_initializers(rotary_tables(model, pairs, positions, base_dir))
        self.graph.initializer.extend(initializers)

    def replace_layer(self, layer: int, heads: Heads, window: int | None) -> None:
        key_concat = self._concat_of(f"present.{layer}.key", f"past_key_values.{layer}.key")
        value_concat = self._concat_of(f"present.{layer}.value", f"past_key_values.{layer}.value")
        scores = self._matmul_reading(f"present.{layer}.key", layer, "keys")
        weighted = self._matmul_reading(f"present.{layer}.value", layer, "values")
        masked = self._only(scores.output[0], "Add", layer, "the scores go to the mask Add")
        softmax = self._only(masked.output[0], "Softmax", layer, "the masked scores go to Softmax (no softcapping)")
        probabilities = weighted.input[0]
        if probabilities != softmax.output[0]:  # torch's SDPA export: NaN rows (all masked) set to 0 first
            where = self.producer.get(probabilities)
            if where is None or where.op_type != "Where" or softmax.output[0] not in where.input:
                raise NotRewritten(f"layer {layer}: the values are weighted by something other than the Softmax")
        weighted_values = self._viewed_as_heads(weighted.output[0], heads) or weighted.output[0]
        transpose = self._only(weighted_values, "Transpose", layer, "the weighted values are transposed back")
        reshape = self._only(transpose.output[0], "Reshape", layer, "and reshaped to [batch, positions, hidden]")
        query, query_scale = self._unscaled(scores.input[0], heads.size)
        keys_scale = self._scale_on_path(scores.input[1], layer, {query: heads.size})
        scale = query_scale * keys_scale
        key, rotary_inputs, rotary_attributes = key_concat.input[1], [], {}
        query_rotation, key_rotation = find_rotation(query, self.producer), find_rotation(key, self.producer)
        pair = (key_rotation.cos, key_rotation.sin) if key_rotation else None
        prefix = f"/orion_gqa/layers.{layer}"
        if query_rotation and pair == (query_rotation.cos, query_rotation.sin) and pair in self.rotary_tables \
                and query_rotation.cast_to == key_rotation.cast_to and query_rotation.partial == key_rotation.partial \
                and _rotates(self.rotary_tables[pair][2], heads.size, key_rotation.partial):
            query, key = (self._cast(rotation, f"{prefix}/{what}") for rotation, what in
                          ((query_rotation, "query"), (key_rotation, "key")))
            rotary_inputs = list(self.rotary_tables[pair][:2])
            rotary_attributes = {"do_rotary": 1, "rotary_interleaved": 0}
        inputs = [self._to_bsh(query, f"{prefix}/query", heads.size), self._to_bsh(key, f"{prefix}/key", heads.size),
                  self._to_bsh(value_concat.input[1], f"{prefix}/value", heads.size),
                  key_concat.input[0], value_concat.input[0], SEQLENS, TOTAL, *rotary_inputs]
        attention = helper.make_node(
            "GroupQueryAttention", inputs, [reshape.output[0], key_concat.output[0], value_concat.output[0]],
            name=f"{prefix}/GroupQueryAttention", domain="com.microsoft", num_heads=heads.query,
            kv_num_heads=heads.key_value, scale=scale,
            local_window_size=window or -1,  # a query at i sees keys after i - window, as transformers' masks
            **rotary_attributes)
        for node in (key_concat, value_concat, reshape):
            self.graph.node.remove(node)
        self.graph.node.append(attention)

    def _cast(self, rotation, prefix: str) -> str:
        """The unrotated tensor, cast as the rotated one was (the op rotates in the cache's dtype)."""
        if rotation.cast_to is None:
            return rotation.unrotated
        cast = f"{prefix}/unrotated_cast"
        self.graph.node.append(helper.make_node("Cast", [rotation.unrotated], [cast], name=cast, to=rotation.cast_to))
        return cast

    def _concat_of(self, present: str, past: str) -> onnx.NodeProto:
        node = self.producer.get(present)
        if node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != past:
            raise NotRewritten(f"{present} is not Concat({past}, new positions)")
        return node

    def _matmul_reading(self, present: str, layer: int, what: str) -> onnx.NodeProto:
        """The one MatMul that reads `present` (through repeat_kv and the keys' transpose) as its right side."""
        found, frontier = [], [present]
        while frontier:
            name = frontier.pop()
            for node in self.consumers.get(name, []):
                if node.op_type == "MatMul" and node.input[1] == name:
                    found.append(node)
                elif node.op_type in _PASS_THROUGH and node.input[0] == name:
                    frontier.append(node.output[0])
        if len(found) != 1:
            raise NotRewritten(f"layer {layer}: {len(found)} matrix products read the cached {what}, not one")
        return found[0]

    def _only(self, name: str, op: str, layer: int, expected: str) -> onnx.NodeProto:
        users = [n for n in self.consumers.get(name, []) if n.op_type not in ("Shape",)]
        if len(users) != 1 or users[0].op_type != op:
            raise NotRewritten(f"layer {layer}: expected {expected}, found {[n.op_type for n in users]}")
        return users[0]

    def _viewed_as_heads(self, name: str, heads: Heads) -> str | None:
        """The output of a Reshape of `name` ([batch, heads, positions, head_dim]) to that same shape, which is no
        change of layout (Falcon's code views its attention output so before the transpose back), if that is
        `name`'s one use."""
        users = [n for n in self.consumers.get(name, []) if n.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != "Reshape" or users[0].input[0] != name:
            return None
        shape = self.producer.get(users[0].input[1])
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            return None
        parts = [self._scalar(unsqueezed(part, self.producer)) for part in shape.input]
        return users[0].output[0] if parts[1] == heads.query and parts[3] == heads.size else None

    def _unscaled(self, name: str, head_size: int) -> tuple[str, float]:
        """(X, c) where `name` is X times the constant c, X the query: its last dimension is the head size."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Mul":
            for data, factor in ((0, 1), (1, 0)):
                value = self._scalar(node.input[factor], {node.input[data]: head_size})
                if value is not None:
                    return node.input[data], value
        return name, 1.0

    def _scale_on_path(self, name: str, layer: int, last_dims: dict[str, int]) -> float:
        scale, seen = 1.0, 0
        while (node := self.producer.get(name)) is not None and node.op_type in _PASS_THROUGH and seen < 8:
            if node.op_type == "Mul":
                factors = [self._scalar(i, last_dims) for i in node.input]
                if factors.count(None) != 1:
                    raise NotRewritten(f"layer {layer}: the keys are multiplied by something not constant")
                scale *= next(f for f in factors if f is not None)
                name = node.input[factors.index(None)]
            else:
                name = node.input[0]
            seen += 1
        return scale

    def _scalar(self, name: str, last_dims: dict[str, int] | None = None) -> float | None:
        """The value of a scalar computed from constants (Constant, Cast, Sqrt, Div, Mul, Reciprocal) and from the
        last dimension of a tensor in `last_dims` read off its Shape: torch's SDPA export computes its default
        scale, 1/sqrt(head size), from the query's shape."""
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            array = numpy_helper.to_array(tensor)
            return float(array.reshape(-1)[0]) if array.size == 1 else None
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            array = numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
            return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None
        shape = self.producer.get(node.input[0]) if node.op_type in ("Slice", "Gather") else None
        if shape is not None and shape.op_type == "Shape":
            known = (last_dims or {}).get(shape.input[0])
            return float(known) if known is not None and not shape.attribute and self._reads_last(node) else None
        if node.op_type not in _SCALAR_OPS:  # before evaluating inputs: a walk up the whole graph is exponential
            return None
        args = [self._scalar(i, last_dims) for i in node.input]
        return None if any(a is None for a in args) else _SCALAR_OPS[node.op_type](*args)

    def _reads_last(self, node: onnx.NodeProto) -> bool:
        """True when `node` takes a shape's last element: Gather of index -1, or Slice from -1 to the end."""
        if node.op_type == "Gather":
            return self._scalar(node.input[1]) == -1
        bounds = [self._scalar(i) if i else None for i in node.input[1:]]
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 and node.input[3] else 0.0
        steps = bounds[3] if len(bounds) > 3 and node.input[4] else 1.0
        return starts == -1 and ends is not None and ends >= SLICE_TO_END and axes == 0 and steps == 1

    def _to_bsh(self, name: str, prefix: str, head_size: int) -> str:
        """[batch, heads, positions, head_dim] as GroupQueryAttention reads it: [batch, positions, heads*head_dim].
        Where `name` is the projection's output split into heads (Reshape to [batch, positions, -1, head_dim],
        Transpose), that is the projection's output itself: the split and its undoing are skipped."""
        split = self._split_source(name, head_size)
        if split is not None:
            return split
        transposed, flat = f"{prefix}/bsnh", f"{prefix}/bsh"
        self.graph.node.append(helper.make_node("Transpose", [name], [transposed], name=transposed, perm=[0, 2, 1, 3]))
        self.graph.node.append(helper.make_node("Reshape", [transposed, "orion_gqa_bsh_shape"], [flat], name=flat))
        return flat

    def _split_source(self, name: str, head_size: int) -> str | None:
        """X when `name` is Transpose(Reshape(X, [X's batch, X's positions, -1 or heads, head_size]), 0 2 1 3) and X
        comes from a matrix product, a bias Add or a Slice of fused projections ([batch, positions, features])."""
        transpose = self.producer.get(name)
        if transpose is None or transpose.op_type != "Transpose" or \
                list(helper.get_attribute_value(transpose.attribute[0])) != [0, 2, 1, 3]:
            return None
        reshape = self.producer.get(transpose.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            return None
        source, shape = self.producer.get(reshape.input[0]), self.producer.get(reshape.input[1])
        if source is None or source.op_type not in ("MatMul", "MatMulNBits", "Add", "Slice") or shape is None or \
                shape.op_type != "Concat" or len(shape.input) != 4:
            return None
        dims = [self._dim_of(part) for part in shape.input[:2]]
        heads, size = (self._scalar(unsqueezed(part, self.producer)) for part in shape.input[2:])
        if None in dims or dims[0][0] != dims[1][0] or [axis for _, axis in dims] != [0, 1] or \
                size != head_size or heads is None or not (heads == -1 or heads > 0):
            return None
        return reshape.input[0]

    def _dim_of(self, name: str) -> tuple[str, float] | None:
        """(T, i) when `name` is Unsqueeze(Gather(Shape(T), i)): one dimension of T as a 1-element tensor."""
        gather = self.producer.get(unsqueezed(name, self.producer))
        if gather is None or gather.op_type != "Gather":
            return None
        shape = self.producer.get(gather.input[0])
        axis = self._scalar(gather.input[1])
        return (shape.input[0], axis) if shape is not None and shape.op_type == "Shape" and axis is not None else None


def _rotates(table_width: int, head_size: int, partial: bool) -> bool:
    """Whether GroupQueryAttention can rotate as the graph does: its tables, [positions, width], turn the leading
    2 * width dims of each head (all of them, or some with the rest, perhaps none, passed: partial rotary), width a
    multiple of 8 (onnxruntime refuses others when it runs)."""
    return table_width % 8 == 0 and (2 * table_width <= head_size if partial else 2 * table_width == head_size)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes no graph output depends on (the replaced attention, the mask built for it), put the rest in
    topological order, and drop graph inputs nothing reads."""
    ordered, done = [], set(i.name for i in graph.input) | {i.name for i in graph.initializer} | {""}
    pending = nodes_computing(graph, [o.name for o in graph.output])
    while pending:
        left = []
        for node in pending:
            if all(i in done for i in node.input):
                ordered.append(node)
                done.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise NotRewritten("the rewritten graph has a cycle")
        pending = left
    del graph.node[:]
    graph.node.extend(ordered)
    read = {i for node in ordered for i in node.input}
    for value in [v for v in graph.input if v.name not in read]:
        graph.input.remove(value)
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)
