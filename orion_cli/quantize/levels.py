"""What each level does: bits per tensor, the algorithm, the block size.

Every choice here was measured on the reference model (benchmarks/bench_quantize.py
--sweep; figures and reasoning in docs/quantization.md):

- Linear layers (every MatMul/Gemm, the LM head included) use GPTQ at every
  level: it halved the KL divergence of round-to-nearest at 4 bits and at 2 bits.
- The token embedding has no inputs to calibrate on, so GPTQ does not apply;
  k-quant beat round-to-nearest on it at both widths (quantized alone: KL
  0.00108 vs 0.00116 at 4 bits, 0.0239 vs 0.0354 at 2 bits). HQQ cannot be used there
  (GatherBlockQuantized takes integer zero points only).
- q4: every weight at 4 bits in blocks of 32.
- q3: every weight at 2 or 4 bits, averaging 3.0 bits per weight: the tensors
  whose 2-bit version raises the KL divergence most per weight stay at 4 bits
  (measured on calibration text, one tensor at a time), like llama.cpp's K-quant
  mixes but chosen per model by measurement instead of by tensor name.
- q2: every weight at 2 bits in blocks of 64: blocks of 32 cost 3.06 bits per
  weight with their scales, which misses the 90% size target on small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..config import QuantLevel, QuantMethod, choices
from .graph import WeightSite

METHODS = choices(QuantMethod)
AUTO_LINEAR_METHOD = "gptq"
AUTO_EMBEDDING_METHOD = "kquant"
# MatMulNBits computes with int8 activations: on the reference model q4 decodes about 2x faster than
# with accuracy_level 0 (fp32 activations, no faster than the fp32 model), at the same KL (0.00113 vs 0.00111).
ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class Level:
    name: str
    bits: tuple[int, ...]  # the widths tensors may get
    target_bits: float  # average bits per quantized weight
    block_size: int
    summary: str


LEVELS: dict[str, Level] = {
    "q4": Level("q4", (4,), 4.0, 32, "4 bits per weight, blocks of 32"),
    "q3": Level("q3", (2, 4), 3.0, 32, "2 or 4 bits per tensor by measured sensitivity, 3.0 bits on average, blocks of 32"),
    "q2": Level("q2", (2,), 2.0, 64, "2 bits per weight, blocks of 64"),
}


assert set(LEVELS) == set(choices(QuantLevel)), "config.QuantLevel and LEVELS disagree"


def get_level(name: str) -> Level:
    return LEVELS[name]  # the name was validated against config.QuantLevel


def resolve_methods(method: str) -> tuple[str, str]:
    """(method for linear layers, method for the token embedding)."""
    if method == "auto":
        return AUTO_LINEAR_METHOD, AUTO_EMBEDDING_METHOD
    if method in ("rtn", "kquant"):
        return method, method
    return method, AUTO_EMBEDDING_METHOD  # gptq needs layer inputs, hqq float zero points: neither fits a Gather


def average_bits(sites: Iterable[WeightSite], bits: Mapping[str, int]) -> float:
    sites = list(sites)
    total = sum(s.elements for s in sites)
    return sum(bits[s.node] * s.elements for s in sites) / total if total else 0.0


def allocate_bits(sites: list[WeightSite], gain: Mapping[str, float], target_bits: float,
                  low: int = 2, high: int = 4) -> dict[str, int]:
    """Start every tensor at `low` bits and raise to `high` those that buy the most KL per weight, within the budget.

    `gain` is the KL divergence saved by giving a tensor `high` instead of `low`
    bits (measured with every other tensor in fp32). Greedy by gain per added
    bit, skipping tensors that no longer fit, which is how a knapsack with
    many small items is usually filled.
    """
    total = sum(s.elements for s in sites)
    budget = (target_bits - low) * total
    bits = {s.node: low for s in sites}
    for site in sorted(sites, key=lambda s: (-gain[s.node] / s.elements, s.node)):
        cost = (high - low) * site.elements
        if gain[site.node] > 0 and cost <= budget + 1e-9:
            bits[site.node] = high
            budget -= cost
    return bits
