"""The rotary tables GroupQueryAttention is given are the graph's own cos/sin, and only when they are positional.

serve/onnx_rotary.py evaluates the part of the graph that computes cos and
sin from position_ids. These graphs are built by hand so each refusal has
one cause; tests/test_quantize_models.py checks the fold on every exported
architecture against the exported graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orion_cli.serve.onnx_rotary import evaluate_at_positions, find_rotation, rotary_tables

HALF = 4  # head_dim 8
INV_FREQ = (1.0 / 10000 ** (np.arange(HALF) / HALF)).astype(np.float32)


def rope_graph(frequencies: np.ndarray, scale_by_length: bool = False) -> onnx.ModelProto:
    """cos/sin [1, positions, 2 * len(frequencies)] of position_ids, as transformers' rotary module computes them
    (angles concatenated with themselves); with `scale_by_length` the angles grow with the number of positions,
    as a rope that rescales with the sequence's length does."""
    nodes = [helper.make_node("Cast", ["position_ids"], ["positions"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["positions", "last_axis"], ["column"]),
             helper.make_node("Mul", ["column", "frequencies"], ["angles"])]
    if scale_by_length:
        nodes += [helper.make_node("Shape", ["position_ids"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["length"]),
                  helper.make_node("Cast", ["length"], ["length_float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["angles", "length_float"], ["scaled"])]
    angles = "scaled" if scale_by_length else "angles"
    nodes += [helper.make_node("Concat", [angles, angles], ["doubled"], axis=-1),
              helper.make_node("Cos", ["doubled"], ["cos"]), helper.make_node("Sin", ["doubled"], ["sin"])]
    initializers = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
                    numpy_helper.from_array(frequencies, "frequencies"),
                    numpy_helper.from_array(np.array(1, dtype=np.int64), "one")]
    graph = helper.make_graph(
        nodes, "rope", [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "positions"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("cos", "sin")], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # onnxruntime 1.31 reads <= 13


def test_a_positional_table_is_the_graphs_own_cos_and_sin_at_each_position():
    tables = rotary_tables(rope_graph(INV_FREQ), [("cos", "sin")], 100)
    cos_cache, sin_cache = tables[("cos", "sin")]
    angles = np.arange(100, dtype=np.float32)[:, None] * INV_FREQ
    assert cos_cache.shape == sin_cache.shape == (100, HALF)
    np.testing.assert_allclose(cos_cache, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin_cache, np.sin(angles), atol=1e-6)


def test_a_table_whose_rows_change_with_the_sequences_length_is_not_used():
    model = rope_graph(INV_FREQ, scale_by_length=True)
    assert evaluate_at_positions(model, ["cos", "sin"], 100) is not None  # refused by the check, not by a failure
    assert rotary_tables(model, [("cos", "sin")], 100) == {}


def test_a_table_that_is_not_two_equal_halves_is_not_used():
    """rotate_half pairs dimension i with i + head_dim / 2, which is what two equal halves of cos encode; an
    interleaved rope's tables are not of that form."""
    model = rope_graph(INV_FREQ)
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    concat.input[1] = "angles_shifted"
    model.graph.node.insert(list(model.graph.node).index(concat), helper.make_node(
        "Add", ["angles", "frequencies"], ["angles_shifted"]))
    assert evaluate_at_positions(model, ["cos", "sin"], 100) is not None
    assert rotary_tables(model, [("cos", "sin")], 100) == {}


def test_a_table_computed_from_a_graph_input_is_not_evaluated():
    """Only position inputs, an empty cache and the graph's own weights may feed the tables: any other input
    (the hidden states, say) means they are not a function of position alone, and the graph keeps its rotary
    embedding."""
    model = rope_graph(INV_FREQ)
    frequencies = next(i for i in model.graph.initializer if i.name == "frequencies")
    model.graph.initializer.remove(frequencies)
    model.graph.input.append(helper.make_tensor_value_info("frequencies", TensorProto.FLOAT, [HALF]))
    assert evaluate_at_positions(model, ["cos", "sin"], 100) is None
    assert rotary_tables(model, [("cos", "sin")], 100) == {}


def with_nodes_before(model: onnx.ModelProto, consumer_output: str, nodes: list, inputs=()) -> onnx.ModelProto:
    """`model` with `nodes` inserted before the node writing `consumer_output`, and graph `inputs` added."""
    graph = model.graph
    index = next(i for i, node in enumerate(graph.node) if consumer_output in node.output)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.input.extend(inputs)
    return model


def test_a_table_that_changes_with_the_tokens_is_not_used():
    """input_ids may reach the tables only through their shape (PhiMoE sizes its tables by the embeddings'); a
    table whose values move with the tokens is refused."""
    model = rope_graph(INV_FREQ)
    cast = next(node for node in model.graph.node if node.op_type == "Cast")
    cast.output[0] = "position_floats"
    model = with_nodes_before(model, "column", [
        helper.make_node("Cast", ["input_ids"], ["token_floats"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["position_floats", "token_floats"], ["positions"])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "positions"])])
    assert evaluate_at_positions(model, ["cos", "sin"], 100) is not None
    assert rotary_tables(model, [("cos", "sin")], 100) == {}


def test_a_table_sized_by_the_cache_and_a_weight_in_external_data_is_computed(tmp_path):
    """PhiMoE computes its tables for as many positions as the cache and the prompt hold (read off the past's
    shape), and its frequencies here live in external data, as a quantized model's weights do: the table is
    computed with an empty cache and the weight read from `base_dir`, and refused without it."""
    from onnx.external_data_helper import convert_model_to_external_data

    model = rope_graph(INV_FREQ)
    mul = next(node for node in model.graph.node if node.op_type == "Mul")
    mul.input[0] = "shifted"
    model = with_nodes_before(model, "angles", [
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
        helper.make_node("Gather", ["past_shape", "two"], ["past_length"]),
        helper.make_node("Cast", ["past_length"], ["past_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["column", "past_float"], ["shifted"])],
        [helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "heads", "past", 8])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(2, dtype=np.int64), "two"))
    convert_model_to_external_data(model, location="model.onnx_data", size_threshold=0)
    onnx.save(model, tmp_path / "model.onnx")
    model = onnx.load(tmp_path / "model.onnx", load_external_data=False)

    assert rotary_tables(model, [("cos", "sin")], 100) == {}  # no base_dir: the frequencies cannot be read
    cos_cache, sin_cache = rotary_tables(model, [("cos", "sin")], 100, base_dir=tmp_path)[("cos", "sin")]
    angles = np.arange(100, dtype=np.float32)[:, None] * INV_FREQ
    np.testing.assert_allclose(cos_cache, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin_cache, np.sin(angles), atol=1e-6)


def partial_rotation(rotated: tuple, passed: tuple) -> dict[str, onnx.NodeProto]:
    """The nodes (by output) of partial rotary as the export writes it: Concat(rotate(x[..., a:b]), x[..., c:d]),
    each bound an Unsqueezed Constant, or, where it is a name, that computed scalar Unsqueezed (Phi-3's code
    slices at cos's width, read off its shape)."""
    nodes = []

    def constant(value) -> str:
        name = f"c{len(nodes)}"
        if isinstance(value, str):
            nodes.append(helper.make_node("Unsqueeze", [value, "zero"], [name]))
            return name
        nodes.append(helper.make_node("Constant", [], [f"{name}.scalar"],
                                      value=numpy_helper.from_array(np.array(value, dtype=np.int64))))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}.scalar", "zero"], [name]))
        return name

    def last_axis_slice(source: str, start: int, end: int, out: str) -> None:
        nodes.append(helper.make_node("Slice", [source, constant(start), constant(end), constant(3), constant(1)],
                                      [out]))

    half = 8  # rotate_half's own bounds are not what is checked here
    last_axis_slice("x", *rotated, "rot")
    last_axis_slice("x", *passed, "pass")
    last_axis_slice("rot", half, 2 ** 63 - 1, "second_half")
    last_axis_slice("rot", 0, half, "first_half")
    nodes += [helper.make_node("Neg", ["second_half"], ["negated"]),
              helper.make_node("Concat", ["negated", "first_half"], ["turned"], axis=-1),
              helper.make_node("Mul", ["rot", "cos"], ["plain"]), helper.make_node("Mul", ["turned", "sin"], ["spun"]),
              helper.make_node("Add", ["plain", "spun"], ["rotated"]),
              helper.make_node("Concat", ["rotated", "pass"], ["query"], axis=-1)]
    return {out: node for node in nodes for out in node.output}


def test_partial_rotary_is_found_only_as_the_leading_dims_rotated_and_the_rest_passed():
    """GroupQueryAttention rotates the leading 2 x width dims of each head and passes the rest (StableLM's 16 of
    64); a graph rotating other dims, or passing fewer than the rest, keeps its exported rotary embedding."""
    found = find_rotation("query", partial_rotation((0, 16), (16, 2 ** 63 - 1)))
    assert (found.unrotated, found.cos, found.sin, found.partial) == ("x", "cos", "sin", True)
    assert find_rotation("query", partial_rotation((16, 32), (32, 2 ** 63 - 1))) is None
    assert find_rotation("query", partial_rotation((0, 16), (24, 2 ** 63 - 1))) is None
    assert find_rotation("query", partial_rotation((0, 16), (16, 48))) is None
    assert find_rotation("query", partial_rotation((0, "width"), ("width", 2 ** 63 - 1))).partial
    assert find_rotation("query", partial_rotation((0, "width"), ("other_width", 2 ** 63 - 1))) is None
