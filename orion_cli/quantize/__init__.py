"""orion quantize: weight-only q4 / q3 / q2 ONNX models from Hugging Face causal LMs.

export.py     the fp32 ONNX export (optimum, with past key values)
levels.py     what each level does, the measured choices, the q3 bit allocation
blockwise.py  round-to-nearest, k-quant and HQQ into the MatMulNBits block layout
gptq.py       GPTQ into the same layout; hessians.py collects its calibration statistics
graph.py      finding the weights in the graph and swapping in MatMulNBits / GatherBlockQuantized
sensitivity.py  per-tensor KL divergence, for q3
evaluate.py   perplexity, KL and top-1 agreement against the fp32 model in onnxruntime
texts.py      calibration and evaluation text
quantizer.py  quantize_model(), which runs all of it and writes OUT atomically
"""

from .levels import LEVELS, METHODS
from .quantizer import QuantizeResult, quantize_model

__all__ = ["LEVELS", "METHODS", "QuantizeResult", "quantize_model"]
