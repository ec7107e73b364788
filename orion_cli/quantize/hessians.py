"""Second moments of each linear layer's inputs on calibration text, from the fp32 ONNX model.

GPTQ needs H = 2/n * sum(x x^T) for the input x of every linear layer. The
inputs are exposed as extra graph outputs and accumulated batch by batch.
Layers that read the same tensor (q, k and v; gate and up) share one matrix.
Matrices are collected for a few input tensors at a time, under a memory budget,
so a large model never holds all of them (nor all activations) at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .evaluate import BATCH_WINDOWS, OnnxLM
from .graph import WeightSite

HESSIAN_BUDGET_BYTES = 1 << 30


def site_inputs(model: onnx.ModelProto, sites: list[WeightSite]) -> dict[str, str]:
    """Site node name -> the activation tensor it multiplies."""
    by_name = {node.name: node for node in model.graph.node}
    return {s.node: by_name[s.node].input[0] for s in sites if s.op != "Gather"}


def iter_hessians(model_path: Path, model: onnx.ModelProto, sites: list[WeightSite], windows: np.ndarray,
                  budget_bytes: int = HESSIAN_BUDGET_BYTES) -> Iterator[tuple[str, np.ndarray]]:
    """(activation tensor name, Hessian) pairs, a memory budget's worth per pass over the calibration windows.

    Activations always come from the fp32 model at `model_path` (re-read for each
    pass), never from `model`, which the caller may be quantizing meanwhile.
    """
    inputs = site_inputs(model, sites)  # read now: the caller renames nodes as it quantizes them
    size = {}
    for site in sites:
        if site.op != "Gather":
            size.setdefault(inputs[site.node], site.k)
    return _passes(model_path, size, windows, budget_bytes)


def _passes(model_path: Path, size: dict[str, int], windows: np.ndarray, budget_bytes: int):
    chunk: list[str] = []
    used = 0
    for tensor in size:
        cost = size[tensor] ** 2 * 8
        if chunk and used + cost > budget_bytes:
            yield from _collect(model_path, chunk, windows)
            chunk, used = [], 0
        chunk.append(tensor)
        used += cost
    if chunk:
        yield from _collect(model_path, chunk, windows)


def _collect(model_path: Path, tensors: list[str], windows: np.ndarray):
    probe = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in probe.graph.output}
    for tensor in tensors:
        if tensor not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    # Written beside the original so relative external-data locations still resolve.
    probe_path = Path(model_path).with_name(Path(model_path).stem + ".hessian-probe.onnx")
    onnx.save_model(probe, str(probe_path))
    try:
        lm = OnnxLM(probe_path)
        sums = {t: None for t in tensors}
        count = 0
        for start in range(0, len(windows), BATCH_WINDOWS):
            batch = windows[start : start + BATCH_WINDOWS, :-1]
            values = lm.session.run(tensors, lm.feeds(batch))
            for tensor, value in zip(tensors, values):
                x = value.reshape(-1, value.shape[-1]).astype(np.float64)
                sums[tensor] = x.T @ x if sums[tensor] is None else sums[tensor] + x.T @ x
            count += batch.size
        del lm
    finally:
        probe_path.unlink(missing_ok=True)
    for tensor in tensors:
        yield tensor, sums[tensor] * (2.0 / max(count, 1))
