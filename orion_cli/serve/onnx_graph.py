"""What a graph's named values are computed from: shared by the attention rewrite's pruning and the rotary tables."""

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
