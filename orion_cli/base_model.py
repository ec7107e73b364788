"""Where a transformers causal LM keeps its decoder: the module holding the input embeddings and the layer list.

The serving stage and the layer-wise quantizer both split a model around that
module, and read the checkpoint's keys under its path.
"""

from __future__ import annotations

from typing import Any


def find_base_model(model: Any) -> tuple[str, Any]:
    """(path, module) of `model`'s base model: the child of the CausalLM holding the input embeddings, or further
    down while that child only wraps the one that does (OPT's model.decoder). The path prefixes the checkpoint's
    keys of everything under it."""
    from torch import nn

    embeddings = model.get_input_embeddings()
    path: list[str] = []
    base = model
    while True:
        name, child = next((name, child) for name, child in base.named_children()
                           if any(module is embeddings for module in child.modules()))
        if child is embeddings or (path and any(isinstance(c, nn.ModuleList) for c in base.children())):
            return ".".join(path), base
        path.append(name)
        base = child
