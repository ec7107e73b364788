"""Walking an exported graph: shared by the attention rewrite (its pruning, its shapes) and the rotary fold."""

from __future__ import annotations

import onnx


def nodes_computing(graph: onnx.GraphProto, names: list[str]) -> list[onnx.NodeProto]:
    """The nodes `names` depend on, in the graph's order."""
    producer = {out: node for node in graph.node for out in node.output}
    live: set[int] = set()
    stack = list(names)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(node.input)
    return [node for node in graph.node if id(node) in live]


SLICE_TO_END = 2 ** 31 - 1  # a Slice's end at or past this is the end of the axis (torch exports INT64_MAX)


def unsqueezed(name: str, producer: dict[str, onnx.NodeProto]) -> str:
    """What an Unsqueeze made `name` of, or `name` (the export unsqueezes each scalar afresh for each use)."""
    node = producer.get(name)
    return node.input[0] if node is not None and node.op_type == "Unsqueeze" else name


def declared_dims(graph: onnx.GraphProto, output: str) -> list[int | None]:
    """The dimensions graph output `output` declares, None where symbolic; [] where it has no such output or shape."""
    value = next((o for o in graph.output if o.name == output), None)
    return [dim.dim_value or None for dim in value.type.tensor_type.shape.dim] if value is not None else []
