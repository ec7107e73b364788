"""How much calibration `--method auto` can afford on this machine.

Calibration costs two things. Per token: the model's forward pass (2
multiply-adds per weight of every linear layer) plus adding each layer
input's x x^T into its Hessian (2 K^2 per distinct input of width K). Once:
GPTQ's error propagation (about N K^2 multiply-adds per [K, N] weight, and a
K^3 factorization per distinct input), or, for q3, measuring each candidate's
output error (a [K, K] by [K, N] product per width). The machine's speed is
measured on the spot (a float32 matmul), scaled by how much of it each kind of
work attains (measured on Phi-3-mini's shape, docs/quantization.md).

With --method auto, the calibration tokens are cut so the estimate fits
--calibration-minutes; when even CALIBRATION_FLOOR tokens do not fit, linear
layers fall back to round-to-nearest (onnxruntime's C++ kernel, seconds per
billion weights) and q3 measures weight error without activations. An
explicit --method gptq keeps its --calibration-tokens whatever the estimate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from .graph import WeightSite

CALIBRATION_FLOOR = 1024  # fewer tokens than this and GPTQ's Hessians are too noisy to beat round-to-nearest
FALLBACK_LINEAR_METHOD = "rtn"
# Fractions of the measured matmul speed each kind of work reaches, from Phi-3-mini's shape on 2 cores
# (2048 tokens: forward and Hessians 239 s for 27.4 TFLOP, GPTQ 873 s for 51.5 TFLOP at 123 GFLOPS measured);
# they predict TinyLlama's 8192-token run within 15%.
FORWARD_EFFICIENCY = 0.9
GPTQ_EFFICIENCY = 0.45


@dataclass
class CalibrationPlan:
    linear_method: str
    tokens: int  # 0: no calibration pass
    estimated_seconds: float
    matmul_gflops: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["estimated_seconds"] = round(self.estimated_seconds, 1)
        data["matmul_gflops"] = round(self.matmul_gflops, 1)
        return data


def measure_gflops(size: int = 2048, repeats: int = 3) -> float:
    """This machine's float32 matmul speed with torch's threads, best of a few."""
    import torch

    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):  # into one output: a fresh 16 MiB result is a fresh mapping to fault in (heap.py)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


@dataclass
class CalibrationCost:
    per_token_flops: float
    fixed_flops: float
    probe_flops: float = 0.0  # the sensitivity streams (sensitivity.py): forward passes of a fixed sample

    def seconds(self, tokens: int, gflops: float) -> float:
        forward = tokens * self.per_token_flops + (self.probe_flops if tokens else 0.0)
        return (forward / FORWARD_EFFICIENCY + self.fixed_flops / GPTQ_EFFICIENCY) / (gflops * 1e9)


def calibration_cost(sites: Iterable[WeightSite], inputs: dict[str, str], linear_method: str,
                     widths: tuple, layers: int = 0, sample_tokens: int = 0) -> CalibrationCost:
    """`inputs` maps each linear site's node to the activation it reads (shared by q, k, v). With several
    formats, a stream per layer (and the embedding) runs the sample through the layers after it: on average
    (layers + 1) / 2 passes of the model's layer weights over `sample_tokens`."""
    per_token, fixed, forward = 0.0, 0.0, 0.0
    seen: set[str] = set()
    for site in sites:
        if site.op == "Gather":
            continue
        if site.role != "lm_head":
            per_token += 2 * site.elements
            forward += 2 * site.elements
        if inputs[site.node] not in seen:
            seen.add(inputs[site.node])
            per_token += 2 * site.k**2
            if linear_method == "gptq":
                fixed += site.k**3
        if linear_method == "gptq":
            fixed += 2 * site.n * site.k**2 * sum(1 for f in widths if f.bits < 8)  # 8 bits: round-to-nearest
        if len(widths) > 1:
            fixed += 2 * site.n * site.k**2 * (len(widths) + 1)
    probe = forward * sample_tokens * (layers + 1) / 2 if len(widths) > 1 else 0.0
    return CalibrationCost(per_token, fixed, probe)


def plan_calibration(cost: CalibrationCost, *, requested: str, linear_method: str, widths: tuple,
                     tokens: int, minutes: float, window: int, sample_tokens: int) -> CalibrationPlan:
    if linear_method != "gptq" and len(widths) == 1:
        return CalibrationPlan(linear_method, 0, 0.0, 0.0, "no calibration needed")
    gflops = measure_gflops()
    if linear_method != "gptq":  # no Hessians to collect: only the sensitivity streams' sample runs
        chosen = min(tokens, sample_tokens)
        return CalibrationPlan(linear_method, chosen, cost.seconds(chosen, gflops), gflops,
                               f"{chosen} calibration tokens, the sensitivity sample ({linear_method} needs no "
                               "Hessians)")
    if requested != "auto":
        return CalibrationPlan(linear_method, tokens, cost.seconds(tokens, gflops), gflops,
                               f"--method {requested}: {tokens} calibration tokens as configured")
    budget = minutes * 60
    fits = int(((budget * gflops * 1e9 - cost.fixed_flops / GPTQ_EFFICIENCY) * FORWARD_EFFICIENCY
                - cost.probe_flops) / max(cost.per_token_flops, 1.0))
    fits = fits // window * window
    if fits >= min(tokens, CALIBRATION_FLOOR):
        chosen = min(tokens, fits)
        reason = (f"{chosen} calibration tokens" + ("" if chosen == tokens else f" (of {tokens}, cut to fit")
                  + ("" if chosen == tokens else f" {minutes:g} minutes)"))
        return CalibrationPlan(linear_method, chosen, cost.seconds(chosen, gflops), gflops, reason)
    fallback = FALLBACK_LINEAR_METHOD if linear_method == "gptq" else linear_method
    without = CalibrationCost(0.0, 0.0)
    return CalibrationPlan(fallback, 0, without.seconds(0, gflops), gflops,
                           f"calibrating even {CALIBRATION_FLOOR} tokens would take about "
                           f"{cost.seconds(CALIBRATION_FLOOR, gflops) / 60:.0f} minutes, more than "
                           f"{minutes:g}: {fallback} without calibration"
                           + (", sensitivities from weight error alone" if len(widths) > 1 else ""))
