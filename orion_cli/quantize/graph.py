"""The exported graph's weights: where each is used, and what replaces it.

The graph comes without weights (onnx_export/graph.py): every parameter is a graph input
named as in the checkpoint. A weight site is a parameter read as a matmul
operand (MatMul through a Transpose for nn.Linear's [out, in] layout, Gemm
for GPT-2's Conv1D [in, out]) or as the token embedding (a Gather of
input_ids). Sites become com.microsoft MatMulNBits and GatherBlockQuantized
nodes; every other parameter (norms, biases, position tables) becomes an fp32
initializer (onnx_export/parameters.py). All tensor bytes go to one external
data file, written tensor by tensor (ExternalData).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_export.parameters import ExternalData, parameter_inputs
from .blockwise import BlockQuantized

MS_DOMAIN = "com.microsoft"


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


def tied_sites(sites: list[WeightSite]) -> dict[str, WeightSite]:
    """{head node: embedding site} where the LM head multiplies by the token embedding's own table."""
    embeddings = {site.param: site for site in sites if site.role == "embedding"}
    return {site.node: embeddings[site.param] for site in sites
            if site.role == "lm_head" and site.param in embeddings}


class QuantizedGraph:
    """Swaps weight sites' nodes for quantized operators, writing their tensors to `data`.

    Each node is replaced where it stands, found through an index of node names made once; the Transposes
    the swaps leave unused are removed in one pass by finish(). (Searched for, removed and reinserted node by
    node, with every node's inputs scanned per swap, the rewrite grew with sites x nodes: a GraniteMoE of 24
    layers of 32 experts has 1633 sites.)
    """

    def __init__(self, model: onnx.ModelProto, data: ExternalData, accuracy_level: int):
        self.model, self.data, self.accuracy_level = model, data, accuracy_level
        self.position = {node.name: index for index, node in enumerate(model.graph.node)}
        self.initializers = {init.name for init in model.graph.initializer}
        self.transposes: set[str] = set()

    def quantize(self, site: WeightSite, quantized: BlockQuantized) -> str:
        """Swap the site's node for its quantized operator; returns the prefix of its tensors."""
        graph = self.model.graph
        index = self.position[site.node]
        node = graph.node[index]
        # Named after the module (model.layers.3.mlp.down_proj.weight.q4), as a checkpoint names it,
        # so tools that order tensors by layer (orion shard) read them like safetensors names.
        prefix = f"{site.name}.weight.q{quantized.bits}"
        if prefix in self.initializers:
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
            if self.accuracy_level:
                attrs["accuracy_level"] = self.accuracy_level
            new_node = helper.make_node("MatMulNBits", inputs, list(node.output),
                                        name=f"{node.name}_q{quantized.bits}", domain=MS_DOMAIN, **attrs)
            packed = quantized.packed
        graph.initializer.extend([self.data.tensor(prefix, packed),
                                  self.data.tensor(f"{prefix}.scales", quantized.scales),
                                  self.data.tensor(f"{prefix}.zero_points", quantized.zero_points)])
        self.initializers.update((prefix, f"{prefix}.scales", f"{prefix}.zero_points"))
        del self.position[site.node]
        self.position[new_node.name] = index
        graph.node[index].CopyFrom(new_node)
        if site.transpose_node:
            self.transposes.add(site.transpose_node)
        return prefix

    def finish(self) -> None:
        """Remove the Transposes no node reads any more; declare the com.microsoft opset."""
        graph = self.model.graph
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        unused = [n for n in graph.node if n.name in self.transposes and not any(out in used for out in n.output)]
        for node in unused:
            graph.node.remove(node)
        if not any(op.domain == MS_DOMAIN for op in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def tied_embedding_node(model: onnx.ModelProto, site: WeightSite, head_prefix: str, quantized: BlockQuantized) -> None:
    """Swap the embedding's Gather for a GatherBlockQuantized reading the tied head's blocks (`head_prefix`, as
    QuantizedGraph.quantize wrote them): the files hold the table once, as a GGUF holds a tied model's token_embd once.

    The two operators want the same bytes in different shapes: MatMulNBits' B is [N, blocks, bytes per block]
    (anything else fails its PrePack), GatherBlockQuantized's data [N, bytes per row] (its scales are rank 2,
    and it refuses data of another rank). Scales and zero points have one layout for both. So a Reshape joins
    them, which onnxruntime folds into a constant at load."""
    graph = model.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == site.node)
    rows = f"{site.name}.weight.q{quantized.bits}"  # the embedding's name: onnx_weights reads it as such
    shape = numpy_helper.from_array(np.array([quantized.n, -1], dtype=np.int64), f"{rows}.shape")
    graph.initializer.append(shape)
    reshape = helper.make_node("Reshape", [head_prefix, shape.name], [rows], name=f"{node.name}_tied_rows")
    gather = helper.make_node(
        "GatherBlockQuantized", [rows, node.input[1], f"{head_prefix}.scales", f"{head_prefix}.zero_points"],
        list(node.output), name=f"{node.name}_q{quantized.bits}", domain=MS_DOMAIN,
        bits=quantized.bits, block_size=quantized.block_size, gather_axis=0, quantize_axis=1,
    )
    graph.node.remove(node)
    graph.node.insert(index, gather)
    graph.node.insert(index, reshape)
