"""The onnxruntime engine's fused projections (serve/onnx_fusion.py): the same products, fewer nodes.

A graph made here of MatMulNBits nodes reading one input, quantized by
orion's own round-to-nearest, run by onnxruntime fused and unfused. The
engine's whole load (attention rewrite, fusion, probe) on every tiny model
orion quantize wrote is tested in test_serve_quantized.py, beside them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orion_cli.quantize.blockwise import quantize_rtn
from orion_cli.serve.onnx_fusion import fuse_projections

K = 64


def _projection(name: str, weight: np.ndarray, block_size: int, bias: np.ndarray | None = None):
    """A MatMulNBits node reading "x", and its initializers (as quantize/graph.py writes them)."""
    blocks = quantize_rtn(weight, 4, block_size)
    tensors = [numpy_helper.from_array(blocks.packed, f"{name}.q4"),
               numpy_helper.from_array(blocks.scales, f"{name}.q4.scales"),
               numpy_helper.from_array(blocks.zero_points, f"{name}.q4.zero_points")]
    inputs = ["x", f"{name}.q4", f"{name}.q4.scales", f"{name}.q4.zero_points"]
    if bias is not None:
        tensors.append(numpy_helper.from_array(bias, f"{name}.bias"))
        inputs += ["", f"{name}.bias"]
    node = helper.make_node("MatMulNBits", inputs, [name], name=f"/{name}/MatMul_q4", domain="com.microsoft",
                            K=K, N=weight.shape[1], bits=4, block_size=block_size, accuracy_level=4)
    return node, tensors


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_projections_laid_out_alike_become_one_product_with_the_same_outputs():
    """q and k (blocks of 32) fuse; v (blocks of 64) and a biased projection each differ from them in layout and
    stay alone. Each output is what the unfused graph computes, to the bit."""
    rng = np.random.default_rng(0)
    widths = {"q": 48, "k": 16, "v": 16, "b": 32}
    parts = [_projection("q", rng.normal(size=(K, 48)).astype(np.float32), 32),
             _projection("k", rng.normal(size=(K, 16)).astype(np.float32), 32),
             _projection("v", rng.normal(size=(K, 16)).astype(np.float32), 64),
             _projection("b", rng.normal(size=(K, 32)).astype(np.float32), 32,
                         bias=rng.normal(size=32).astype(np.float32))]
    graph = helper.make_graph(
        [node for node, _ in parts], "projections",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "positions", K])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "positions", width])
         for name, width in widths.items()],
        [tensor for _, tensors in parts for tensor in tensors])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    fused = onnx.ModelProto.FromString(model.SerializeToString())

    assert fuse_projections(fused.graph) == 1
    onnx.checker.check_model(fused)  # still in topological order
    products = [node for node in fused.graph.node if node.op_type == "MatMulNBits"]
    assert sorted(next(a.i for a in node.attribute if a.name == "N") for node in products) == [16, 32, 64]
    x = rng.normal(size=(2, 3, K)).astype(np.float32)
    for ours, reference in zip(_run(fused, x), _run(model, x)):
        np.testing.assert_array_equal(ours, reference)
