"""What each level does: a size budget, the formats a tensor may take, and how they are chosen.

Every choice here was measured (benchmarks/bench_quantize.py --sweep and
--frontier; figures and reasoning in docs/quantization.md):

- Linear layers (every MatMul/Gemm, the LM head included) use GPTQ: it halved
  the KL divergence of round-to-nearest at 4 bits and at 2 bits.
- The token embedding has no inputs to calibrate on, so GPTQ does not apply;
  k-quant beat round-to-nearest on it at both widths. HQQ cannot be used there
  (GatherBlockQuantized takes integer zero points only).
- A level is a size budget, not a width: every tensor is quantized in each of
  the level's formats (bits, block size), and the allocation (allocate.py)
  picks one per tensor so that the model's predicted KL divergence is least
  while every byte of the ONNX files stays within the budget, a fraction of the
  fp32 weights' bytes. That is how llama.cpp's K-quant mixes give the output
  tensor 6 bits inside "Q2_K", but chosen per model by measurement instead of by
  tensor name. On the discriminating reference model the LM head and the
  embedding are where 2 bits hurt most (each alone at 2 bits: +4.4% and +3.8%
  perplexity; a whole decoder layer's tensors much less).
- The budgets keep within the users' size table (q4 <= 0.18x, q3 <= 0.14x,
  q2 <= 0.10x): q4 0.16x and q3 0.13x, about llama.cpp's Q4_0 and Q3_K sizes
  on the discriminating reference model, and q2 0.10x.
- The formats were measured on that model (bench_quantize.py --frontier): more
  of them let the budget go where it pays (q2 with 2/64 and 4/64 only: +8.3%
  perplexity at 0.095x; with 2/128, 2/64 and 4/128: +5.9% at 0.0996x, the same
  as with 4/64 too; q4 with 8/64 for the tensors that need it: +0.13% at 0.160x,
  against +0.34% without). Each format is one more GPTQ pass per tensor, so
  q3 and q2 keep three: TinyLlama's q2 with four took 1361 s against about
  590 s for one. The calibration plan (budget.py) counts the passes and the
  sensitivity streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..config import QuantLevel, QuantMethod, choices

METHODS = choices(QuantMethod)

AUTO_LINEAR_METHOD = "gptq"
AUTO_EMBEDDING_METHOD = "kquant"
# MatMulNBits computes with int8 activations: on the reference model q4 decodes about 2x faster than
# with accuracy_level 0 (fp32 activations, no faster than the fp32 model), at the same KL (0.00113 vs 0.00111).
ACCURACY_LEVEL = 4


class Format(NamedTuple):
    bits: int
    block: int

    def __str__(self) -> str:
        return f"{self.bits}/{self.block}"


@dataclass(frozen=True)
class Level:
    name: str
    formats: tuple[Format, ...]  # what a tensor may get, cheapest first
    size_budget: float  # every byte of the ONNX files over the fp32 weights' bytes
    summary: str

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted({f.bits for f in self.formats}))

    def with_block(self, block: int | None) -> tuple[Format, ...]:
        """The formats with --block-size imposed (one format per width), or as the level has them."""
        if block is None:
            return self.formats
        return tuple(Format(bits, block) for bits in self.bits)


LEVELS: dict[str, Level] = {
    "q4": Level("q4", (Format(4, 64), Format(4, 32), Format(8, 64)), 0.16,
                "4 bits per weight in blocks of 64 or 32, 8 where measured sensitivity pays for it; "
                "within 0.16x of the fp32 size"),
    "q3": Level("q3", (Format(2, 128), Format(4, 128), Format(4, 64)), 0.13,
                "2 or 4 bits per tensor in blocks of 128 or 64 by measured sensitivity; within 0.13x of the fp32 size"),
    "q2": Level("q2", (Format(2, 128), Format(2, 64), Format(4, 128)), 0.10,
                "2 bits per weight in blocks of 128 or 64, 4 where measured sensitivity pays for it; "
                "within 0.10x of the fp32 size"),
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
