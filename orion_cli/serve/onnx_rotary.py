"""The exported rotary embedding folded into GroupQueryAttention (`do_rotary`), with the graph's own cos/sin tables.

transformers applies rotary positions as `x * cos + rotate_half(x) * sin`,
rotate_half being Concat(Neg(Slice(x, second half)), Slice(x, first half)),
and the export keeps every one of those small operations, per layer, for the
query and the keys: about a tenth of a q4 decode step on the 88M model of
benchmarks/serve_peer.py. GroupQueryAttention can rotate its query and keys
itself from cos/sin tables indexed by position, the positions following from
`seqlens_k` as the static cache's rows do.

The tables are not recomputed from the config: the graph's own cos and sin
(whatever rope scaling the model uses, attention factor included) are
evaluated by onnxruntime for positions 0..max-1, on the part of the graph
that computes them from position_ids (and, where PhiMoE's are sized by the
cache's length and the embeddings' shape, from an empty cache and the graph's
own weights; the tokens must not change them). A table is used only when its rows do
not depend on how many positions were asked for (a rope that rescales with
the sequence's length does), and when each row is two equal halves, as
rotate_half's convention makes them. Anything else keeps the exported
rotary embedding, layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import SLICE_TO_END, nodes_computing, unsqueezed

POSITION_INPUTS = ("position_ids", "input_ids", "attention_mask")
_CHECK_POSITIONS = 16  # the short evaluation a table's first rows are compared with


@dataclass(frozen=True)
class Rotation:
    """`output` = unrotated * cos + rotate_half(unrotated) * sin, then cast to `cast_to` where that is set."""

    unrotated: str
    cos: str
    sin: str
    cast_to: int | None = None  # an onnx.TensorProto data type
    partial: bool = False  # only each head's leading dims are rotated (as many as the tables are wide), the rest passed


def find_rotation(name: str, producer: dict[str, onnx.NodeProto]) -> Rotation | None:
    """The rotation that produces `name`, when it is transformers' rotate_half form: either whole, perhaps
    followed by a Cast back to the model's dtype (OLMo2), or applied to a leading Slice of the heads and
    concatenated with the rest (partial rotary, as Phi, Phi-3, StableLM and GPT-NeoX write it)."""
    node, cast_to = producer.get(name), None
    if node is not None and node.op_type == "Cast":
        cast_to, name = _attribute(node, "to"), node.input[0]
        node = producer.get(name)
    if node is not None and node.op_type == "Concat" and len(node.input) == 2 and _attribute(node, "axis") in (-1, 3):
        rotation = _rotate_half_form(node.input[0], producer)
        rotated, passed = (producer.get(rotation.unrotated) if rotation else None), producer.get(node.input[1])
        if rotated is None or passed is None or rotated.op_type != "Slice" or passed.op_type != "Slice" or \
                rotated.input[0] != passed.input[0]:
            return None
        leading, rest = _last_axis_bounds(rotated, producer), _last_axis_bounds(passed, producer)
        # The leading dims rotated and the rest passed, which is what GroupQueryAttention does. How many is the
        # table's width (Mul with cos broadcasts only so), whether the bound is a constant or cos's own shape
        # (Phi-3's code): it needs only be the same bound for both Slices.
        if leading is None or rest is None or leading[0] != 0 or rest != (leading[1], SLICE_TO_END):
            return None
        return Rotation(rotated.input[0], rotation.cos, rotation.sin, cast_to, partial=True)
    rotation = _rotate_half_form(name, producer)
    return Rotation(rotation.unrotated, rotation.cos, rotation.sin, cast_to) if rotation else None


def _last_axis_bounds(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple | None:
    """(start, end) of a Slice along the last axis of a [batch, heads, positions, head_dim] tensor, step 1, each
    an int where it is a constant, else the name of the scalar it is computed from."""
    bounds = node.input[1:]
    if len(bounds) < 3 or _constant(bounds[2], producer) not in (-1, 3) or \
            (len(bounds) > 3 and _constant(bounds[3], producer) != 1):
        return None
    start, end = (_constant(name, producer) for name in bounds[:2])
    return (unsqueezed(bounds[0], producer) if start is None else start,
            unsqueezed(bounds[1], producer) if end is None else min(end, SLICE_TO_END))


def _constant(name: str, producer: dict[str, onnx.NodeProto]) -> int | None:
    """A one-element integer Constant, perhaps Unsqueezed, as the export writes a Slice's bounds."""
    node = producer.get(unsqueezed(name, producer))
    if node is None or node.op_type != "Constant" or node.attribute[0].name != "value":
        return None
    array = numpy_helper.to_array(node.attribute[0].t)
    return int(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind == "i" else None


def _rotate_half_form(name: str, producer: dict[str, onnx.NodeProto]) -> Rotation | None:
    add = producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    products = [producer.get(i) for i in add.input]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None
    for plain, rotated in (products, products[::-1]):
        for x, cos in ((plain.input[0], plain.input[1]), (plain.input[1], plain.input[0])):
            for turned, sin in ((rotated.input[0], rotated.input[1]), (rotated.input[1], rotated.input[0])):
                if _is_rotate_half(producer.get(turned), x, producer):
                    return Rotation(x, cos, sin)
    return None


def _attribute(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _is_rotate_half(concat: onnx.NodeProto | None, x: str, producer: dict[str, onnx.NodeProto]) -> bool:
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return False
    if _attribute(concat, "axis") not in (-1, 3):
        return False
    negated, first_half = producer.get(concat.input[0]), producer.get(concat.input[1])
    if negated is None or negated.op_type != "Neg" or first_half is None or first_half.op_type != "Slice":
        return False
    second_half = producer.get(negated.input[0])
    return second_half is not None and second_half.op_type == "Slice" and \
        second_half.input[0] == x and first_half.input[0] == x


def rotary_tables(model: onnx.ModelProto, pairs: list[tuple[str, str]], positions: int,
                  base_dir: Path | None = None) -> dict[tuple[str, str], tuple]:
    """{(cos, sin): (cos_cache, sin_cache)}, each [positions, head_dim / 2], for the pairs whose tables are
    positional (see the module's docstring); the others are left out. `base_dir` holds the model's external data,
    for tables whose part of the graph reads a weight."""
    names = sorted({name for pair in pairs for name in pair})
    evaluate = _part_evaluator(model, names, base_dir)
    long, short = evaluate(positions), evaluate(_CHECK_POSITIONS)
    # the tables are the same whatever the tokens (a part that reads the embeddings reads only their shape)
    if long is None or short is None or not _equal(short, evaluate(_CHECK_POSITIONS, token=1)):
        return {}
    tables = {}
    for cos, sin in pairs:
        halves = []
        for name in (cos, sin):
            rows, few = long[name], short[name]
            if rows.size % positions or few.shape[-1] != rows.shape[-1] or rows.shape[-1] % 2:
                break
            rows = rows.reshape(positions, -1)
            half = rows.shape[1] // 2
            if not np.array_equal(rows[:, :half], rows[:, half:]) or \
                    not np.allclose(rows[:_CHECK_POSITIONS], few.reshape(_CHECK_POSITIONS, -1), rtol=0, atol=1e-6):
                break
            halves.append(np.ascontiguousarray(rows[:, :half]))
        else:
            tables[(cos, sin)] = tuple(halves)
    return tables


def _equal(values: dict[str, np.ndarray], others: dict[str, np.ndarray] | None) -> bool:
    return others is not None and all(np.array_equal(values[name], others[name]) for name in values)


def evaluate_at_positions(model: onnx.ModelProto, names: list[str], positions: int,
                          base_dir: Path | None = None) -> dict[str, np.ndarray] | None:
    """`names` computed by onnxruntime from position_ids 0..positions-1, or None when they need more than the
    position inputs, an empty cache and the graph's own weights (a graph input such as the hidden states, say),
    or onnxruntime cannot run that part of the graph."""
    return _part_evaluator(model, names, base_dir)(positions)


def _part_evaluator(model: onnx.ModelProto, names: list[str], base_dir: Path | None):
    """A function of (positions, token) computing `names` on one session over the part of the graph they need;
    it returns None where evaluate_at_positions says."""
    import onnxruntime as ort

    part = _part_computing(model, names)
    caches = {i.name: empty for i in part.graph.input if (empty := _empty_cache(i)) is not None}
    session = None
    if all(name in POSITION_INPUTS or name in caches for name in (i.name for i in part.graph.input)) and \
            _external_data_loaded(part, base_dir):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime raises many kinds; the layer keeps its rotary embedding
            session = None

    def evaluate(positions: int, token: int = 0) -> dict[str, np.ndarray] | None:
        if session is None:
            return None
        feed = {"position_ids": np.arange(positions, dtype=np.int64)[None],
                "input_ids": np.full((1, positions), token, dtype=np.int64),
                "attention_mask": np.ones((1, positions), dtype=np.int64), **caches}
        try:
            values = session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})
        except Exception:  # noqa: BLE001 - as above
            return None
        return dict(zip(names, values))

    return evaluate


def _external_data_loaded(part: onnx.ModelProto, base_dir: Path | None) -> bool:
    """Read the part's weights that live in external data (the embeddings a table's length is taken from, as
    PhiMoE's is) into it; False when there are some and no `base_dir`, or they cannot be read."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in part.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if base_dir is None:
            return False
        try:
            load_external_data_for_tensor(tensor, str(base_dir))
        except (OSError, ValueError):
            return False
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return True


def _empty_cache(graph_input: onnx.ValueInfoProto) -> np.ndarray | None:
    """A past key/value input holding nothing yet, for one sequence: [1, heads, 0, head size], a dimension the
    graph leaves symbolic taken as 1 (only the cache's length can reach a table); None for any other input."""
    if not graph_input.name.startswith("past_key_values."):
        return None
    tensor = graph_input.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
    if len(dims) != 4:
        return None
    return np.zeros((1, dims[1], 0, dims[3]), dtype=helper.tensor_dtype_to_np_dtype(tensor.elem_type))


def _part_computing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` with only the nodes, inputs and initializers `names` are computed from, in graph order."""
    graph = model.graph
    nodes = nodes_computing(graph, names)
    read = {name for node in nodes for name in node.input}
    part = helper.make_graph(nodes, "rotary_tables", [i for i in graph.input if i.name in read],
                             [helper.make_empty_tensor_value_info(name) for name in names],
                             [t for t in graph.initializer if t.name in read])
    return helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)


def table_initializers(tables: dict[tuple[str, str], tuple], prefix: str = "orion_gqa_rotary"):
    """{(cos, sin): (cos_cache name, sin_cache name, width)} and the initializers holding them."""
    names, initializers = {}, []
    for index, (pair, (cos_cache, sin_cache)) in enumerate(tables.items()):
        names[pair] = (f"{prefix}{index}_cos_cache", f"{prefix}{index}_sin_cache", cos_cache.shape[1])
        initializers += [numpy_helper.from_array(cos_cache, names[pair][0]),
                         numpy_helper.from_array(sin_cache, names[pair][1])]
    return names, initializers
