"""Second moments of each linear layer's inputs on calibration text, one decoder layer at a time.

GPTQ and q3's sensitivities need H = 2/n * sum(x x^T) over the inputs x of
every linear layer. transformers' own model runs over the calibration
windows layer by layer (layerwise.py); a pre-hook on each linear layer adds
its input into the layer's matrix, layers that read the same tensor (q, k and
v; gate and up) share one, and when a decoder layer has run, its matrices are
handed to the caller (who quantizes that layer's weights) and dropped. Only
one layer's matrices and the batch's activations are ever in memory. The LM
head's matrix comes from the final hidden states. An MoE expert sees only
the tokens routed to it; one that no calibration token reached gets none.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .layerwise import LayerwiseModel, is_linear
from .sensitivity import LayerCall


class Hessian:
    def __init__(self, width: int):
        self.sum = torch.zeros((width, width), dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.sum * (2.0 / self.tokens)


LayerCallback = Callable[[int, dict[str, Hessian], torch.nn.Module, LayerCall], None]


def collect_hessians(model: LayerwiseModel, windows: np.ndarray, parameters: set[str],
                     on_layer: LayerCallback) -> tuple[Hessian, torch.Tensor]:
    """Run `windows` through `model` in one batch; call on_layer(index, {parameter: Hessian}, layer, call) as
    each decoder layer finishes (for the `parameters` in it that saw a token; the layer is loaded and may be
    run again, which collects nothing), and return the Hessian of the LM head's input with that input (the
    final hidden states)."""
    modules = {name + ".weight": module for name, module in model.model.named_modules() if is_linear(module)}
    hessians: dict[str, Hessian] = {}
    last: dict[str, object] = {}
    hooks = []

    def hook_for(name: str):
        def before(module, args):
            if last.get("paused"):
                return
            x = args[0]
            if last.get("input") is not x:  # else the same tensor as the previous linear layer's: share
                last["input"], last["hessian"] = x, Hessian(x.shape[-1])
                last["hessian"].add(x)
            hessians[name] = last["hessian"]
        return before

    def finished(index, layer, call):
        last.clear()
        last["paused"] = True
        try:
            on_layer(index, {name: hessians.pop(name) for name in list(hessians)}, layer, call)
        finally:
            last.clear()

    for name in parameters:
        if name in modules and model.layer_of(name) is not None:
            hooks.append(modules[name].register_forward_pre_hook(hook_for(name)))
    try:
        hidden = model.final_hidden(windows, visit=finished)
    finally:
        for hook in hooks:
            hook.remove()
    head = Hessian(hidden.shape[-1])
    head.add(hidden)
    return head, hidden
