"""How much each weight tensor's quantization costs the model, measured end to end.

The fp32 graph is rewritten so that every quantizable weight is a graph input;
one onnxruntime session then scores any mix of fp32 and dequantized weights
without rebuilding. A tensor's sensitivity is the KL divergence from the fp32
model when only that tensor is quantized, on calibration windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from ..progress import Advance
from .blockwise import BlockQuantized
from .evaluate import CachedReference, OnnxLM
from .graph import WeightSite, stored_array


# Windows of calibration text each tensor is scored on (2048 tokens): two forward passes per tensor
# on this much text keep q3's allocation under half a minute on the reference model.
SENSITIVITY_WINDOWS = 16


def _input_name(index: int) -> str:
    return f"orion.sensitivity.weight.{index}"


class SensitivityProbe:
    """The fp32 model with its weights fed as inputs, and its cached distributions on calibration windows."""

    def __init__(self, model_path: Path, sites: list[WeightSite], windows: np.ndarray):
        self.sites = sites
        graph_model = onnx.load(str(model_path), load_external_data=False)
        base_dir = Path(model_path).parent
        by_name = {node.name: node for node in graph_model.graph.node}
        inits = {init.name: init for init in graph_model.graph.initializer}
        self.base: dict[str, np.ndarray] = {}
        for index, site in enumerate(sites):
            node = by_name[site.transpose_node or site.node]
            slot = 0 if site.op == "Gather" or site.transpose_node else 1
            name = _input_name(index)
            node.input[slot] = name
            stored = stored_array(inits[site.initializer], base_dir)
            self.base[name] = stored
            graph_model.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(stored.shape)))
        # Saved beside the original so its external-data locations still resolve; initializers
        # now unused stay in the file but are never read into the session.
        probe_path = Path(model_path).with_name(Path(model_path).stem + ".sensitivity-probe.onnx")
        used = {name for node in graph_model.graph.node for name in node.input}
        for init in [i for i in graph_model.graph.initializer if i.name not in used]:
            graph_model.graph.initializer.remove(init)
        onnx.save_model(graph_model, str(probe_path))
        try:
            self.lm = OnnxLM(probe_path, extra_inputs=self.base)
        finally:
            probe_path.unlink(missing_ok=True)
        self.reference = CachedReference(self.lm, windows[:SENSITIVITY_WINDOWS], self.base)

    def kl_with(self, index: int, weight: BlockQuantized) -> float:
        """KL divergence from fp32 with site `index` replaced by its dequantized `weight`."""
        site = self.sites[index]
        values = weight.dequantize()
        feeds = dict(self.base)
        feeds[_input_name(index)] = np.ascontiguousarray(values.T) if site.transposed else values
        return self.reference.score(self.lm, feeds).kl_divergence


def measure_gains(probe: SensitivityProbe, candidates: Mapping[str, Mapping[int, BlockQuantized]],
                  low: int, high: int, advance: Advance | Callable[[float], None] = lambda n=1: None
                  ) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """Per site: KL saved by `high` over `low` bits, and the KL at each width."""
    gains: dict[str, float] = {}
    kls: dict[str, dict[int, float]] = {}
    for index, site in enumerate(probe.sites):
        kls[site.node] = {bits: probe.kl_with(index, candidates[site.node][bits]) for bits in (low, high)}
        gains[site.node] = kls[site.node][low] - kls[site.node][high]
        advance(1)
    return gains, kls
