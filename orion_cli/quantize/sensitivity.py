"""How much each tensor's rounding costs the model's output, on the scale that matters: KL divergence.

A tensor's relative output error (sites.py) says how much its rounding
changes its own layer's output, but not how much that change matters to the
next-token distribution: on the discriminating reference model the LM head's
2-bit rounding changes its output by 0.6% and costs +4.4% perplexity, a
middle layer's q_proj changes its output by 0.3% and costs nothing
measurable. So the allocation's currency is measured KL:

- the LM head: for each format, the KL divergence of the model's next-token
  distribution with the head alone in that format, exactly, on a sample of the
  calibration windows (the final hidden states are at hand);
- the embedding and each decoder layer (a "group"): a copy of the sample's
  hidden states is carried beside the calibration batch from the point where
  the group's weights, all in their cheapest format, change it, through every
  later layer (in full precision, while that layer's weights are loaded anyway)
  to the head; its KL divergence from the reference is the group's. A tensor's
  KL in a format is the group's KL shared out in proportion to the tensors'
  relative output errors (the usual first-order assumption: errors add).

Streams cost (layers^2 / 2) layer passes over the sample (4 windows): for a
22-layer model about two thirds of the calibration forward over 8192 tokens.
Four windows chose the same formats as eight on the discriminating reference
model at every level.
"""

from __future__ import annotations

import logging
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

SAMPLE_WINDOWS = 4
EMBEDDING = "embedding"


def _rows_of(batch: int, keep: int, value: Any) -> Any:
    """`value` with every tensor whose first axis is the batch cut to its first `keep` rows."""
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() and value.shape[0] == batch and batch != keep else value
    if isinstance(value, tuple):
        return tuple(_rows_of(batch, keep, v) for v in value)
    if isinstance(value, list):
        return [_rows_of(batch, keep, v) for v in value]
    if isinstance(value, dict):
        return {k: _rows_of(batch, keep, v) for k, v in value.items()}
    return value


@dataclass
class LayerCall:
    """How a decoder layer was called on the calibration batch, so it can be called again on other rows."""

    args: tuple
    kwargs: dict
    output: Any

    @property
    def hidden_in(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @property
    def hidden_out(self) -> torch.Tensor:
        return self.output[0] if isinstance(self.output, (tuple, list)) else self.output

    def rerun(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        batch, keep = self.hidden_in.shape[0], hidden.shape[0]
        kwargs = _rows_of(batch, keep, self.kwargs)
        # forward, not __call__: the layer's own hooks (which load and drop its weights) must not run again
        if self.args:
            out = layer.forward(hidden, *_rows_of(batch, keep, self.args[1:]), **kwargs)
        else:
            out = layer.forward(**{**kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, (tuple, list)) else out


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other) for [windows, T, vocab] logits, in float64 a window at a
    time."""
    total = 0.0
    for reference, other in zip(reference_logits, logits):
        p_log = torch.log_softmax(reference.double(), -1)
        q_log = torch.log_softmax(other.double(), -1)
        total += float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    return total / len(reference_logits)


def head_kl(model, hidden: torch.Tensor, quantized, reference_logits: torch.Tensor | None = None) -> float:
    """KL divergence of the next-token distribution with the head `quantized` (a BlockQuantized [hidden, vocab])
    instead of the checkpoint's, on final hidden states [windows, T, hidden]."""
    reference_logits = model.logits(hidden) if reference_logits is None else reference_logits
    logits = model.logits(hidden, head_rows=lambda start, stop: torch.from_numpy(
        quantized.dequantize_outputs(start, stop)).T)
    return kl_divergence(reference_logits, logits)


@contextmanager
def weights_swapped(layer: torch.nn.Module, prefix: str, weights: Iterable[tuple[Any, str, bool]]):
    """The layer's parameters replaced by quantized versions for the duration, then restored. `weights`: (a
    BlockQuantized [K, N], its parameter's checkpoint name under `prefix`, whether the module stores it [N, K])."""
    saved = []
    for quantized, name, stored_nk in weights:
        parameter = layer.get_parameter(name[len(prefix):])
        weight = torch.from_numpy(quantized.dequantize())
        weight = weight.T if stored_nk else weight
        if parameter.shape != weight.shape:
            continue  # a weight the module holds in another layout (fused experts): left out of the stream
        saved.append((parameter, parameter.data))
        parameter.data = weight.contiguous()
    try:
        yield
    finally:
        for parameter, original in saved:
            parameter.data = original


def sample_embedding_rows(model, windows: np.ndarray, quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding rows of the sample's tokens, [n, T, hidden], as the checkpoint and as `quantized` (a
    BlockQuantized [hidden, vocab]) store them."""
    ids = torch.from_numpy(np.ascontiguousarray(windows))
    rows, renumbered = model.embedding_rows(ids)  # the unique ids' rows, in increasing id order
    dequantized = torch.from_numpy(quantized.dequantize_outputs(ids=ids.unique().numpy())).T
    return rows[renumbered], dequantized.contiguous()[renumbered]


@dataclass
class Probe:
    """Streams of the sample's hidden states, one per group, each perturbed where its group is."""

    sample: int  # windows of the calibration batch the streams carry
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def verify(self, layer: torch.nn.Module, call: LayerCall) -> bool:
        """Whether running the layer again on the sample's rows gives what the batch gave them (an architecture
        whose layer arguments cannot be cut to the sample would not)."""
        again = call.rerun(layer, call.hidden_in[: self.sample])
        if torch.allclose(again, call.hidden_out[: self.sample], rtol=1e-4, atol=1e-5):
            return True
        self.skipped["all"] = "running a decoder layer again on the sample did not reproduce the batch's rows"
        self.streams.clear()
        return False

    def start_embedding(self, call: LayerCall, rows: torch.Tensor, quantized_rows: torch.Tensor) -> None:
        """Layer 0's input with the embedding rows quantized: the input is (scale x rows + what does not depend
        on them, position embeddings); the scale (1, or Gemma's sqrt(hidden)) is fitted between windows and
        checked, never assumed."""
        hidden = call.hidden_in[: self.sample].float()
        if self.sample < 2:
            self.skipped[EMBEDDING] = "a sample of one window cannot separate rows from positions"
            return
        dh, de = hidden[1:] - hidden[:-1], rows[1:] - rows[:-1]
        scale = float((dh * de).sum() / (de * de).sum().clamp_min(1e-30))
        misfit = float((dh - scale * de).norm() / dh.norm().clamp_min(1e-30))
        if misfit > 1e-3:
            self.skipped[EMBEDDING] = f"layer 0's input is not a scaled embedding plus positions (misfit {misfit:.1e})"
            return
        self.streams[EMBEDDING] = hidden + scale * (quantized_rows - rows)

    def advance(self, layer: torch.nn.Module, call: LayerCall) -> None:
        for name, stream in self.streams.items():
            self.streams[name] = call.rerun(layer, stream)

    def start_layer(self, name: str, layer: torch.nn.Module, call: LayerCall,
                    swapped: Callable[[], Any]) -> None:
        """A stream from this layer's output with its weights as `swapped()` (a context manager) sets them."""
        with swapped():
            self.streams[name] = call.rerun(layer, call.hidden_in[: self.sample])

    def finish(self, final: Callable[[torch.Tensor], torch.Tensor], logits: Callable[[torch.Tensor], torch.Tensor],
               reference_logits: torch.Tensor) -> None:
        """Each stream's KL divergence from the reference."""
        for name, stream in self.streams.items():
            self.measured[name] = kl_divergence(reference_logits, logits(final(stream)))
        self.streams.clear()


@dataclass
class Sensitivity:
    """What was measured, and each tensor's predicted KL in each of its formats."""

    groups: dict[str, float] = field(default_factory=dict)  # a group's KL with its tensors in their cheapest formats
    exact: dict[str, dict[Any, float]] = field(default_factory=dict)  # node -> format -> KL (the LM head)
    skipped: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def group_of(site, layer_of) -> str | None:
        if site.role == "embedding":
            return EMBEDDING
        layer = layer_of(site.param)
        return None if layer is None else f"layer {layer}"

    def predict(self, sites, errors, formats_of, layer_of) -> dict[str, dict[Any, float]]:
        """node -> format -> predicted KL: exact where measured (the head); else the group's KL shared out by
        relative output error. A group not measured (no calibration, or a stream that could not run) gets the
        median KL per unit of error of those that were, or, with none, the relative error itself."""
        errors_in: dict[str, float] = {}
        for site in sites:
            group = self.group_of(site, layer_of)
            if group is not None:
                errors_in[group] = errors_in.get(group, 0.0) + errors[site.node][formats_of[site.node][0]]
        scales = {g: kl / errors_in[g] for g, kl in self.groups.items() if errors_in.get(g, 0.0) > 0}
        fallback = statistics.median_low(scales.values()) if scales else 1.0
        predicted = {}
        for site in sites:
            if site.node in self.exact:
                predicted[site.node] = dict(self.exact[site.node])
                continue
            scale = scales.get(self.group_of(site, layer_of), fallback)
            predicted[site.node] = {f: scale * e for f, e in errors[site.node].items()}
        return predicted

    def criterion(self) -> str:
        if not self.groups and not self.exact:
            return ("relative output error (weight error alone without calibration), one tensor counting as "
                    "much as another: nothing was measured on text")
        return ("KL divergence of the next-token distribution on a calibration sample: exact for the LM head in "
                "each format; for the embedding and each decoder layer measured with its tensors in their "
                "cheapest format and shared out by relative output error; least total within the size budget")

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"groups_kl": {g: float(f"{kl:.4g}") for g, kl in self.groups.items()}}
        if self.exact:
            data["lm_head_kl"] = {str(f): float(f"{kl:.4g}") for by in self.exact.values() for f, kl in by.items()}
        if self.skipped:
            data["not_measured"] = dict(self.skipped)
        return data
