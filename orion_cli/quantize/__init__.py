"""orion quantize: weight-only q4 / q3 / q2 ONNX models from Hugging Face causal LMs, a layer at a time.

graph.py        finding the weights in the graph; MatMulNBits / GatherBlockQuantized

The weightless graph, the checkpoint's tensors read a row block at a time and the
fp32 model come from onnx_export/, which serve's onnxruntime engine shares.
layerwise.py    transformers' model run one decoder layer in memory at a time
calibration.py  each linear layer's input Hessian on calibration text, layer by layer
budget.py       how much calibration --method auto can afford on this machine
levels.py       what each level does, the measured choices, the q3 bit allocation
blockwise.py    round-to-nearest, k-quant and HQQ into the MatMulNBits block layout
gptq.py         GPTQ into the same layout
sites.py        one weight quantized from the checkpoint in row blocks; q3's candidates
evaluate.py     perplexity, KL and top-1 agreement against transformers' fp32 model
texts.py        calibration and evaluation text
report.py       metadata.json
quantizer.py    quantize_model(), which runs all of it and writes OUT atomically
"""

from .levels import LEVELS, METHODS
from .quantizer import QuantizeResult, quantize_model

__all__ = ["LEVELS", "METHODS", "QuantizeResult", "quantize_model"]
